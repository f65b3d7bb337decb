// Adamax (Kingma & Ba 2015, section 7.1): Adam with the infinity norm in place of the second
// moment, as torch.optim.Adamax (eps added to |g| inside the maximum).
#pragma once

#include <cmath>

#include "../lanes.hpp"

namespace fusedopt {

template <typename Types>
struct AdamaxKernel;

struct Adamax : NoCrossRule {
  static constexpr const char* name = "adamax";
  static constexpr const char* summary =
      "m = b1 m + (1-b1) g; u = max(b2 u, |g| + eps); param -= lr/(1-b1^t) m / u";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("exp_avg", "first moment m (start at zero)"),
      state("exp_inf", "exponentially weighted infinity norm u (start at zero)").never_negative(),
  };
  static constexpr std::array hyperparameters{
      hp::step(),
      hp::lr(2e-3),
      hp::beta1(0.9, "decay rate of the first moment"),
      hp::beta2(0.999, "decay rate of the infinity norm"),
      hp::eps(1e-8),
      hp::l2_weight_decay(),
      hp::maximize(),
  };
  template <typename Types>
  using Kernel = AdamaxKernel<Types>;
};

// Matches fusedopt.reference.adamax_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   exp_avg = beta1 * exp_avg + (1 - beta1) * g
//   exp_inf = maximum(beta2 * exp_inf, abs(g) + eps)
//   param -= lr / (1 - beta1**step) * exp_avg / exp_inf
template <typename Types>
struct AdamaxKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit AdamaxKernel(const Values<Decl>& h) {
    const double b1 = h.real("beta1");
    beta1 = T(b1);
    one_minus_beta1 = T(1.0 - b1);
    beta2 = T(h.real("beta2"));
    eps = T(h.real("eps"));
    weight_decay = Coefficient<T>(h.real("weight_decay"));
    step_size = T(h.real("lr") / (1.0 - std::pow(b1, static_cast<double>(h.step()))));
    maximize = Negation<T>(h.flag("maximize"));
  }

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const exp_avg = role<S>(a, 2, offset);
    S* const exp_inf = role<S>(a, 3, offset);
    const AdamaxKernel constants = *this;
    with_flags(
        [&](auto l2) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<l2.value>(lane, param, grad, exp_avg, exp_inf);
          });
        },
        weight_decay.on);
  }

  template <bool l2, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* exp_avg, S* exp_inf) const {
    const auto p = lane.load(param);
    const auto g = effective_grad<l2>(maximize, lane.load(grad), p, weight_decay.value);
    const auto m = beta1 * lane.load(exp_avg) + one_minus_beta1 * g;
    const auto u = numpy_maximum(beta2 * lane.load(exp_inf), abs(g) + eps);
    lane.store(1, exp_avg, m);
    lane.store(2, exp_inf, u);
    lane.store(0, param, p - step_size * m / u);
  }

  T beta1, one_minus_beta1, beta2, eps, step_size;
  Coefficient<T> weight_decay;
  Negation<T> maximize{false};
};

namespace header::adamax {
using declares = List<Adamax>;
}

}  // namespace fusedopt
