// Adagrad (Duchi, Hazan & Singer 2011), with PyTorch's learning-rate decay.
#pragma once

#include <cmath>

#include "common.hpp"

namespace fusedopt {

// Matches fusedopt.reference.adagrad_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   sum_sq = sum_sq + g * g
//   param -= lr / (1 + (step - 1) * lr_decay) * g / (sqrt(sum_sq) + eps)
template <typename T>
struct Adagrad {
  static constexpr std::array<Role, 3> roles{{
      {"param", true, false},
      {"grad", false, false},
      {"sum_sq", true, false},
  }};

  template <typename Hyper>
  explicit Adagrad(const Hyper& h)
      : clr(T(h.real("lr") /
              (1.0 + static_cast<double>(h.integer("step") - 1) * h.real("lr_decay")))),
        weight_decay(T(h.real("weight_decay"))),
        eps(T(h.real("eps"))),
        maximize(h.flag("maximize")) {}

  void operator()(Index n, const std::array<T*, 3>& a) const {
    with_flags([&](auto max, auto l2) { run<max.value, l2.value>(n, a[0], a[1], a[2]); },
               maximize, weight_decay != T(0));
  }

  template <bool max, bool l2>
  void run(Index n, T* __restrict param, const T* __restrict grad, T* __restrict sum_sq) const {
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
      const T p = param[i];
      const T g = effective_grad<max, l2>(grad[i], p, weight_decay);
      const T s = sum_sq[i] + g * g;
      sum_sq[i] = s;
      param[i] = p - clr * g / (std::sqrt(s) + eps);
    }
  }

  T clr, weight_decay, eps;
  bool maximize;
};

}  // namespace fusedopt
