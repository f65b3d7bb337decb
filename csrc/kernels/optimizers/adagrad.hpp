// Adagrad (Duchi, Hazan & Singer 2011), with PyTorch's learning-rate decay.
#pragma once

#include <cmath>

#include "../lanes.hpp"

namespace fusedopt {

template <typename Types>
struct AdagradKernel;

struct Adagrad : NoCrossRule {
  static constexpr const char* name = "adagrad";
  static constexpr const char* summary =
      "s += g^2; param -= lr/(1+(t-1) lr_decay) g / (sqrt(s) + eps)";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("sum_sq",
            "sum of squared gradients s (start at initial_accumulator_value, "
            "usually 0)")
          .never_negative(),
  };
  static constexpr std::array hyperparameters{
      hp::step(),
      hp::lr(1e-2),
      real("lr_decay", 0.0, at_least(0.0), "lr_decay value", "learning-rate decay"),
      hp::l2_weight_decay(),
      hp::eps(1e-10),
      hp::maximize(),
  };
  template <typename Types>
  using Kernel = AdagradKernel<Types>;
};

// Matches fusedopt.reference.adagrad_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   sum_sq = sum_sq + g * g
//   param -= lr / (1 + (step - 1) * lr_decay) * g / (sqrt(sum_sq) + eps)
template <typename Types>
struct AdagradKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit AdagradKernel(const Values<Decl>& h)
      : clr(T(h.real("lr") / (1.0 + static_cast<double>(h.step() - 1) * h.real("lr_decay")))),
        weight_decay(h.real("weight_decay")),
        eps(T(h.real("eps"))),
        maximize(h.flag("maximize")) {}

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const sum_sq = role<S>(a, 2, offset);
    const AdagradKernel constants = *this;
    with_flags(
        [&](auto l2) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<l2.value>(lane, param, grad, sum_sq);
          });
        },
        weight_decay.on);
  }

  template <bool l2, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* sum_sq) const {
    const auto p = lane.load(param);
    const auto g = effective_grad<l2>(maximize, lane.load(grad), p, weight_decay.value);
    const auto s = lane.load(sum_sq) + g * g;
    lane.store(1, sum_sq, s);
    lane.store(0, param, p - clr * g / (sqrt(s) + eps));
  }

  T clr;
  Coefficient<T> weight_decay;
  T eps;
  Negation<T> maximize{false};
};

namespace header::adagrad {
using declares = List<Adagrad>;
}

}  // namespace fusedopt
