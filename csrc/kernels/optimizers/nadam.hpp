// NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam") with torch.optim.NAdam's
// momentum schedule mu_t = beta1 (1 - 0.96^(t psi) / 2), and decoupled weight decay (NAdamW).
#pragma once

#include <cmath>
#include <cstdint>

#include "../lanes.hpp"

namespace fusedopt {

template <typename Types>
struct NAdamKernel;

struct NAdam : NoCrossRule {
  static constexpr const char* name = "nadam";
  static constexpr const char* summary =
      "m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; "
      "param -= lr ((1-mu_t)/(1-prod mu_1..t) g + mu_t+1/(1-prod mu_1..t+1) m) / "
      "(sqrt(v/(1-b2^t)) + eps)";
  static constexpr std::array arrays{
      param_array(),
      grad_array(),
      state("exp_avg", "first moment m (start at zero)"),
      state("exp_avg_sq", "second moment v (start at zero)").never_negative(),
  };
  static constexpr std::array hyperparameters{
      hp::step(),
      hp::lr(2e-3),
      hp::beta1(0.9, "decay rate of the first moment"),
      hp::beta2(0.999, "decay rate of the second moment"),
      hp::eps(1e-8),
      hp::weight_decay(0.0, "weight decay coefficient (L2, or decoupled)"),
      real("momentum_decay", 4e-3, at_least(0.0), "momentum_decay value",
           "psi in the momentum schedule mu_t = beta1 (1 - 0.96^(t psi) / 2)"),
      real_or_none("mu_product", half_open(0.0, 1.0), "mu_product value",
                   "mu_1 ... mu_t, this step's factor included (torch's state mu_product after "
                   "the step); None: multiplied out from step with this call's beta1"),
      flag("decoupled_weight_decay", false, "AdamW's decay instead of an L2 term in the gradient"),
      hp::maximize(),
  };
  template <typename Types>
  using Kernel = NAdamKernel<Types>;
};

// mu_t, as torch.optim.NAdam computes it.
inline double nadam_mu(double beta1, double momentum_decay, double step) {
  return beta1 * (1.0 - 0.5 * std::pow(0.96, step * momentum_decay));
}

// mu_1 mu_2 ... mu_t, multiplied in this order as torch accumulates its state mu_product, with
// two shortcuts that bound the loop (fusedopt.reference._nadam_mu_product takes the same):
// below 2^-54 the product no longer matters (1 - product rounds to 1 whatever follows), and
// once mu_i is beta1 itself (0.96^(i psi) under 2^-53) it stays so: the rest is one pow.
inline double nadam_mu_product(double beta1, double momentum_decay, std::int64_t step) {
  double product = 1.0;
  for (std::int64_t i = 1; i <= step; ++i) {
    const double factor = 1.0 - 0.5 * std::pow(0.96, static_cast<double>(i) * momentum_decay);
    if (factor == 1.0) return product * std::pow(beta1, static_cast<double>(step - i + 1));
    product *= beta1 * factor;
    if (product <= 0x1p-54) return product;
  }
  return product;
}

// Matches fusedopt.reference.nadam_ (mu_t, mu_t+1, the products and bias correction in double,
// once per call; mu_product, if not given, is nadam_mu_product's):
//   g = -grad if maximize else grad
//   if decoupled_weight_decay: param *= 1 - lr * weight_decay
//   elif weight_decay: g = g + weight_decay * param
//   exp_avg = beta1 * exp_avg + (1 - beta1) * g
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
//   denom = sqrt(exp_avg_sq / (1 - beta2**step)) + eps
//   param -= (grad_step * g + avg_step * exp_avg) / denom
// with grad_step = lr (1 - mu_t) / (1 - mu_product), avg_step = lr mu_t+1 / (1 - mu_product
// mu_t+1).
template <typename Types>
struct NAdamKernel {
  using T = typename Types::Compute;
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;

  template <typename Decl>
  explicit NAdamKernel(const Values<Decl>& h) {
    const double lr = h.real("lr"), b1 = h.real("beta1"), b2 = h.real("beta2");
    const double wd = h.real("weight_decay"), psi = h.real("momentum_decay");
    const std::int64_t t = h.step();
    const auto step = static_cast<double>(t);
    // as an unsigned sum: step may be 2**63 - 1
    const auto step_next = static_cast<double>(static_cast<std::uint64_t>(t) + 1U);
    const bool decoupled = h.flag("decoupled_weight_decay");
    maximize = Negation<T>(h.flag("maximize"));
    decay = T(decoupled ? 1.0 - lr * wd : 1.0);
    l2 = Coefficient<T>(decoupled ? 0.0 : wd);
    beta1 = T(b1);
    one_minus_beta1 = T(1.0 - b1);
    beta2 = T(b2);
    one_minus_beta2 = T(1.0 - b2);
    eps = T(h.real("eps"));
    const double mu = nadam_mu(b1, psi, step), mu_next = nadam_mu(b1, psi, step_next);
    // given where beta1 changed during training (torch multiplies each step's mu_t into its
    // state): a product from this call's beta1 alone would differ
    const double product =
        h.given("mu_product") ? h.real("mu_product") : nadam_mu_product(b1, psi, t);
    grad_step = T(lr * (1.0 - mu) / (1.0 - product));
    avg_step = T(lr * mu_next / (1.0 - product * mu_next));
    bias_correction2 = T(1.0 - std::pow(b2, step));
  }

  // param * 1 is exact, so decay is applied whether decoupled or not (as in Adam).
  void operator()(void* const* a, Index offset, Index n, const Rounding& rounding) const {
    P* const param = role<P>(a, 0, offset);
    const G* const grad = role<const G>(a, 1, offset);
    S* const exp_avg = role<S>(a, 2, offset);
    S* const exp_avg_sq = role<S>(a, 3, offset);
    const NAdamKernel constants = *this;
    with_flags(
        [&](auto has_l2) FUSEDOPT_INLINE_LAMBDA {
          for_each_lane<Types>(rounding, n, [&](auto& lane) FUSEDOPT_INLINE_LAMBDA {
            constants.step<has_l2.value>(lane, param, grad, exp_avg, exp_avg_sq);
          });
        },
        l2.on);
  }

  template <bool has_l2, typename Lane>
  FUSEDOPT_INLINE void step(Lane& lane, P* param, const G* grad, S* exp_avg, S* exp_avg_sq) const {
    const auto p = lane.load(param);
    const auto g = effective_grad<has_l2>(maximize, lane.load(grad), p, l2.value);
    const auto m = beta1 * lane.load(exp_avg) + one_minus_beta1 * g;
    const auto v = beta2 * lane.load(exp_avg_sq) + one_minus_beta2 * g * g;
    lane.store(1, exp_avg, m);
    lane.store(2, exp_avg_sq, v);
    lane.store(0, param,
               p * decay - (grad_step * g + avg_step * m) / (sqrt(v / bias_correction2) + eps));
  }

  Coefficient<T> l2;
  T decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, grad_step, avg_step,
      bias_correction2;
  Negation<T> maximize{false};
};

namespace header::nadam {
using declares = List<NAdam>;
}

}  // namespace fusedopt
