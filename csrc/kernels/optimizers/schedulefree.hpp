// Schedule-Free AdamW and SGD (Defazio et al. 2024, "The Road Less Scheduled"), as the
// `schedulefree` package's AdamWScheduleFree and SGDScheduleFree in their memory-efficient form:
// the param holds y (where the gradient is taken), the state z; the average x is implied,
// x = (y - (1 - beta1) z) / beta1, and the classes switch the param to it in eval mode.
#pragma once

#include <algorithm>
#include <cmath>

#include "../lanes.hpp"

namespace fusedopt {

template <typename Types>
struct ScheduleFreeAdamWKernel;
template <typename Types>
struct ScheduleFreeSGDKernel;

// The hyperparameters of the schedule and the averaging weights that both share. lr_max and
// weight_sum are group-level running values from before this step (0 at step 1): the caller
// (optim.ScheduleFreeAdamW / SGD, or fusedopt.reference.schedulefree_averaging) advances them.
namespace hp {
constexpr Hyperparameter warmup_steps() {
  return real("warmup_steps", 0.0, at_least(0.0), "warmup_steps value",
              "linear warmup of lr over this many steps");
}
constexpr Hyperparameter r() {
  return real("r", 0.0, at_least(0.0), "r value",
              "power of the step in the averaging weights (polynomial weighting)");
}
constexpr Hyperparameter weight_lr_power() {
  return real("weight_lr_power", 2.0, at_least(0.0), "weight_lr_power value",
              "power of the largest lr so far in the averaging weights");
}
constexpr Hyperparameter lr_max() {
  return real("lr_max", 0.0, at_least(0.0), "lr_max value",
              "largest warmed-up lr of the steps before this one (0 at step 1)");
}
constexpr Hyperparameter weight_sum() {
  return real("weight_sum", 0.0, at_least(0.0), "weight_sum value",
              "sum of the averaging weights of the steps before this one (0 at step 1)");
}
}  // namespace hp

// The per-call scalars, in double, in the `schedulefree` package's order (k = step - 1):
//   lr_t = lr * ((k + 1) / warmup_steps if k < warmup_steps else 1)
//   lr_max = max(lr_t, lr_max); weight = (k + 1)**r * lr_max**weight_lr_power
//   weight_sum += weight; ckp1 = weight / weight_sum (0 if weight_sum is 0)
// fusedopt.reference.schedulefree_averaging computes the same.
struct ScheduleFreeScalars {
  double lr, ckp1, weight_sum;
};
template <typename Decl>
ScheduleFreeScalars schedulefree_scalars(const Values<Decl>& h) {
  const auto step = static_cast<double>(h.step());
  const double k = step - 1.0, warmup = h.real("warmup_steps");
  const double lr = h.real("lr") * (k < warmup ? step / warmup : 1.0);
  const double lr_max = std::max(lr, h.real("lr_max"));
  const double weight = std::pow(step, h.real("r")) * std::pow(lr_max, h.real("weight_lr_power"));
  const double weight_sum = h.real("weight_sum") + weight;
  return {lr, weight_sum == 0.0 ? 0.0 : weight / weight_sum, weight_sum};
}

// The averaging weights must stay within a double's range: past it c_t = inf / inf, and the
// step would write NaN into every parameter (r = 1000 at step 3 does it).
struct ScheduleFreeRule {
  template <typename V>
  static const char* invalid(const V& h) {
    if (!std::isfinite(schedulefree_scalars(h).weight_sum)) {
      return "Invalid averaging weights: step**r * lr_max**weight_lr_power, or their sum with "
             "weight_sum, is past a double's range (lower r, lr or weight_lr_power)";
    }
    return nullptr;
  }
};

struct ScheduleFreeAdamW : ScheduleFreeRule {
  static constexpr const char* name = "schedulefree_adamw";
  static constexpr const char* summary =
      "v = b2 v + (1-b2) g^2; u = g / (sqrt(v/(1-b2^t)) + eps) + wd y; "
      "y += c (z - y) + lr_t (b1 (1-c) - 1) u; z -= lr_t u";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("z", "the base sequence z (start at the param's value)"),
      state("exp_avg_sq", "second moment v (start at zero)").never_negative(),
  };
  static constexpr std::array hyperparameters{
      hp::step(),
      hp::lr(0.0025),
      hp::beta1(0.9, "interpolation between the average x and z (momentum)"),
      hp::beta2(0.999, "decay rate of the second moment"),
      hp::eps(1e-8),
      hp::weight_decay(0.0, "weight decay, taken at y"),
      hp::warmup_steps(),
      hp::r(),
      hp::weight_lr_power(),
      hp::lr_max(),
      hp::weight_sum(),
  };
  template <typename Types>
  using Kernel = ScheduleFreeAdamWKernel<Types>;
};

struct ScheduleFreeSGD : ScheduleFreeRule {
  static constexpr const char* name = "schedulefree_sgd";
  static constexpr const char* summary =
      "u = g + wd y; y += c (z - y) + lr_t (momentum (1-c) - 1) u; z -= lr_t u";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("z", "the base sequence z (start at the param's value)"),
  };
  static constexpr std::array hyperparameters{
      hp::step(),
      hp::lr(1.0),
      real("momentum", 0.9, Range{0.0, 1.0, true, true}, "momentum value",
           "interpolation between the average x and z, in (0, 1)"),
      hp::weight_decay(0.0, "weight decay, taken at y"),
      hp::warmup_steps(),
      hp::r(),
      hp::weight_lr_power(),
      hp::lr_max(),
      hp::weight_sum(),
  };
  template <typename Types>
  using Kernel = ScheduleFreeSGDKernel<Types>;
};

// The update both share, from the normalized gradient u (y is the param):
//   if weight_decay: u = u + weight_decay * y
//   y = y + ckp1 * (z - y) + lr_t * (beta (1 - ckp1) - 1) * u
//   z = z - lr_t * u
template <typename T>
struct ScheduleFreeStep {
  ScheduleFreeStep(ScheduleFreeScalars s, double beta, double wd)
      : weight_decay(wd),
        ckp1(T(s.ckp1)),
        y_step(T(s.lr * (beta * (1.0 - s.ckp1) - 1.0))),
        z_step(T(s.lr)) {}
  Coefficient<T> weight_decay;
  T ckp1, y_step, z_step;
};

// Matches fusedopt.reference.schedulefree_adamw_:
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
//   u = grad / (sqrt(exp_avg_sq / (1 - beta2**step)) + eps)
//   then the shared update with beta = beta1.
template <typename Types>
struct ScheduleFreeAdamWKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit ScheduleFreeAdamWKernel(const Values<Decl>& h)
      : s(schedulefree_scalars(h), h.real("beta1"), h.real("weight_decay")) {
    const double b2 = h.real("beta2");
    beta2 = T(b2);
    one_minus_beta2 = T(1.0 - b2);
    eps = T(h.real("eps"));
    bias_correction2 = T(1.0 - std::pow(b2, static_cast<double>(h.step())));
  }

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const z = role<S>(a, 2, offset);
    S* const exp_avg_sq = role<S>(a, 3, offset);
    const ScheduleFreeAdamWKernel constants = *this;
    with_flags(
        [&](auto has_wd) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<has_wd.value>(lane, param, grad, z, exp_avg_sq);
          });
        },
        s.weight_decay.on);
  }

  template <bool has_wd, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* z_, S* exp_avg_sq) const {
    const auto y = lane.load(param), g = lane.load(grad), z = lane.load(z_);
    const auto v = beta2 * lane.load(exp_avg_sq) + one_minus_beta2 * g * g;
    auto u = g / (sqrt(v / bias_correction2) + eps);
    if constexpr (has_wd) u = u + s.weight_decay.value * y;
    lane.store(1, z_, z - s.z_step * u);
    lane.store(2, exp_avg_sq, v);
    lane.store(0, param, y + s.ckp1 * (z - y) + s.y_step * u);
  }

  ScheduleFreeStep<T> s;
  T beta2, one_minus_beta2, eps, bias_correction2;
};

// Matches fusedopt.reference.schedulefree_sgd_: u = grad, then the shared update with
// beta = momentum.
template <typename Types>
struct ScheduleFreeSGDKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit ScheduleFreeSGDKernel(const Values<Decl>& h)
      : s(schedulefree_scalars(h), h.real("momentum"), h.real("weight_decay")) {}

  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const z = role<S>(a, 2, offset);
    const ScheduleFreeSGDKernel constants = *this;
    with_flags(
        [&](auto has_wd) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<has_wd.value>(lane, param, grad, z);
          });
        },
        s.weight_decay.on);
  }

  template <bool has_wd, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* z_) const {
    const auto y = lane.load(param), z = lane.load(z_);
    auto u = lane.load(grad);
    if constexpr (has_wd) u = u + s.weight_decay.value * y;
    lane.store(1, z_, z - s.z_step * u);
    lane.store(0, param, y + s.ckp1 * (z - y) + s.y_step * u);
  }

  ScheduleFreeStep<T> s;
};

namespace header::schedulefree {
using declares = List<ScheduleFreeAdamW, ScheduleFreeSGD>;
}

}  // namespace fusedopt
