// Adamax (Kingma & Ba 2015, section 7.1): Adam with the infinity norm in place of the second
// moment, as torch.optim.Adamax (eps added to |g| inside the maximum).
#pragma once

#include <cmath>

#include "../common.hpp"

namespace fusedopt {

template <typename Types>
struct AdamaxKernel;

struct Adamax : NoCrossRule {
  static constexpr const char* name = "adamax";
  static constexpr const char* summary =
      "m = b1 m + (1-b1) g; u = max(b2 u, |g| + eps); param -= lr/(1-b1^t) m / u";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("exp_avg", "first moment m (start at zero)"),
      state("exp_inf", "exponentially weighted infinity norm u (start at zero)").never_negative(),
  };
  static constexpr std::array hyperparameters{
      hp::step(),
      hp::lr(2e-3),
      hp::beta1(0.9, "decay rate of the first moment"),
      hp::beta2(0.999, "decay rate of the infinity norm"),
      hp::eps(1e-8),
      hp::l2_weight_decay(),
      hp::maximize(),
  };
  template <typename Types>
  using Kernel = AdamaxKernel<Types>;
};

// Matches fusedopt.reference.adamax_:
//   g = -grad if maximize else grad
//   if weight_decay: g = g + weight_decay * param
//   exp_avg = beta1 * exp_avg + (1 - beta1) * g
//   exp_inf = maximum(beta2 * exp_inf, abs(g) + eps)
//   param -= lr / (1 - beta1**step) * exp_avg / exp_inf
template <typename Types>
struct AdamaxKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit AdamaxKernel(const Values<Decl>& h) {
    const double b1 = h.real("beta1");
    beta1 = T(b1);
    one_minus_beta1 = T(1.0 - b1);
    beta2 = T(h.real("beta2"));
    eps = T(h.real("eps"));
    weight_decay = T(h.real("weight_decay"));
    step_size = T(h.real("lr") / (1.0 - std::pow(b1, static_cast<double>(h.step()))));
    maximize = Negation<T>(h.flag("maximize"));
  }

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    with_flags(
        [&](auto l2) {
          with_rounding<Types>(rounding, [&](const auto& out) {
            run<l2.value>(n, out, role<P>(a, 0, offset), role<const G>(a, 1, offset),
                          role<S>(a, 2, offset), role<S>(a, 3, offset));
          });
        },
        weight_decay != T(0));
  }

  template <bool l2, typename Out>
  void run(Index n, const Out& out, P* __restrict param, const G* __restrict grad,
           S* __restrict exp_avg, S* __restrict exp_inf) const {
#pragma omp simd
    for (ChunkIndex i = 0; i < n; ++i) {
      const T p = load<T>(param[i]);
      const T g = effective_grad<l2>(maximize, load<T>(grad[i]), p, weight_decay);
      const T m = beta1 * load<T>(exp_avg[i]) + one_minus_beta1 * g;
      const T decayed = beta2 * load<T>(exp_inf[i]);
      const T magnitude = std::abs(g) + eps;
      // numpy.maximum: NaN if either is NaN
      const T u = decayed != decayed       ? decayed
                  : magnitude != magnitude ? magnitude
                                           : (decayed > magnitude ? decayed : magnitude);
      out(i, 1, exp_avg[i], m);
      out(i, 2, exp_inf[i], u);
      out(i, 0, param[i], p - step_size * m / u);
    }
  }

  T beta1, one_minus_beta1, beta2, eps, weight_decay, step_size;
  Negation<T> maximize{false};
};

namespace header::adamax {
using declares = List<Adamax>;
}

}  // namespace fusedopt
