// RMSprop (Hinton, Coursera lecture 6e, 2012), centered form (Graves 2013), with momentum.
#pragma once

#include <cmath>

#include "common.hpp"

namespace fusedopt {

// Matches fusedopt.reference.rmsprop_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   square_avg = alpha * square_avg + (1 - alpha) * g * g
//   if centered:
//       grad_avg = alpha * grad_avg + (1 - alpha) * g
//       denom = sqrt(square_avg - grad_avg * grad_avg) + eps
//   else: denom = sqrt(square_avg) + eps
//   if momentum:
//       momentum_buf = momentum * momentum_buf + g / denom
//       param -= lr * momentum_buf
//   else: param -= lr * g / denom
// centered is on exactly when grad_avg is given, momentum when momentum_buf is.
template <typename T>
struct Rmsprop {
  static constexpr std::array<Role, 5> roles{{
      {"param", true, false},
      {"grad", false, false},
      {"square_avg", true, false},
      {"momentum_buf", true, true, "momentum"},
      {"grad_avg", true, true, "centered"},
  }};

  template <typename Hyper>
  explicit Rmsprop(const Hyper& h) {
    const double a = h.real("alpha");
    lr = T(h.real("lr"));
    alpha = T(a);
    one_minus_alpha = T(1.0 - a);
    eps = T(h.real("eps"));
    weight_decay = T(h.real("weight_decay"));
    momentum = T(h.real("momentum"));
    maximize = h.flag("maximize");
  }

  void operator()(Index n, const std::array<T*, 5>& a) const {
    with_flags([&](auto max, auto l2, auto mom, auto cent) {
      run<max.value, l2.value, mom.value, cent.value>(n, a[0], a[1], a[2], a[3], a[4]);
    }, maximize, weight_decay != T(0), a[3] != nullptr, a[4] != nullptr);
  }

  template <bool max, bool l2, bool with_momentum, bool centered>
  void run(Index n, T* __restrict param, const T* __restrict grad, T* __restrict square_avg,
           T* __restrict momentum_buf, T* __restrict grad_avg) const {
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
      const T p = param[i];
      const T g = effective_grad<max, l2>(grad[i], p, weight_decay);
      const T s = alpha * square_avg[i] + one_minus_alpha * g * g;
      square_avg[i] = s;
      T denom;
      if constexpr (centered) {
        const T ga = alpha * grad_avg[i] + one_minus_alpha * g;
        grad_avg[i] = ga;
        denom = std::sqrt(s - ga * ga) + eps;
      } else {
        denom = std::sqrt(s) + eps;
      }
      if constexpr (with_momentum) {
        const T b = momentum * momentum_buf[i] + g / denom;
        momentum_buf[i] = b;
        param[i] = p - lr * b;
      } else {
        param[i] = p - lr * g / denom;
      }
    }
  }

  T lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  bool maximize;
};

}  // namespace fusedopt
