// Plain SGD and SGD with momentum (Polyak 1964; Nesterov form as in Sutskever et al. 2013).
#pragma once

#include "common.hpp"

namespace fusedopt {

// Matches fusedopt.reference.sgd_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   param -= lr * g
template <typename T>
struct Sgd {
  static constexpr std::array<Role, 2> roles{{
      {"param", true, false},
      {"grad", false, false},
  }};

  template <typename Hyper>
  explicit Sgd(const Hyper& h)
      : lr(T(h.real("lr"))), weight_decay(T(h.real("weight_decay"))), maximize(h.flag("maximize")) {}

  void operator()(Index n, const std::array<T*, 2>& a) const {
    with_flags([&](auto max, auto l2) { run<max.value, l2.value>(n, a[0], a[1]); }, maximize,
               weight_decay != T(0));
  }

  template <bool max, bool l2>
  void run(Index n, T* __restrict param, const T* __restrict grad) const {
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
      const T p = param[i];
      param[i] = p - lr * effective_grad<max, l2>(grad[i], p, weight_decay);
    }
  }

  T lr, weight_decay;
  bool maximize;
};

// Matches fusedopt.reference.momentum_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   buf = momentum * buf + (1 - dampening) * g
//   update = g + momentum * buf if nesterov else buf
//   param -= lr * update
template <typename T>
struct Momentum {
  static constexpr std::array<Role, 3> roles{{
      {"param", true, false},
      {"grad", false, false},
      {"buf", true, false},
  }};

  template <typename Hyper>
  explicit Momentum(const Hyper& h)
      : lr(T(h.real("lr"))),
        momentum(T(h.real("momentum"))),
        one_minus_dampening(T(1.0 - h.real("dampening"))),
        weight_decay(T(h.real("weight_decay"))),
        nesterov(h.flag("nesterov")),
        maximize(h.flag("maximize")) {}

  void operator()(Index n, const std::array<T*, 3>& a) const {
    with_flags([&](auto max, auto l2, auto nest) {
      run<max.value, l2.value, nest.value>(n, a[0], a[1], a[2]);
    }, maximize, weight_decay != T(0), nesterov);
  }

  template <bool max, bool l2, bool nest>
  void run(Index n, T* __restrict param, const T* __restrict grad, T* __restrict buf) const {
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
      const T p = param[i];
      const T g = effective_grad<max, l2>(grad[i], p, weight_decay);
      const T b = momentum * buf[i] + one_minus_dampening * g;
      buf[i] = b;
      if constexpr (nest) {
        param[i] = p - lr * (g + momentum * b);
      } else {
        param[i] = p - lr * b;
      }
    }
  }

  T lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize;
};

}  // namespace fusedopt
