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
    T scratch[kChunk];
    Vec<T> param(a[0], n);
    const auto g = effective_grad(n, a[1], a[0], maximize, weight_decay, scratch);
    param -= lr * g;
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
    T scratch[kChunk];
    Vec<T> param(a[0], n), buf(a[2], n);
    const auto g = effective_grad(n, a[1], a[0], maximize, weight_decay, scratch);
    buf = momentum * buf + one_minus_dampening * g;
    if (nesterov) {
      param -= lr * (g + momentum * buf);
    } else {
      param -= lr * buf;
    }
  }

  T lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize;
};

}  // namespace fusedopt
