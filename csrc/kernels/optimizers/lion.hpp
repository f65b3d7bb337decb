// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2): the sign
// of an interpolated momentum, with decoupled weight decay.
#pragma once

#include "../lanes.hpp"

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
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const exp_avg = role<S>(a, 2, offset);
    const LionKernel constants = *this;
    for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
      constants.step(lane, param, grad, exp_avg);
    });
  }

  template <typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* exp_avg) const {
    const auto g = effective_grad<false>(maximize, lane.load(grad), T(0), T(0));
    const auto m = lane.load(exp_avg);
    const auto sign = numpy_sign(beta1 * m + one_minus_beta1 * g);
    // param * 1 is exact: no weight decay is the same as decay = 1
    lane.store(0, param, lane.load(param) * decay - lr * sign);
    lane.store(1, exp_avg, beta2 * m + one_minus_beta2 * g);
  }

  T lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
  Negation<T> maximize{false};
};

namespace header::lion {
using declares = List<Lion>;
}

}  // namespace fusedopt
