// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2): the sign
// of an interpolated momentum, with decoupled weight decay.
#pragma once

#include "../common.hpp"

namespace fusedopt {

template <typename Types>
struct LionKernel;

struct Lion : NoCrossRule {
  static constexpr const char* name = "lion";
  static constexpr const char* summary =
      "param *= 1 - lr wd; param -= lr sign(b1 m + (1-b1) g); m = b2 m + (1-b2) g";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("exp_avg", "momentum m (start at zero)"),
  };
  static constexpr std::array hyperparameters{
      hp::lr(1e-4),
      hp::beta1(0.9, "interpolation factor of the update direction"),
      hp::beta2(0.99, "decay rate of the momentum"),
      hp::weight_decay(0.0, "decoupled weight decay coefficient"),
      hp::maximize(),
  };
  template <typename Types>
  using Kernel = LionKernel<Types>;
};

// Matches fusedopt.reference.lion_:
//   g = -grad if maximize else grad
//   if weight_decay: param *= 1 - lr * weight_decay
//   c = beta1 * exp_avg + (1 - beta1) * g
//   param -= lr * sign(c)
//   exp_avg = beta2 * exp_avg + (1 - beta2) * g
// sign as numpy.sign: -1, +0 or 1, NaN for NaN.
template <typename Types>
struct LionKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit LionKernel(const Values<Decl>& h) {
    const double lr_ = h.real("lr"), b1 = h.real("beta1"), b2 = h.real("beta2");
    const double wd = h.real("weight_decay");
    lr = T(lr_);
    decay = T(1.0 - lr_ * wd);
    beta1 = T(b1);
    one_minus_beta1 = T(1.0 - b1);
    beta2 = T(b2);
    one_minus_beta2 = T(1.0 - b2);
    maximize = Negation<T>(h.flag("maximize"));
  }

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    with_rounding<Types>(rounding, [&](const auto& out) {
      run(n, out, role<P>(a, 0, offset), role<const G>(a, 1, offset), role<S>(a, 2, offset));
    });
  }

  template <typename Out>
  void run(Index n, const Out& out, P* __restrict param, const G* __restrict grad,
           S* __restrict exp_avg) const {
#pragma omp simd
    for (ChunkIndex i = 0; i < n; ++i) {
      const T g = effective_grad<false>(maximize, load<T>(grad[i]), T(0), T(0));
      const T m = load<T>(exp_avg[i]);
      const T c = beta1 * m + one_minus_beta1 * g;
      // numpy.sign, branch-free: (c > 0) - (c < 0) is +0 for either zero; NaN stays NaN
      const T sign = c != c ? c : static_cast<T>(c > T(0)) - static_cast<T>(c < T(0));
      // param * 1 is exact: no weight decay is the same as decay = 1
      out(i, 0, param[i], load<T>(param[i]) * decay - lr * sign);
      out(i, 1, exp_avg[i], beta2 * m + one_minus_beta2 * g);
    }
  }

  T lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
  Negation<T> maximize{false};
};

namespace header::lion {
using declares = List<Lion>;
}

}  // namespace fusedopt
