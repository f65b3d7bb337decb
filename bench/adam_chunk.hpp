// What the C++ driver of Adam's kernel in bench/ (bfloat16_avx512.cpp) takes from here, and
// future ones would share: the kernel at fixed hyperparameters, one chunk of its four arrays, the
// timing of a step. Header-only, built with each driver (its build line is in the driver's
// comment).
#pragma once

#include <array>
#include <chrono>
#include <cmath>
#include <random>
#include <vector>

#include "kernels/optimizers/adam.hpp"

namespace fusedopt::bench {

inline constexpr Index kCount = kChunk;  // 4 arrays of 4 KiB (bfloat16): in L1
inline constexpr int kRepeats = 20000;

// Adam's kernel for `Types` at step 10: lr 1e-3, betas 0.9 and 0.999, eps 1e-8, no decay.
template <typename Types>
AdamKernel<Types> adam_kernel() {
  Value raw[9] = {};
  raw[0].count = 10;  // step
  raw[1].number = 1e-3;
  raw[2].number = 0.9;
  raw[3].number = 0.999;
  raw[4].number = 1e-8;
  return AdamKernel<Types>(Values<Adam>(raw));
}

template <typename T>
std::vector<T> normal(float scale, bool magnitude, std::mt19937& generator) {
  std::normal_distribution<float> distribution;
  std::vector<T> out(kCount);
  for (auto& x : out) {
    const float f = distribution(generator) * scale;
    x = T(magnitude ? std::fabs(f) : f);
  }
  return out;
}

// One chunk of Adam's arrays: params and grads N(0, 1), moments of the scale a step leaves.
template <typename T>
struct AdamArrays {
  std::vector<T> param, grad, exp_avg, exp_avg_sq;
  explicit AdamArrays(std::mt19937& generator)
      : param(normal<T>(1, false, generator)),
        grad(normal<T>(1, false, generator)),
        exp_avg(normal<T>(0.01f, false, generator)),
        exp_avg_sq(normal<T>(0.01f, true, generator)) {}
  std::array<void*, 5> pointers() {
    return {param.data(), grad.data(), exp_avg.data(), exp_avg_sq.data(), nullptr};
  }
};

template <typename Step>
double ns_per_element(const Step& step) {
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < kRepeats; ++r) step();
  const std::chrono::duration<double, std::nano> elapsed = std::chrono::steady_clock::now() - start;
  return elapsed.count() / (static_cast<double>(kRepeats) * kCount);
}

}  // namespace fusedopt::bench
