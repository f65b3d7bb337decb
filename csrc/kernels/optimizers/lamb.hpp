// LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"), as pytorch_optimizer.Lamb
// computes it: an Adam direction scaled per tensor by the trust ratio ||theta|| / ||u||. The
// norms are over whole tensors, so the kernel makes two passes over a call's list: the first
// reduces each chunk to its two sums of squares (Lamb::sums), the binding adds them per tensor
// in chunk order, the second updates. Only the second pass writes: it recomputes m, v and u
// from the unchanged arrays, so every storage type rounds once and the norms are of the float32
// (float64) values the update uses, as in the reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "../lanes.hpp"
#include "../utility.hpp"

namespace fusedopt {

template <typename Types>
struct LambKernel;

struct Lamb : NoCrossRule {
  static constexpr const char* name = "lamb";
  static constexpr const char* summary =
      "m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; param *= 1 - lr wd; u = m / (sqrt(v) + eps); "
      "r = min(|param|, clamp) / (|u| + eps); param -= lr/(1-b1^t) r u";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("exp_avg", "first moment m (start at zero)"),
      state("exp_avg_sq", "second moment v (start at zero)").never_negative(),
  };
  static constexpr std::array hyperparameters{
      hp::step(),
      hp::lr(1e-3),
      hp::beta1(0.9, "decay rate of the first moment"),
      hp::beta2(0.999, "decay rate of the second moment"),
      hp::eps(1e-6),
      hp::weight_decay(0.0, "weight decay coefficient (decoupled, or L2 in the update)"),
      flag("decoupled_weight_decay", true,
           "shrink the param before the norms instead of adding wd param to the update"),
      real("clamp", 10.0, Range{0.0, kInfinity, false, false}, "clamp value",
           "upper bound of the weight norm in the trust ratio"),
      hp::maximize(),
  };
  // The first pass's sums of squares per chunk: of the (decayed) param, of the update u.
  static constexpr std::size_t sums = 2;
  template <typename Types>
  using Kernel = LambKernel<Types>;
};

// Matches fusedopt.reference.lamb_ (norms and scalars in double):
//   g = -grad if maximize else grad
//   exp_avg = beta1 * exp_avg + (1 - beta1) * g
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
//   if decoupled_weight_decay and weight_decay: param *= 1 - weight_decay * lr
//   u = exp_avg / (sqrt(exp_avg_sq) + eps)
//   if not decoupled_weight_decay and weight_decay: u = u + weight_decay * param
//   w = min(sqrt(sum(param^2)), clamp); n = sqrt(sum(u^2))     (per tensor)
//   trust = 1 if w == 0 or n == 0 else w / (n + eps)
//   param -= lr / (1 - beta1**step) * trust * u
template <typename Types>
struct LambKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit LambKernel(const Values<Decl>& h) {
    const double lr = h.real("lr"), b1 = h.real("beta1"), b2 = h.real("beta2");
    const double wd = h.real("weight_decay");
    const bool decoupled = h.flag("decoupled_weight_decay");
    maximize = Negation<T>(h.flag("maximize"));
    decay = T(decoupled ? 1.0 - wd * lr : 1.0);
    l2 = Coefficient<T>(decoupled ? 0.0 : wd);
    beta1 = T(b1);
    one_minus_beta1 = T(1.0 - b1);
    beta2 = T(b2);
    one_minus_beta2 = T(1.0 - b2);
    eps_double = h.real("eps");
    eps = T(eps_double);
    clamp = h.real("clamp");
    step_size = lr / (1.0 - std::pow(b1, static_cast<double>(h.step())));
  }

  // Pass 1, read only: the chunk's sums of squares of theta' (the param after decoupled decay)
  // and of u, each by sum_squares, the reduction behind global_norm, whose fixed order the
  // reference repeats.
  void reduce(void* const* a, Index offset, Index n, double* sums) const {
    alignas(64) T theta[kChunk];
    alignas(64) T u[kChunk];
    const P* const param = role<const P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    const S* const exp_avg = role<const S>(a, 2, offset);
    const S* const exp_avg_sq = role<const S>(a, 3, offset);
    const LambKernel constants = *this;
    with_flags(
        [&](auto has_l2) FUSEDOPT_INLINE_LAMBDA {
          // only float32 (float64) stores, nothing rounded; in element order, as summed
          for_each_lane<Types, true>(Rounding{}, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            const auto e = constants.element<has_l2.value>(lane, param, grad, exp_avg, exp_avg_sq);
            lane.store(0, theta, e.theta);
            lane.store(1, u, e.u);
          });
        },
        l2.on);
    sums[0] = sum_squares(n, theta);
    sums[1] = sum_squares(n, u);
  }

  // theta' (the param after decoupled decay), m, v and u of one lane: what both passes
  // compute, so that the sums of the first are of the values the second stores.
  template <typename V>
  struct Element {
    V theta, m, v, u;
  };
  template <bool has_l2, typename Lane>
  FUSEDOPT_INLINE auto element(Lane& lane, const P* param, const G* grad, const S* exp_avg,
                               const S* exp_avg_sq) const {
    const auto p = lane.load(param) * decay;
    const auto g = effective_grad<false>(maximize, lane.load(grad), p, l2.value);
    const auto m = beta1 * lane.load(exp_avg) + one_minus_beta1 * g;
    const auto v = beta2 * lane.load(exp_avg_sq) + one_minus_beta2 * g * g;
    auto u = m / (sqrt(v) + eps);
    if constexpr (has_l2) u = u + l2.value * p;
    return Element<decltype(u)>{p, m, v, u};
  }

  // The factor of u in the update from a tensor's two sums (all its chunks', in order).
  T scale(const double* tensor_sums) const {
    const double weight_norm = std::min(std::sqrt(tensor_sums[0]), clamp);
    const double update_norm = std::sqrt(tensor_sums[1]);
    double trust =
        weight_norm == 0.0 || update_norm == 0.0 ? 1.0 : weight_norm / (update_norm + eps_double);
    // Which NaN a sum ends with depends on the order of its additions, which the compiler may
    // change: a NaN ratio is the canonical NaN, as in the reference.
    if (std::isnan(trust)) trust = std::numeric_limits<double>::quiet_NaN();
    return T(step_size * trust);
  }

  // Pass 2: the same m, v and u again, stored with the param. param * 1 is exact, so decay is
  // applied whether decoupled or not. A NaN factor (a NaN in the tensor) makes every param
  // NaN, written as param' - factor (as the reference writes it): factor * u could keep u's
  // NaN or the factor's, by the order of its operands.
  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding,
                  const double* tensor_sums) const {
    const T factor = scale(tensor_sums);
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const exp_avg = role<S>(a, 2, offset);
    S* const exp_avg_sq = role<S>(a, 3, offset);
    const LambKernel constants = *this;
    with_flags(
        [&](auto has_l2, auto nan_factor) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<has_l2.value && !nan_factor.value, nan_factor.value>(
                lane, factor, param, grad, exp_avg, exp_avg_sq);
          });
        },
        l2.on, factor != factor);
  }

  template <bool has_l2, bool nan_factor, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, T factor, P* param, const G* grad, S* exp_avg,
                            S* exp_avg_sq) const {
    const auto e = element<has_l2>(lane, param, grad, exp_avg, exp_avg_sq);
    lane.store(1, exp_avg, e.m);
    lane.store(2, exp_avg_sq, e.v);
    if constexpr (nan_factor) {
      lane.store(0, param, e.theta - factor);
    } else {
      lane.store(0, param, e.theta - factor * e.u);
    }
  }

  Coefficient<T> l2;
  T decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  double eps_double, clamp, step_size;
  Negation<T> maximize{false};
};

namespace header::lamb {
using declares = List<Lamb>;
}

}  // namespace fusedopt
