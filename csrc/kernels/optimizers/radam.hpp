// RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond"), as
// torch.optim.RAdam: Adam's step rectified while the SMA length rho_t exceeds 5, plain momentum
// SGD before; decoupled weight decay as an option.
#pragma once

#include <cmath>

#include "../lanes.hpp"

namespace fusedopt {

template <typename Types>
struct RAdamKernel;

struct RAdam : NoCrossRule {
  static constexpr const char* name = "radam";
  static constexpr const char* summary =
      "m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; "
      "param -= lr r_t sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps) if rho_t > 5, "
      "else lr/(1-b1^t) m";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("exp_avg", "first moment m (start at zero)"),
      state("exp_avg_sq", "second moment v (start at zero)").never_negative(),
  };
  static constexpr std::array hyperparameters{
      hp::step(),
      hp::lr(1e-3),
      hp::beta1(0.9, "decay rate of the first moment"),
      hp::beta2(0.999, "decay rate of the second moment"),
      hp::eps(1e-8),
      hp::weight_decay(0.0, "weight decay coefficient (L2, or decoupled)"),
      flag("decoupled_weight_decay", false, "AdamW's decay instead of an L2 term in the gradient"),
      hp::maximize(),
  };
  template <typename Types>
  using Kernel = RAdamKernel<Types>;
};

// Matches fusedopt.reference.radam_ (rho_t, the rectification and bias corrections in double,
// once per call; which branch runs depends on the step only):
//   g = -grad if maximize else grad
//   if decoupled_weight_decay: param *= 1 - lr * weight_decay
//   elif weight_decay: g = g + weight_decay * param
//   exp_avg = beta1 * exp_avg + (1 - beta1) * g
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
//   if rho_t > 5: param -= lr * rect * sqrt(1 - beta2**step) / (1 - beta1**step) * exp_avg
//                          / (sqrt(exp_avg_sq) + eps)
//   else: param -= lr / (1 - beta1**step) * exp_avg
template <typename Types>
struct RAdamKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit RAdamKernel(const Values<Decl>& h) {
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
    const double bias_correction1 = 1.0 - std::pow(b1, step);
    const double bias_correction2 = 1.0 - std::pow(b2, step);
    // the length of the approximated simple moving average, and its limit
    const double rho_inf = 2.0 / (1.0 - b2) - 1.0;
    const double rho = rho_inf - 2.0 * step * std::pow(b2, step) / bias_correction2;
    rectified = rho > 5.0;
    if (rectified) {
      const double rect = std::sqrt((rho - 4.0) * (rho - 2.0) * rho_inf /
                                    ((rho_inf - 4.0) * (rho_inf - 2.0) * rho));
      step_size = T(lr * rect * std::sqrt(bias_correction2) / bias_correction1);
    } else {
      step_size = T(lr / bias_correction1);
    }
  }

  // param * 1 is exact, so decay is applied whether decoupled or not (as in Adam).
  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const exp_avg = role<S>(a, 2, offset);
    S* const exp_avg_sq = role<S>(a, 3, offset);
    const RAdamKernel constants = *this;
    with_flags(
        [&](auto has_l2, auto rect) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<has_l2.value, rect.value>(lane, param, grad, exp_avg, exp_avg_sq);
          });
        },
        l2.on, rectified);
  }

  template <bool has_l2, bool rect, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* exp_avg, S* exp_avg_sq) const {
    const auto p = lane.load(param);
    const auto g = effective_grad<has_l2>(maximize, lane.load(grad), p, l2.value);
    const auto m = beta1 * lane.load(exp_avg) + one_minus_beta1 * g;
    const auto v = beta2 * lane.load(exp_avg_sq) + one_minus_beta2 * g * g;
    lane.store(1, exp_avg, m);
    lane.store(2, exp_avg_sq, v);
    if constexpr (rect) {
      lane.store(0, param, p * decay - step_size * m / (sqrt(v) + eps));
    } else {
      lane.store(0, param, p * decay - step_size * m);
    }
  }

  Coefficient<T> l2;
  T decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size;
  Negation<T> maximize{false};
  bool rectified;
};

namespace header::radam {
using declares = List<RAdam>;
}

}  // namespace fusedopt
