// The kernels behind the helpers: the non-finite scan (all_finite, skip_if_nonfinite), the sum of
// squares and the scaling of clip_grad_norm_, and the benchmark's roofline probe. Scale and
// Roofline are declared like optimizers, so the binding drives them the same way.
#pragma once

#include <Eigen/Core>
#include <array>
#include <cmath>

#include "common.hpp"

namespace fusedopt {

template <typename T>
using ConstVec = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

// Whether x[0..n) holds a NaN or an infinity. x * 0 is 0 for every finite x and NaN otherwise,
// and a sum with a NaN in it is NaN: Eigen's vectorized reduction does it in one pass, where a
// loop of std::isfinite does not vectorize.
template <typename T>
bool has_nonfinite(Index n, const T* x) {
  return std::isnan((ConstVec<T>(x, n) * T(0)).sum());
}

// Sum of squares of x[0..n) in double, in an order fixed by n alone: eight running sums over
// i % 8, combined pairwise. It depends neither on the data's alignment nor on which thread
// runs it, so a norm built from per-chunk sums is bit-identical for any thread count. (Eigen's
// reduction order depends on the packet size, so it would differ between SIMD levels.) With
// `negate` (maximize), the squares of -x, whose NaNs take -x's sign, as where the reference
// negates first.
template <typename T>
double sum_squares(Index n, const T* x, const Negation<double>& negate = Negation<double>(false)) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  Index i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const double v = negate(static_cast<double>(x[i + k]));
      acc[k] += v * v;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const double v = negate(static_cast<double>(x[i]));
    acc[k] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename Types>
struct ScaleKernel;
template <typename Types>
struct RooflineKernel;

// arrays <- factor * arrays, for clip_grad_norm_.
struct Scale : NoCrossRule {
  static constexpr const char* name = "scale";
  static constexpr const char* summary = "x *= factor";
  static constexpr std::array arrays{
      ArrayDecl{"arrays", Part::param, true, "arrays scaled in place"}};
  static constexpr std::array hyperparameters{
      real("factor", 1.0, at_least(0.0), "factor", "the factor"),
  };
  template <typename Types>
  using Kernel = ScaleKernel<Types>;
};

template <typename Types>
struct ScaleKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;

  template <typename Decl>
  explicit ScaleKernel(const Values<Decl>& h) : factor(T(h.real("factor"))) {}

  void operator()(void* const* a, Index offset, Index n, const Rounding&) const {
    P* __restrict x = role<P>(a, 0, offset);
#pragma omp simd
    for (Index i = 0; i < n; ++i) store(x[i], load<T>(x[i]) * factor);
  }

  T factor;
};

// Roofline probe: the memory traffic of an optimizer step without its arithmetic. Reads grad
// and reads and writes param and up to four buffers, in one pass per chunk like every kernel,
// adding 0 * grad to each: no load or store can be elided (0 * grad is not foldable in IEEE
// arithmetic), and the values stay as they are, so the benchmark's implementations can share
// arrays with it. An optimizer step can at best match its time at the same bytes per element.
struct Roofline : NoCrossRule {
  static constexpr const char* name = "roofline";
  static constexpr const char* summary = "x += 0 * grad for param and each buffer";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("buffer1", "a buffer").may_be_absent(),
      // as Adam's second moment, so that an int8 probe decodes and encodes Adam's kinds of codes
      state("buffer2", "a buffer").may_be_absent().never_negative(),
      state("buffer3", "a buffer").may_be_absent(),
      state("buffer4", "a buffer").may_be_absent(),
  };
  static constexpr std::array<Hyperparameter, 0> hyperparameters{};
  template <typename Types>
  using Kernel = RooflineKernel<Types>;
};

template <typename Types>
struct RooflineKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit RooflineKernel(const Values<Decl>&) {}

  // The buffers present, in order: each takes the same pass, so a loop per count of them is
  // enough (five, where one per subset of the four would be sixteen).
  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    std::array<S*, 4> b{};
    std::size_t count = 0;
    for (std::size_t r = 2; r < 6; ++r) {
      if (a[r] != nullptr) b[count++] = role<S>(a, r, offset);
    }
    P* param = role<P>(a, 0, offset);
    const G* grad = role<const G>(a, 1, offset);
    const Rounder<false> out{rounding};
    // where the kernels' loops prefetch (Ahead), the probe's does too
    in_prefetched_blocks(rounding, n, [&](ChunkIndex first, ChunkIndex end) {
      switch (count) {
        case 0: return run<0>(first, end, out, param, grad, b[0], b[1], b[2], b[3]);
        case 1: return run<1>(first, end, out, param, grad, b[0], b[1], b[2], b[3]);
        case 2: return run<2>(first, end, out, param, grad, b[0], b[1], b[2], b[3]);
        case 3: return run<3>(first, end, out, param, grad, b[0], b[1], b[2], b[3]);
        default: return run<4>(first, end, out, param, grad, b[0], b[1], b[2], b[3]);
      }
    });
  }

  // One pass over all arrays, as the optimizer kernels stream them: a probe that swept each
  // array on its own would be slower than the kernels it bounds. Each element is loaded and
  // stored with the kernels' conversions (a low-precision value converts there and back
  // exactly), to nearest and one at a time, without random bits but those a staged int8 state
  // takes (StagedCode), which a kernel's store draws too: the k-th buffer present takes slot k,
  // a constant (a slot read from an array made the loop branch on it, and 2.4-3x slower).
  template <std::size_t buffers>
  void run(ChunkIndex first, ChunkIndex end, const Rounder<false>& out, P* __restrict param,
           const G* __restrict grad, S* __restrict b1, S* __restrict b2, S* __restrict b3,
           S* __restrict b4) const {
    std::uint32_t term = out.term(first);
#pragma omp simd linear(term : kWeylStep)
    for (ChunkIndex i = first; i < end; ++i) {
      const T zero = T(0) * load<T>(grad[i]);
      store(param[i], load<T>(param[i]) + zero);
      if constexpr (buffers >= 1) out.store_at(term, 1, b1[i], load<T>(b1[i]) + zero);
      if constexpr (buffers >= 2) out.store_at(term, 2, b2[i], load<T>(b2[i]) + zero);
      if constexpr (buffers >= 3) out.store_at(term, 3, b3[i], load<T>(b3[i]) + zero);
      if constexpr (buffers >= 4) out.store_at(term, 4, b4[i], load<T>(b4[i]) + zero);
      term += kWeylStep;
    }
  }
};

// Kernels that the binding drives like optimizers but does not publish as optimizers.
using Helpers = List<Scale, Roofline>;

}  // namespace fusedopt
