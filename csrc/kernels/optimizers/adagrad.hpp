// Adagrad (Duchi, Hazan & Singer 2011), with PyTorch's learning-rate decay.
#pragma once

#include <cmath>

#include "../common.hpp"

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
        weight_decay(T(h.real("weight_decay"))),
        eps(T(h.real("eps"))),
        maximize(h.flag("maximize")) {}

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    with_flags(
        [&](auto l2) {
          with_rounding<Types>(rounding, [&](const auto& out) {
            run<l2.value>(n, out, role<P>(a, 0, offset), role<const G>(a, 1, offset),
                          role<S>(a, 2, offset));
          });
        },
        weight_decay != T(0));
  }

  template <bool l2, typename Out>
  void run(Index n, const Out& out, P* __restrict param, const G* __restrict grad,
           S* __restrict sum_sq) const {
#pragma omp simd
    for (ChunkIndex i = 0; i < n; ++i) {
      const T p = load<T>(param[i]);
      const T g = effective_grad<l2>(maximize, load<T>(grad[i]), p, weight_decay);
      const T s = load<T>(sum_sq[i]) + g * g;
      out(i, 1, sum_sq[i], s);
      out(i, 0, param[i], p - clr * g / (std::sqrt(s) + eps));
    }
  }

  T clr, weight_decay, eps;
  Negation<T> maximize{false};
};

namespace header::adagrad {
using declares = List<Adagrad>;
}

}  // namespace fusedopt
