// Plain SGD and SGD with momentum (Polyak 1964; Nesterov form as in Sutskever et al. 2013).
#pragma once

#include "../lanes.hpp"

namespace fusedopt {

template <typename Types>
struct SgdKernel;
template <typename Types>
struct MomentumKernel;

struct Sgd : NoCrossRule {
  static constexpr const char* name = "sgd";
  static constexpr const char* summary = "param -= lr g";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
  };
  static constexpr std::array hyperparameters{
      hp::lr(),
      hp::l2_weight_decay(),
      hp::maximize(),
  };
  template <typename Types>
  using Kernel = SgdKernel<Types>;
};

struct Momentum {
  static constexpr const char* name = "momentum";
  static constexpr const char* summary =
      "b = mu b + (1-tau) g; param -= lr (g + mu b if nesterov else b)";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("momentum_buffer", "momentum buffer b (start at zero)").formerly("buf"),
  };
  static constexpr std::array hyperparameters{
      hp::lr(),
      required_real("momentum", at_least(0.0), "momentum value", "momentum factor mu"),
      real("dampening", 0.0, closed(0.0, 1.0), "dampening value",
           "dampening tau of the gradient's share"),
      flag("nesterov", false, "Nesterov momentum (needs momentum > 0 and dampening = 0)"),
      hp::l2_weight_decay(),
      hp::maximize(),
  };
  template <typename V>
  static const char* invalid(const V& h) {
    if (h.flag("nesterov") && (h.real("momentum") <= 0.0 || h.real("dampening") != 0.0)) {
      return "Nesterov momentum requires a momentum and zero dampening";
    }
    return nullptr;
  }
  template <typename Types>
  using Kernel = MomentumKernel<Types>;
};

// Matches fusedopt.reference.sgd_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   param -= lr * g
template <typename Types>
struct SgdKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;

  template <typename Decl>
  explicit SgdKernel(const Values<Decl>& h)
      : lr(T(h.real("lr"))), weight_decay(h.real("weight_decay")), maximize(h.flag("maximize")) {}

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    const SgdKernel constants = *this;
    with_flags(
        [&](auto l2) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<l2.value>(lane, param, grad);
          });
        },
        weight_decay.on);
  }

  template <bool l2, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad) const {
    const auto p = lane.load(param);
    lane.store(0, param,
               p - lr * effective_grad<l2>(maximize, lane.load(grad), p, weight_decay.value));
  }

  T lr;
  Coefficient<T> weight_decay;
  Negation<T> maximize{false};
};

// Matches fusedopt.reference.momentum_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   momentum_buffer = momentum * momentum_buffer + (1 - dampening) * g
//   update = g + momentum * momentum_buffer if nesterov else momentum_buffer
//   param -= lr * update
template <typename Types>
struct MomentumKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit MomentumKernel(const Values<Decl>& h)
      : lr(T(h.real("lr"))),
        momentum(T(h.real("momentum"))),
        one_minus_dampening(T(1.0 - h.real("dampening"))),
        weight_decay(h.real("weight_decay")),
        nesterov(h.flag("nesterov")),
        maximize(h.flag("maximize")) {}

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const buf = role<S>(a, 2, offset);
    const MomentumKernel constants = *this;
    with_flags(
        [&](auto l2, auto nest) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<l2.value, nest.value>(lane, param, grad, buf);
          });
        },
        weight_decay.on, nesterov);
  }

  template <bool l2, bool nest, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* buf) const {
    const auto p = lane.load(param);
    const auto g = effective_grad<l2>(maximize, lane.load(grad), p, weight_decay.value);
    const auto b = momentum * lane.load(buf) + one_minus_dampening * g;
    lane.store(1, buf, b);
    if constexpr (nest) {
      lane.store(0, param, p - lr * (g + momentum * b));
    } else {
      lane.store(0, param, p - lr * b);
    }
  }

  T lr, momentum, one_minus_dampening;
  Coefficient<T> weight_decay;
  bool nesterov;
  Negation<T> maximize{false};
};

namespace header::sgd {
using declares = List<Sgd, Momentum>;
}

}  // namespace fusedopt
