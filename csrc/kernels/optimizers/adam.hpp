// Adam (Kingma & Ba 2015, Algorithm 1), with AMSGrad (Reddi et al. 2018) and decoupled weight
// decay, AdamW (Loshchilov & Hutter 2019).
#pragma once

#include <cmath>

#include "../lanes.hpp"

namespace fusedopt {

template <typename Types>
struct AdamKernel;

struct Adam : NoCrossRule {
  static constexpr const char* name = "adam";
  static constexpr const char* summary =
      "m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; "
      "param -= lr/(1-b1^t) m / (sqrt(v) (1/sqrt(1-b2^t)) + eps)";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("exp_avg", "first moment m (start at zero)"),
      state("exp_avg_sq", "second moment v (start at zero)").never_negative(),
      state("max_exp_avg_sq", "running maximum of v (start at zero)")
          .used_with("amsgrad")
          .never_negative(),
  };
  static constexpr std::array hyperparameters{
      hp::step(),
      hp::lr(1e-3),
      hp::beta1(0.9, "decay rate of the first moment"),
      hp::beta2(0.999, "decay rate of the second moment"),
      hp::eps(1e-8),
      hp::weight_decay(0.0, "weight decay coefficient (L2, or decoupled)"),
      flag("decoupled_weight_decay", false, "AdamW's decay instead of an L2 term in the gradient"),
      flag("amsgrad", false, "use the running maximum of v, kept in max_exp_avg_sq"),
      hp::maximize(),
  };
  template <typename Types>
  using Kernel = AdamKernel<Types>;
};

// Adam with decoupled weight decay fixed on, and torch.optim.AdamW's default decay.
struct AdamW : Adam {
  static constexpr const char* name = "adamw";
  static constexpr const char* summary = "param *= 1 - lr wd; then Adam without an L2 term";
  static constexpr auto hyperparameters = fixed(
      with_default(Adam::hyperparameters, "weight_decay", 1e-2), "decoupled_weight_decay", 1.0);
};

// Matches fusedopt.reference.adam_ (bias corrections in double, once per call):
//   g = -grad if maximize else grad
//   if decoupled_weight_decay: param *= 1 - lr * weight_decay
//   elif weight_decay: g = g + weight_decay * param
//   exp_avg = beta1 * exp_avg + (1 - beta1) * g
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
//   if amsgrad: max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq); v = max_exp_avg_sq
//   else: v = exp_avg_sq
//   denom = sqrt(v) * (1 / sqrt(1 - beta2**step)) + eps
// The bias correction is a multiplication by its reciprocal, computed in double and rounded
// once (as DeepSpeed's CPU Adam does): one division per element instead of two. Division
// and square root share one unit, which bounds the step where memory does not.
//   param -= lr / (1 - beta1**step) * exp_avg / denom
template <typename Types>
struct AdamKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit AdamKernel(const Values<Decl>& h) {
    const double lr = h.real("lr"), b1 = h.real("beta1"), b2 = h.real("beta2");
    const double wd = h.real("weight_decay");
    const auto step = static_cast<double>(h.step());
    const bool decoupled = h.flag("decoupled_weight_decay");
    maximize = Negation<T>(h.flag("maximize"));
    decay = T(decoupled ? 1.0 - lr * wd : 1.0);
    l2 = Coefficient<T>(decoupled ? 0.0 : wd);
    beta1 = T(b1);
    one_minus_beta1 = T(1.0 - b1);
    beta2 = T(b2);
    one_minus_beta2 = T(1.0 - b2);
    eps = T(h.real("eps"));
    step_size = T(lr / (1.0 - std::pow(b1, step)));
    inverse_bias_correction2_sqrt = T(1.0 / std::sqrt(1.0 - std::pow(b2, step)));
  }

  // One pass, all arrays streamed together: more memory parallelism per core than one sweep
  // per statement, the reference's operations in its order. param * 1 is exact, so decay is
  // applied whether decoupled or not.
  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const exp_avg = role<S>(a, 2, offset);
    S* const exp_avg_sq = role<S>(a, 3, offset);
    S* const max_exp_avg_sq = role<S>(a, 4, offset);
    const AdamKernel constants = *this;
    with_flags(
        [&](auto has_l2, auto ams) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<has_l2.value, ams.value>(lane, param, grad, exp_avg, exp_avg_sq,
                                                    max_exp_avg_sq);
          });
        },
        l2.on, max_exp_avg_sq != nullptr);
  }

  template <bool has_l2, bool amsgrad, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* exp_avg, S* exp_avg_sq,
                            S* max_exp_avg_sq) const {
    const auto p = lane.load(param);
    const auto g = effective_grad<has_l2>(maximize, lane.load(grad), p, l2.value);
    const auto m = beta1 * lane.load(exp_avg) + one_minus_beta1 * g;
    const auto v = beta2 * lane.load(exp_avg_sq) + one_minus_beta2 * g * g;
    lane.store(1, exp_avg, m);
    lane.store(2, exp_avg_sq, v);
    auto v_hat = v;
    if constexpr (amsgrad) {
      v_hat = numpy_maximum(lane.load(max_exp_avg_sq), v);
      lane.store(3, max_exp_avg_sq, v_hat);
    }
    lane.store(0, param,
               p * decay - step_size * m / (sqrt(v_hat) * inverse_bias_correction2_sqrt + eps));
  }

  Coefficient<T> l2;
  T decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
      inverse_bias_correction2_sqrt;
  Negation<T> maximize{false};
};

namespace header::adam {
using declares = List<Adam, AdamW>;
}

}  // namespace fusedopt
