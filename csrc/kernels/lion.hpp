// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2): the sign
// of an interpolated momentum, with decoupled weight decay.
#pragma once

#include "common.hpp"

namespace fusedopt {

// Matches fusedopt.reference.lion_:
//   g = -grad if maximize else grad
//   if weight_decay: param *= 1 - lr * weight_decay
//   c = beta1 * exp_avg + (1 - beta1) * g
//   param -= lr * sign(c)
//   exp_avg = beta2 * exp_avg + (1 - beta2) * g
// sign as numpy.sign: -1, +0 or 1, NaN for NaN.
template <typename T>
struct Lion {
  static constexpr std::array<Role, 3> roles{{
      {"param", true, false},
      {"grad", false, false},
      {"exp_avg", true, false},
  }};

  template <typename Hyper>
  explicit Lion(const Hyper& h) {
    const double lr_ = h.real("lr"), b1 = h.real("beta1"), b2 = h.real("beta2");
    const double wd = h.real("weight_decay");
    lr = T(lr_);
    decay = T(1.0 - lr_ * wd);
    beta1 = T(b1);
    one_minus_beta1 = T(1.0 - b1);
    beta2 = T(b2);
    one_minus_beta2 = T(1.0 - b2);
    maximize = h.flag("maximize");
  }

  void operator()(Index n, const std::array<T*, 3>& a) const {
    with_flags([&](auto max) { run<max.value>(n, a[0], a[1], a[2]); }, maximize);
  }

  template <bool max>
  void run(Index n, T* __restrict param, const T* __restrict grad, T* __restrict exp_avg) const {
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
      const T g = effective_grad<max, false>(grad[i], T(0), T(0));
      const T m = exp_avg[i];
      const T c = beta1 * m + one_minus_beta1 * g;
      // numpy.sign, branch-free: (c > 0) - (c < 0) is +0 for either zero; NaN stays NaN
      const T sign = c != c ? c : static_cast<T>(c > T(0)) - static_cast<T>(c < T(0));
      // param * 1 is exact: no weight decay is the same as decay = 1
      param[i] = param[i] * decay - lr * sign;
      exp_avg[i] = beta2 * m + one_minus_beta2 * g;
    }
  }

  T lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
  bool maximize;
};

}  // namespace fusedopt
