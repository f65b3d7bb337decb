// Muon's step (Jordan et al. 2024, as torch.optim.Muon), compiled into every SIMD level's kernel
// library beside level.cpp. Unlike the element-wise kernels its core is matrix products, which
// are compute-bound: they need the level's widest FMA (a GEMM built for the binding's baseline
// runs at a fraction of the peak), so this file lives in the level libraries, and they need all
// cores within each product, so this file alone opens OpenMP parallel regions there. The thread
// count comes from the caller (fusedopt.get_num_threads()).
//
// One call updates one 2-D tensor in three passes:
//   1. element-wise: momentum_buffer = lerp(buf, grad, 1 - momentum), stored rounded once;
//      U = lerp(grad, buf, momentum) (Nesterov) or buf, unrounded, in the compute type T;
//   2. X = U (transposed if rows > cols) / max(||U||_F, eps), then ns_steps Newton-Schulz steps
//      A = X X^T; B = b A + c A A; X = a X + B X, with Eigen's products in T;
//   3. element-wise: param = param * (1 - lr wd) - adjusted_lr * X, rounded once on store.
// Storage as for the element-wise kernels (common.hpp): with float32 masters `param` is the
// master and the low-precision param its copy, written rounded in pass 3; an int8 momentum
// buffer (signed codes, quantize.hpp) is decoded per chunk in pass 1 and encoded back; what is
// stored in bfloat16 is rounded to nearest even or stochastically, with the random bits of
// (seed, tensor, element) of the element-wise kernels (param slot 0, the buffer slot 1).
// The Frobenius norm is a sum of squares in double over fixed chunks (utility.hpp), and every
// product is computed in fixed tiles, each by one thread with Eigen's single-threaded GEMM:
// results are bit-identical for every thread count. fusedopt.reference.muon_ computes the same
// operations with NumPy's matmul, whose summation order differs: the products agree to
// rounding, the element-wise passes and the norm bit for bit.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "export.hpp"
#include "kernels/lanes.hpp"  // store_param_copy (includes common.hpp)
#include "kernels/quantize.hpp"
#include "kernels/utility.hpp"
#include "parallel.hpp"

namespace fusedopt {
namespace {

using parallel::parallel_for;

// The arguments of one call, as fusedopt/_matrix.py passes them (ctypes structure).
struct MuonCall {
  void* param;
  const void* grad;
  void* momentum_buffer;
  std::int64_t rows, cols;
  std::int32_t c_order;  // 1: C order, 0: Fortran order (every array alike)
  // 0 float32, 1 float64, 2 bfloat16, 3 float16; state 4: int8 codes with float32 `scales`
  std::int32_t param_dtype, grad_dtype, state_dtype;
  double decay;     // 1 - lr * weight_decay
  double step;      // the adjusted learning rate
  double momentum;  // mu
  double a, b, c;   // Newton-Schulz coefficients
  double eps;       // lower bound of the norm
  std::int32_t nesterov;
  std::int32_t ns_steps;
  std::int32_t threads;
  void* param_copy;         // with float32 masters in param: the low-precision param, else null
  std::int32_t copy_dtype;  // param_copy's: 2 bfloat16, 3 float16
  std::int32_t stochastic;  // round what is stored in bfloat16 stochastically
  void* scales;             // an int8 momentum buffer's block scales, else null
  std::uint64_t seed;       // the random bits' key: tensor_key(seed, 0, tensor)
  std::uint64_t tensor;     // the tensor's place in its call
};

// Tiles of a product's result, fixed by its shape alone. 128 x 256 outputs: every tile is a
// GEMM large enough for Eigen's kernel (its packing of 384 x k operands is 1/170 of its flops).
constexpr Index kTileRows = 128, kTileCols = 256;

template <typename Fn>
void for_each_tile(Index rows, Index cols, int threads, const Fn& fn) {
  const Index row_tiles = (rows + kTileRows - 1) / kTileRows;
  const Index col_tiles = (cols + kTileCols - 1) / kTileCols;
  parallel_for(row_tiles * col_tiles, threads, [&](Index k) {
    const Index i = k / col_tiles * kTileRows, j = k % col_tiles * kTileCols;
    fn(i, j, std::min(kTileRows, rows - i), std::min(kTileCols, cols - j));
  });
}

template <typename T>
using Square = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Newton-Schulz on X (m x n, m <= n, stored in `order`), in place through `next`: returns the
// buffer that holds the result (x or next), in X's layout.
template <typename T, int order>
T* newton_schulz(T* x, T* next, Index m, Index n, const MuonCall& call) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, order>;
  using Map = Eigen::Map<Mat>;
  Square<T> gram(m, m), poly(m, m);
  const T a = T(call.a), b = T(call.b), c = T(call.c);
  for (int s = 0; s < call.ns_steps; ++s) {
    const Map X(x, m, n);
    Map Y(next, m, n);
    for_each_tile(m, m, call.threads, [&](Index i, Index j, Index h, Index w) {
      gram.block(i, j, h, w).noalias() = X.middleRows(i, h) * X.middleRows(j, w).transpose();
    });
    for_each_tile(m, m, call.threads, [&](Index i, Index j, Index h, Index w) {
      auto tile = poly.block(i, j, h, w);
      tile.noalias() = gram.middleRows(i, h) * gram.middleCols(j, w);
      tile = b * gram.block(i, j, h, w) + c * tile;
    });
    for_each_tile(m, n, call.threads, [&](Index i, Index j, Index h, Index w) {
      auto tile = Y.block(i, j, h, w);
      tile.noalias() = poly.middleRows(i, h) * X.middleCols(j, w);
      tile = a * X.block(i, j, h, w) + tile;
    });
    std::swap(x, next);
  }
  return x;
}

template <typename T, typename P, typename G, typename S>
void muon_step(const MuonCall& call) {
  using Types = Storage<T, P, G, S>;
  Eigen::setNbThreads(1);  // the tiles are the parallelism: no nested teams inside a product
  const Index size = call.rows * call.cols;
  const Index chunks = (size + kChunk - 1) / kChunk;
  std::vector<T> u(static_cast<std::size_t>(size)), next(static_cast<std::size_t>(size));
  std::vector<double> partial(static_cast<std::size_t>(chunks));
  P* const param = static_cast<P*>(call.param);
  const G* const grad = static_cast<const G*>(call.grad);
  const std::uint64_t key = tensor_key(call.seed, 0, call.tensor);
  // torch's lerp(start, end, w): start + w (end - start) for |w| < 0.5, else
  // end - (end - start) (1 - w); the weights in double, once per call.
  const double w = 1.0 - call.momentum;
  const bool small_w = std::abs(w) < 0.5, small_mu = std::abs(call.momentum) < 0.5;
  const T to_grad = T(w), to_grad_rest = T(1.0 - w);
  const T to_buf = T(call.momentum), to_buf_rest = T(1.0 - call.momentum);
  const bool nesterov = call.nesterov != 0;
  T* const U = u.data();
  // n elements from `begin`: the buffer (b, slot 1) and U
  const auto momentum = [&](Index begin, Index n, const auto& out, auto* b) {
    const G* const g_at = grad + begin;
    T* const u_at = U + begin;
    for (ChunkIndex i = 0; i < n; ++i) {
      const T g = load<T>(g_at[i]);
      const T old = load<T>(b[i]);
      const T m = small_w ? old + to_grad * (g - old) : g - (g - old) * to_grad_rest;
      out(i, 1, b[i], m);
      u_at[i] = !nesterov ? m : small_mu ? g + to_buf * (m - g) : m - (m - g) * to_buf_rest;
    }
  };
  parallel_for(chunks, call.threads, [&](Index k) {
    const Index begin = k * kChunk, n = std::min(kChunk, size - begin);
    const Rounding rounding{call.stochastic != 0, key, begin};
    bool done = false;
    if constexpr (std::is_same_v<S, float>) {
      if (call.scales != nullptr) {  // int8: staged as float32, encoded back with random bits
        alignas(64) float staged[kChunk];
        alignas(64) std::uint32_t bits[kChunk];
        auto* const codes = static_cast<std::uint8_t*>(call.momentum_buffer) + begin;
        float* const scales = static_cast<float*>(call.scales) + begin / kBlock;
        decode_chunk(true, codes, scales, n, staged);
        momentum(begin, n, Rounder<false>(rounding), staged);
        chunk_bits(key, begin, n, bits);
        encode_chunk(true, staged, n, codes, scales, bits, true);  // slot 1: the high 16 bits
        done = true;
      }
    }
    if (!done) {
      S* const b = static_cast<S*>(call.momentum_buffer) + begin;
      with_rounding<Types>(rounding, [&](const auto& out) { momentum(begin, n, out, b); });
    }
    partial[static_cast<std::size_t>(k)] = sum_squares(n, U + begin);
  });
  double total = 0;
  for (const double p : partial) total += p;
  const T scale = std::max(T(std::sqrt(total)), T(call.eps));
  parallel_for(chunks, call.threads, [&](Index k) {
    const Index begin = k * kChunk, end = std::min(size, begin + kChunk);
#pragma omp simd
    for (Index i = begin; i < end; ++i) U[i] = U[i] / scale;
  });
  // X = U or U^T, m <= n: a view of the same memory, row-major exactly when the param's order
  // and the transposition agree. The result comes back in the param's memory order.
  const bool transposed = call.rows > call.cols;
  const Index m = transposed ? call.cols : call.rows, n = transposed ? call.rows : call.cols;
  const T* const O = (call.c_order != 0) != transposed
                         ? newton_schulz<T, Eigen::RowMajor>(U, next.data(), m, n, call)
                         : newton_schulz<T, Eigen::ColMajor>(U, next.data(), m, n, call);
  const T decay = T(call.decay), step = T(call.step);
  parallel_for(chunks, call.threads, [&](Index k) {
    const Index begin = k * kChunk, count = std::min(kChunk, size - begin);
    const Rounding rounding{call.stochastic != 0, key, begin};
    P* const p = param + begin;
    const T* const o = O + begin;
    with_rounding<Types>(rounding, [&](const auto& out) {
      const T d = decay, s = step;  // locals: captures would be reloaded after each store
#pragma omp simd
      for (ChunkIndex i = 0; i < count; ++i) out(i, 0, p[i], load<T>(p[i]) * d - s * o[i]);
    });
    if constexpr (std::is_same_v<P, float>) {
      if (call.param_copy != nullptr) {
        store_param_copy(rounding, count, p, call.copy_dtype == 2,
                         static_cast<char*>(call.param_copy) + begin * 2);  // 2-byte elements
      }
    }
  });
}

using F32 = float;
using F64 = double;
using BF16 = Eigen::bfloat16;
using F16 = Eigen::half;

// The storage combinations fusedopt/_matrix.py accepts: float64 alone; otherwise the grad in the
// param's dtype (with masters: the low-precision copy's) or float32, the momentum buffer in
// float32, bfloat16 or int8 (computed as float32).
template <typename P, typename G>
bool dispatch_state(const MuonCall& call) {
  if ((call.state_dtype == 4) != (call.scales != nullptr)) return false;
  switch (call.state_dtype) {
    case 0:
    case 4: muon_step<float, P, G, F32>(call); return true;
    case 2: muon_step<float, P, G, BF16>(call); return true;
    default: return false;
  }
}

template <typename P>
bool dispatch_low(const MuonCall& call) {
  if (call.grad_dtype == 0) return dispatch_state<P, F32>(call);
  if (call.grad_dtype == call.param_dtype) return dispatch_state<P, P>(call);
  return false;
}

bool dispatch_masters(const MuonCall& call) {
  if (call.param_copy == nullptr) return dispatch_low<F32>(call);
  if (call.grad_dtype != 0 && call.grad_dtype != call.copy_dtype) return false;
  switch (call.grad_dtype) {
    case 0: return dispatch_state<F32, F32>(call);
    case 2: return dispatch_state<F32, BF16>(call);
    case 3: return dispatch_state<F32, F16>(call);
    default: return false;
  }
}

}  // namespace
}  // namespace fusedopt

// Returns 0 on success, 1 for a storage combination this library was not built for.
extern "C" FUSEDOPT_EXPORT int fusedopt_muon_step(const fusedopt::MuonCall* call) {
  using namespace fusedopt;
  if (call->param_copy != nullptr && call->param_dtype != 0) return 1;
  switch (call->param_dtype) {
    case 0: return dispatch_masters(*call) ? 0 : 1;
    case 1:
      if (call->grad_dtype != 1 || call->state_dtype != 1) return 1;
      muon_step<double, F64, F64, F64>(*call);
      return 0;
    case 2: return dispatch_low<BF16>(*call) ? 0 : 1;
    case 3: return dispatch_low<F16>(*call) ? 0 : 1;
    default: return 1;
  }
}
