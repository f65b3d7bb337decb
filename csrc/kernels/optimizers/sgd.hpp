// Plain SGD and SGD with momentum (Polyak 1964; Nesterov form as in Sutskever et al. 2013).
#pragma once

#include "../common.hpp"

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
      : lr(T(h.real("lr"))),
        weight_decay(T(h.real("weight_decay"))),
        maximize(h.flag("maximize")) {}

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    with_flags(
        [&](auto l2) {
          with_rounding<Types>(rounding, [&](const auto& out) {
            run<l2.value>(n, out, role<P>(a, 0, offset), role<const G>(a, 1, offset));
          });
        },
        weight_decay != T(0));
  }

  template <bool l2, typename Out>
  void run(Index n, const Out& out, P* __restrict param, const G* __restrict grad) const {
#pragma omp simd
    for (ChunkIndex i = 0; i < n; ++i) {
      const T p = load<T>(param[i]);
      out(i, 0, param[i], p - lr * effective_grad<l2>(maximize, load<T>(grad[i]), p, weight_decay));
    }
  }

  T lr, weight_decay;
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
        weight_decay(T(h.real("weight_decay"))),
        nesterov(h.flag("nesterov")),
        maximize(h.flag("maximize")) {}

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    with_flags(
        [&](auto l2, auto nest) {
          with_rounding<Types>(rounding, [&](const auto& out) {
            run<l2.value, nest.value>(n, out, role<P>(a, 0, offset), role<const G>(a, 1, offset),
                                      role<S>(a, 2, offset));
          });
        },
        weight_decay != T(0), nesterov);
  }

  template <bool l2, bool nest, typename Out>
  void run(Index n, const Out& out, P* __restrict param, const G* __restrict grad,
           S* __restrict buf) const {
#pragma omp simd
    for (ChunkIndex i = 0; i < n; ++i) {
      const T p = load<T>(param[i]);
      const T g = effective_grad<l2>(maximize, load<T>(grad[i]), p, weight_decay);
      const T b = momentum * load<T>(buf[i]) + one_minus_dampening * g;
      out(i, 1, buf[i], b);
      if constexpr (nest) {
        out(i, 0, param[i], p - lr * (g + momentum * b));
      } else {
        out(i, 0, param[i], p - lr * b);
      }
    }
  }

  T lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov;
  Negation<T> maximize{false};
};

namespace header::sgd {
using declares = List<Sgd, Momentum>;
}

}  // namespace fusedopt
