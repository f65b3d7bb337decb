// RMSprop (Hinton, Coursera lecture 6e, 2012), centered form (Graves 2013), with momentum.
#pragma once

#include <cmath>

#include "../common.hpp"

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
    weight_decay = T(h.real("weight_decay"));
    momentum = T(h.real("momentum"));
    maximize = Negation<T>(h.flag("maximize"));
  }

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    with_flags(
        [&](auto l2, auto mom, auto cent) {
          with_rounding<Types>(rounding, [&](const auto& out) {
            run<l2.value, mom.value, cent.value>(n, out, role<P>(a, 0, offset),
                                                 role<const G>(a, 1, offset), role<S>(a, 2, offset),
                                                 role<S>(a, 3, offset), role<S>(a, 4, offset));
          });
        },
        weight_decay != T(0), a[3] != nullptr, a[4] != nullptr);
  }

  template <bool l2, bool with_momentum, bool centered, typename Out>
  void run(Index n, const Out& out, P* __restrict param, const G* __restrict grad,
           S* __restrict square_avg, S* __restrict momentum_buffer, S* __restrict grad_avg) const {
#pragma omp simd
    for (ChunkIndex i = 0; i < n; ++i) {
      const T p = load<T>(param[i]);
      const T g = effective_grad<l2>(maximize, load<T>(grad[i]), p, weight_decay);
      const T s = alpha * load<T>(square_avg[i]) + one_minus_alpha * g * g;
      out(i, 1, square_avg[i], s);
      T denom;
      if constexpr (centered) {
        const T ga = alpha * load<T>(grad_avg[i]) + one_minus_alpha * g;
        out(i, 3, grad_avg[i], ga);
        // s >= ga^2 holds exactly (Jensen), not after rounding: low-precision or quantized
        // state, or float32 rounding, can make the difference negative, whose sqrt is NaN.
        const T variance = s - ga * ga;
        denom = std::sqrt(variance < T(0) ? T(0) : variance) + eps;  // numpy.maximum(x, 0)
      } else {
        denom = std::sqrt(s) + eps;
      }
      if constexpr (with_momentum) {
        const T b = momentum * load<T>(momentum_buffer[i]) + g / denom;
        out(i, 2, momentum_buffer[i], b);
        out(i, 0, param[i], p - lr * b);
      } else {
        out(i, 0, param[i], p - lr * g / denom);
      }
    }
  }

  T lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  Negation<T> maximize{false};
};

namespace header::rmsprop {
using declares = List<Rmsprop>;
}

}  // namespace fusedopt
