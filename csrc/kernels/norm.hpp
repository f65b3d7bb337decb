// Global L2 norm and in-place scaling, for clip_grad_norm_.
#pragma once

#include "common.hpp"

namespace fusedopt {

// Sum of squares of x[0..n) in double, in an order fixed by n alone: eight running sums over
// i % 8, combined pairwise. It depends neither on the data's alignment nor on which thread
// runs it, so a norm built from per-chunk sums is bit-identical for any thread count.
template <typename T>
double sum_squares(Index n, const T* x) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  Index i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const double v = static_cast<double>(x[i + k]);
      acc[k] += v * v;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const double v = static_cast<double>(x[i]);
    acc[k] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// x <- factor * x.
template <typename T>
struct Scale {
  static constexpr std::array<Role, 1> roles{{{"arrays", true, false}}};

  template <typename Hyper>
  explicit Scale(const Hyper& h) : factor(T(h.real("factor"))) {}

  void operator()(Index n, const std::array<T*, 1>& a) const { Vec<T>(a[0], n) *= factor; }

  T factor;
};

}  // namespace fusedopt
