// Adafactor's step (Shazeer & Stern 2018, as torch.optim.Adafactor in torch 2.13), compiled into
// every SIMD level's kernel library beside level.cpp. Its update needs reductions before and
// after the element-wise formula (the param's norm, the gradient's row and column sums of
// squares, the update's norm), so it is three passes over the tensor rather than one:
//   A. ||param||^2 in fixed chunks; sum_j g_ij^2 per row (8 lanes, utility.hpp's order);
//      sum_i g_ij^2 per column (rows in order); then, once, the factored moments
//      r = lerp(r, rowsum / C, w), c = lerp(c, colsum / R, w) and mean(r);
//   B. u = g / sqrt(max(r_i c_j / max(mean(r), eps1), eps1^2)) (a vector: v = lerp(v, g^2, w),
//      u = g / sqrt(max(v, eps1^2))), and ||u||^2 in fixed chunks;
//   C. param = param (1 - lr wd) - alpha / max(1, ||u|| / (sqrt(n) d)) u, u recomputed.
// Every sum is in double, in an order fixed by the shape alone: bit-identical for every thread
// count, and equal to fusedopt.reference.adafactor_, which sums in the same orders. With float32
// masters `param` is the master (its norm, its update) and the low-precision param its copy,
// written rounded in pass C; a bfloat16 param is rounded to nearest even or stochastically, with
// the element-wise kernels' random bits of (seed, step, tensor, element) (slot 0). The moments
// are float32: factored they are about 0 bytes per element, so narrower ones would save nothing.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "export.hpp"
#include "kernels/lanes.hpp"  // store_param_copy (includes common.hpp)
#include "kernels/utility.hpp"
#include "parallel.hpp"

namespace fusedopt {
namespace {

using parallel::parallel_for;

// The arguments of one call, as fusedopt/_matrix.py passes them (ctypes structure). A
// factored tensor is `batch` matrices of rows x cols (C order); a vector is 1 x 1 x size.
struct AdafactorCall {
  void* param;
  const void* grad;
  void* row_var;   // batch x rows, factored only
  void* col_var;   // batch x cols, factored only
  void* variance;  // size, vectors only
  std::int64_t batch, rows, cols;
  std::int32_t factored;
  std::int32_t param_dtype, grad_dtype;  // 0 float32, 1 float64, 2 bfloat16, 3 float16
  double decay;                          // 1 - lr * weight_decay
  double rho;                            // min(lr, 1 / sqrt(step))
  double weight;                         // step ** beta2_decay: the moments' lerp weight
  double eps1, eps2, d;
  std::int32_t maximize;
  std::int32_t threads;
  void* param_copy;         // with float32 masters in param: the low-precision param, else null
  std::int32_t copy_dtype;  // param_copy's: 2 bfloat16, 3 float16
  std::int32_t stochastic;  // round a bfloat16 param stochastically
  std::uint64_t seed, step, tensor;  // the random bits' key: tensor_key(seed, step, tensor)
};

// torch's lerp(start, end, w) for one element (see matrix.cpp).
template <typename T>
T lerp(T start, T end, double w) {
  return std::abs(w) < 0.5 ? start + T(w) * (end - start) : end - (end - start) * T(1.0 - w);
}

template <typename T, typename P, typename G>
void adafactor_step(const AdafactorCall& call) {
  const Index rows = call.rows, cols = call.cols, matrix = rows * cols;
  const Index size = call.batch * matrix;
  const Index chunks = (size + kChunk - 1) / kChunk;
  P* const param = static_cast<P*>(call.param);
  const G* const grad = static_cast<const G*>(call.grad);
  T* const row_var = static_cast<T*>(call.row_var);
  T* const col_var = static_cast<T*>(call.col_var);
  T* const variance = static_cast<T*>(call.variance);
  const bool factored = call.factored != 0;
  const T eps1 = T(call.eps1), eps1_squared = T(call.eps1 * call.eps1);
  // the gradient negated before anything else, as the reference does: its squares' NaNs too
  const Negation<T> maximize(call.maximize != 0);
  const Negation<double> negate_sums(call.maximize != 0);
  std::vector<double> partial(static_cast<std::size_t>(chunks));

  // A: the param's norm, and the factored moments
  parallel_for(chunks, call.threads, [&](Index k) {
    const Index begin = k * kChunk;
    partial[static_cast<std::size_t>(k)] =
        sum_squares(std::min(kChunk, size - begin), param + begin);
  });
  double param_squares = 0;
  for (const double p : partial) param_squares += p;
  std::vector<T> row_denominator(static_cast<std::size_t>(call.batch));
  if (factored) {
    std::vector<double> row_sums(static_cast<std::size_t>(call.batch * rows));
    std::vector<double> col_sums(static_cast<std::size_t>(call.batch * cols), 0.0);
    parallel_for(call.batch * rows, call.threads, [&](Index r) {
      row_sums[static_cast<std::size_t>(r)] = sum_squares(cols, grad + r * cols, negate_sums);
    });
    constexpr Index kColumns = 256;
    const Index col_blocks = (cols + kColumns - 1) / kColumns;
    parallel_for(call.batch * col_blocks, call.threads, [&](Index k) {
      const Index b = k / col_blocks, j0 = k % col_blocks * kColumns;
      const Index j1 = std::min(cols, j0 + kColumns);
      double* const sums = col_sums.data() + b * cols;
      for (Index i = 0; i < rows; ++i) {
        const G* const row = grad + b * matrix + i * cols;
#pragma omp simd
        for (Index j = j0; j < j1; ++j) {
          const double v = negate_sums(static_cast<double>(load<T>(row[j])));
          sums[j] += v * v;
        }
      }
    });
    for (Index b = 0; b < call.batch; ++b) {
      double row_total = 0;
      for (Index i = 0; i < rows; ++i) {
        const Index at = b * rows + i;
        const T mean = T(row_sums[static_cast<std::size_t>(at)] / static_cast<double>(cols));
        row_var[at] = lerp(row_var[at], mean, call.weight);
        row_total += static_cast<double>(row_var[at]);
      }
      for (Index j = 0; j < cols; ++j) {
        const Index at = b * cols + j;
        const T mean = T(col_sums[static_cast<std::size_t>(at)] / static_cast<double>(rows));
        col_var[at] = lerp(col_var[at], mean, call.weight);
      }
      row_denominator[static_cast<std::size_t>(b)] =
          std::max(T(row_total / static_cast<double>(rows)), eps1);
    }
  }
  // u of elements [begin, begin + n) into out, a row's run at a time (vectorized); the
  // variance updated on the first pass
  const auto update = [&](Index begin, Index n, bool first, T* out) {
    // locals, not captures: a captured T is read through a pointer that a store to out may
    // alias, which stops the loops below from being vectorized
    const Negation<T> negate = maximize;
    const T floor = eps1_squared;
    if (factored) {
      Index b = begin / matrix, i = begin % matrix / cols, j = begin % cols;
      for (Index k = 0; k < n;) {
        const Index run = std::min(n - k, cols - j);
        const T r = row_var[b * rows + i],
                denominator = row_denominator[static_cast<std::size_t>(b)];
        const T* const c = col_var + b * cols + j;
        const G* const g = grad + begin + k;
        T* const u = out + k;
#pragma omp simd
        for (Index x = 0; x < run; ++x) {
          const T v = r * c[x] / denominator;
          u[x] = negate(load<T>(g[x])) / std::sqrt(std::max(v, floor));
        }
        k += run;
        j = 0;
        if (++i == rows) {
          i = 0;
          ++b;
        }
      }
    } else if (first) {
      const G* const g = grad + begin;
      T* const v = variance + begin;
      // lerp's two formulas (see lerp), chosen once: a branch on w in the loop would stop it
      // being vectorized
      const bool near_start = std::abs(call.weight) < 0.5;
      const T w = T(call.weight), one_minus_w = T(1.0 - call.weight);
#pragma omp simd
      for (Index x = 0; x < n; ++x) {
        const T gx = negate(load<T>(g[x]));
        const T start = v[x], end = gx * gx, difference = end - start;
        const T averaged = near_start ? start + w * difference : end - difference * one_minus_w;
        v[x] = averaged;
        out[x] = gx / std::sqrt(std::max(averaged, floor));
      }
    } else {
      const G* const g = grad + begin;
      const T* const v = variance + begin;
#pragma omp simd
      for (Index x = 0; x < n; ++x) {
        out[x] = negate(load<T>(g[x])) / std::sqrt(std::max(v[x], floor));
      }
    }
  };
  // B: the update's norm
  parallel_for(chunks, call.threads, [&](Index k) {
    T u[kChunk];
    const Index begin = k * kChunk, n = std::min(kChunk, size - begin);
    update(begin, n, true, u);
    partial[static_cast<std::size_t>(k)] = sum_squares(n, u);
  });
  double update_squares = 0;
  for (const double p : partial) update_squares += p;
  const double numel_root = std::sqrt(static_cast<double>(size));
  const double alpha = std::max(call.eps2, std::sqrt(param_squares) / numel_root) * call.rho;
  const double denominator = std::max(1.0, std::sqrt(update_squares) / (numel_root * call.d));
  const T step = T(alpha / denominator), decay = T(call.decay);
  // C: the param
  const std::uint64_t key = tensor_key(call.seed, call.step, call.tensor);
  parallel_for(chunks, call.threads, [&](Index k) {
    T u[kChunk];
    const Index begin = k * kChunk, n = std::min(kChunk, size - begin);
    update(begin, n, false, u);
    P* const p = param + begin;
    const Rounding rounding{call.stochastic != 0, key, begin};
    with_rounding<Storage<T, P, G, T>>(rounding, [&](const auto& out) {
      const T d = decay, s = step;  // locals: captures would be reloaded after each store
#pragma omp simd
      for (ChunkIndex i = 0; i < n; ++i) out(i, 0, p[i], load<T>(p[i]) * d - s * u[i]);
    });
    if constexpr (std::is_same_v<P, float>) {
      if (call.param_copy != nullptr) {
        store_param_copy(rounding, n, p, call.copy_dtype == 2,
                         static_cast<char*>(call.param_copy) + begin * 2);  // 2-byte elements
      }
    }
  });
}

template <typename P>
int dispatch(const AdafactorCall& call) {
  if (call.grad_dtype == call.param_dtype) {
    adafactor_step<float, P, P>(call);
  } else if (call.grad_dtype == 0) {
    adafactor_step<float, P, float>(call);
  } else {
    return 1;
  }
  return 0;
}

// float32 masters of a bfloat16 or float16 param: the grad in the param's dtype or float32.
int dispatch_masters(const AdafactorCall& call) {
  if (call.grad_dtype != 0 && call.grad_dtype != call.copy_dtype) return 1;
  switch (call.grad_dtype) {
    case 0: adafactor_step<float, float, float>(call); return 0;
    case 2: adafactor_step<float, float, Eigen::bfloat16>(call); return 0;
    case 3: adafactor_step<float, float, Eigen::half>(call); return 0;
    default: return 1;
  }
}

}  // namespace
}  // namespace fusedopt

// Returns 0 on success, 1 for a storage combination this library was not built for. The
// moments are float32 (float64 for a float64 param).
extern "C" FUSEDOPT_EXPORT int fusedopt_adafactor_step(const fusedopt::AdafactorCall* call) {
  using namespace fusedopt;
  if (call->param_copy != nullptr) return call->param_dtype == 0 ? dispatch_masters(*call) : 1;
  switch (call->param_dtype) {
    case 0: return dispatch<float>(*call);
    case 1:
      if (call->grad_dtype != 1) return 1;
      adafactor_step<double, double, double>(*call);
      return 0;
    case 2: return dispatch<Eigen::bfloat16>(*call);
    case 3: return dispatch<Eigen::half>(*call);
    default: return 1;
  }
}
