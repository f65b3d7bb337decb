// Adam (Kingma & Ba 2015, Algorithm 1), with AMSGrad (Reddi et al. 2018) and decoupled weight
// decay, AdamW (Loshchilov & Hutter 2019).
#pragma once

#include <cmath>

#include "common.hpp"

namespace fusedopt {

// Matches fusedopt.reference.adam_ (bias corrections in double, once per call):
//   g = -grad if maximize else grad
//   if decoupled_weight_decay: param *= 1 - lr * weight_decay
//   elif weight_decay: g = g + weight_decay * param
//   exp_avg = beta1 * exp_avg + (1 - beta1) * g
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
//   if amsgrad: max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq); v = max_exp_avg_sq
//   else: v = exp_avg_sq
//   denom = sqrt(v) / sqrt(1 - beta2**step) + eps
//   param -= lr / (1 - beta1**step) * exp_avg / denom
// amsgrad is on exactly when max_exp_avg_sq is given.
template <typename T>
struct Adam {
  static constexpr std::array<Role, 5> roles{{
      {"param", true, false},
      {"grad", false, false},
      {"exp_avg", true, false},
      {"exp_avg_sq", true, false},
      {"max_exp_avg_sq", true, true},
  }};

  template <typename Hyper>
  explicit Adam(const Hyper& h) {
    const double lr = h.real("lr"), b1 = h.real("beta1"), b2 = h.real("beta2");
    const double wd = h.real("weight_decay");
    const auto step = static_cast<double>(h.integer("step"));
    const bool decoupled = h.flag("decoupled_weight_decay");
    maximize = h.flag("maximize");
    decay = T(decoupled ? 1.0 - lr * wd : 1.0);
    l2 = T(decoupled ? 0.0 : wd);
    beta1 = T(b1);
    one_minus_beta1 = T(1.0 - b1);
    beta2 = T(b2);
    one_minus_beta2 = T(1.0 - b2);
    eps = T(h.real("eps"));
    step_size = T(lr / (1.0 - std::pow(b1, step)));
    bias_correction2_sqrt = T(std::sqrt(1.0 - std::pow(b2, step)));
  }

  void operator()(Index n, const std::array<T*, 5>& a) const {
    T scratch[kChunk];
    Vec<T> param(a[0], n), exp_avg(a[2], n), exp_avg_sq(a[3], n);
    const auto g = effective_grad(n, a[1], a[0], maximize, l2, scratch);
    exp_avg = beta1 * exp_avg + one_minus_beta1 * g;
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g;
    T* v = a[3];
    if (a[4] != nullptr) {
      Vec<T> max_exp_avg_sq(a[4], n);
      // NaN-propagating, as numpy.maximum (a plain max drops a NaN in either operand)
      max_exp_avg_sq = max_exp_avg_sq.template max<Eigen::PropagateNaN>(exp_avg_sq);
      v = a[4];
    }
    const auto update =
        step_size * exp_avg / (ConstVec<T>(v, n).sqrt() / bias_correction2_sqrt + eps);
    // The decoupled decay folded into the last sweep: param * decay is rounded to T before the
    // subtraction either way, so this is bit-identical to decaying first.
    if (decay != T(1)) {
      param = param * decay - update;
    } else {
      param -= update;
    }
  }

  T decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
      bias_correction2_sqrt;
  bool maximize;
};

}  // namespace fusedopt
