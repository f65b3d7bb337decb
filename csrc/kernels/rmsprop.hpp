// RMSprop (Hinton, Coursera lecture 6e, 2012), centered form (Graves 2013), with momentum.
#pragma once

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
      {"momentum_buf", true, true},
      {"grad_avg", true, true},
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
    T scratch[kChunk];
    T denom_buf[kChunk];
    Vec<T> param(a[0], n), square_avg(a[2], n), denom(denom_buf, n);
    const auto g = effective_grad(n, a[1], a[0], maximize, weight_decay, scratch);
    square_avg = alpha * square_avg + one_minus_alpha * g * g;
    if (a[4] != nullptr) {
      Vec<T> grad_avg(a[4], n);
      grad_avg = alpha * grad_avg + one_minus_alpha * g;
      denom = (square_avg - grad_avg * grad_avg).sqrt() + eps;
    } else {
      denom = square_avg.sqrt() + eps;
    }
    if (a[3] != nullptr) {
      Vec<T> momentum_buf(a[3], n);
      momentum_buf = momentum * momentum_buf + g / denom;
      param -= lr * momentum_buf;
    } else {
      param -= lr * g / denom;
    }
  }

  T lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  bool maximize;
};

}  // namespace fusedopt
