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
    decays = wd != 0.0;
    beta1 = T(b1);
    one_minus_beta1 = T(1.0 - b1);
    beta2 = T(b2);
    one_minus_beta2 = T(1.0 - b2);
    maximize = h.flag("maximize");
  }

  void operator()(Index n, const std::array<T*, 3>& a) const {
    T scratch[kChunk];
    T c_buf[kChunk];
    Vec<T> param(a[0], n), exp_avg(a[2], n), c(c_buf, n);
    const auto g = effective_grad(n, a[1], a[0], maximize, T(0), scratch);
    c = beta1 * exp_avg + one_minus_beta1 * g;
    // numpy.sign, branch-free so that GCC vectorizes it (Eigen 3.4 has no packet comparisons,
    // and a branch per element of random sign is mispredicted half the time): (x > 0) - (x < 0)
    // is +0 for either zero; a NaN stays NaN.
    for (Index i = 0; i < n; ++i) {
      const T x = c_buf[i];
      const T sign = static_cast<T>(x > T(0)) - static_cast<T>(x < T(0));
      c_buf[i] = x != x ? x : sign;
    }
    if (decays) {  // decay folded in: param * decay is rounded before the subtraction anyway
      param = param * decay - lr * c;
    } else {
      param -= lr * c;
    }
    exp_avg = beta2 * exp_avg + one_minus_beta2 * g;
  }

  T lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
  bool decays, maximize;
};

}  // namespace fusedopt
