// RMSprop (Hinton, Coursera lecture 6e, 2012), centered form (Graves 2013), with momentum.
#pragma once

#include <cmath>

#include "../lanes.hpp"

namespace fusedopt {

template <typename Types>
struct RmspropKernel;

struct Rmsprop : NoCrossRule {
  static constexpr const char* name = "rmsprop";
  static constexpr const char* summary =
      "s = a s + (1-a) g^2; d = sqrt(s - gbar^2) + eps if centered else sqrt(s) + eps; "
      "param -= lr b with b = mu b + g/d if momentum else param -= lr g/d";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("square_avg", "running average of squared gradients s").never_negative(),
      state("momentum_buffer", "momentum buffer b").used_with("momentum").formerly("momentum_buf"),
      state("grad_avg", "running average of gradients gbar").used_with("centered"),
  };
  static constexpr std::array hyperparameters{
      hp::lr(1e-2),
      real("alpha", 0.99, closed(0.0, 1.0), "alpha value", "smoothing constant"),
      hp::eps(1e-8),
      hp::l2_weight_decay(),
      real("momentum", 0.0, at_least(0.0), "momentum value",
           "momentum factor mu; with mu > 0, momentum_buffer is required"),
      flag("centered", false, "normalise by the estimated variance; requires grad_avg"),
      hp::maximize(),
  };
  template <typename Types>
  using Kernel = RmspropKernel<Types>;
};

// Matches fusedopt.reference.rmsprop_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   square_avg = alpha * square_avg + (1 - alpha) * g * g
//   if centered:
//       grad_avg = alpha * grad_avg + (1 - alpha) * g
//       denom = sqrt(maximum(square_avg - grad_avg * grad_avg, 0)) + eps
//   else: denom = sqrt(square_avg) + eps
//   if momentum:
//       momentum_buffer = momentum * momentum_buffer + g / denom
//       param -= lr * momentum_buffer
//   else: param -= lr * g / denom
template <typename Types>
struct RmspropKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit RmspropKernel(const Values<Decl>& h) {
    const double a = h.real("alpha");
    lr = T(h.real("lr"));
    alpha = T(a);
    one_minus_alpha = T(1.0 - a);
    eps = T(h.real("eps"));
    weight_decay = Coefficient<T>(h.real("weight_decay"));
    momentum = T(h.real("momentum"));
    maximize = Negation<T>(h.flag("maximize"));
  }

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const square_avg = role<S>(a, 2, offset);
    S* const momentum_buffer = role<S>(a, 3, offset);
    S* const grad_avg = role<S>(a, 4, offset);
    const RmspropKernel constants = *this;
    with_flags(
        [&](auto l2, auto mom, auto cent) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<l2.value, mom.value, cent.value>(lane, param, grad, square_avg,
                                                            momentum_buffer, grad_avg);
          });
        },
        weight_decay.on, momentum_buffer != nullptr, grad_avg != nullptr);
  }

  template <bool l2, bool with_momentum, bool centered, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* square_avg, S* momentum_buffer,
                            S* grad_avg) const {
    const auto p = lane.load(param);
    const auto g = effective_grad<l2>(maximize, lane.load(grad), p, weight_decay.value);
    const auto s = alpha * lane.load(square_avg) + one_minus_alpha * g * g;
    lane.store(1, square_avg, s);
    const auto denom = [&]() FUSEDOPT_INLINE_LAMBDA {
      if constexpr (centered) {
        const auto ga = alpha * lane.load(grad_avg) + one_minus_alpha * g;
        lane.store(3, grad_avg, ga);
        // s >= ga^2 holds exactly (Jensen), not after rounding: low-precision or quantized
        // state, or float32 rounding, can make the difference negative, whose sqrt is NaN.
        return sqrt(zero_if_negative(s - ga * ga)) + eps;
      } else {
        return sqrt(s) + eps;
      }
    }();
    if constexpr (with_momentum) {
      const auto b = momentum * lane.load(momentum_buffer) + g / denom;
      lane.store(2, momentum_buffer, b);
      lane.store(0, param, p - lr * b);
    } else {
      lane.store(0, param, p - lr * g / denom);
    }
  }

  T lr, alpha, one_minus_alpha, eps, momentum;
  Coefficient<T> weight_decay;
  Negation<T> maximize{false};
};

namespace header::rmsprop {
using declares = List<Rmsprop>;
}

}  // namespace fusedopt
