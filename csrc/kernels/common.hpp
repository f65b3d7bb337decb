// Shared pieces of every kernel: how arrays are stored and loaded, the gradient transform that all
// optimizers share, and the walk over (tensor, chunk) pieces. Pure C++, no Python.
#pragma once

#include <Eigen/Core>  // Eigen::bfloat16, Eigen::half: conversions that round to nearest even
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__F16C__) || (defined(_MSC_VER) && defined(__AVX2__))
#include <immintrin.h>
#endif

#include "declaration.hpp"

namespace fusedopt {

using Index = std::ptrdiff_t;

// Told, after a parallel region, how long after it opened its last thread started (ns): the
// binding's late-worker rule (bindings.cpp, "Cores that other threads hold").
using RegionObserver = void (*)(std::int64_t latest_start_delay_ns);

// For the per-element helpers that the kernels' loops call: a loop vectorizes only if they are
// inlined, and with every kernel, storage row and flag combination in one file GCC's inlining
// budget runs out and outlines some (a call per element, seen as a 10x slower step).
#if defined(__GNUC__)
#define FUSEDOPT_INLINE inline __attribute__((always_inline))
#define FUSEDOPT_INLINE_LAMBDA __attribute__((always_inline))
#elif defined(_MSC_VER)
#define FUSEDOPT_INLINE __forceinline
#define FUSEDOPT_INLINE_LAMBDA
#else
#define FUSEDOPT_INLINE inline
#define FUSEDOPT_INLINE_LAMBDA
#endif

// Elements per chunk: the unit in which threads split the work and reductions combine partial
// results. Small enough to balance many small tensors, large enough that the per-chunk
// overhead vanishes (2048 measured best of 512 ... 16384).
inline constexpr Index kChunk = 2048;
// The index of a loop over one chunk, where it rounds what it stores (Rounder): 32 bits, since
// the stochastic rounding's counter is a 32-bit function of it. GCC computes that function of
// a 64-bit loop index in 64-bit lanes and narrows it with lane-crossing shuffles, spilling
// registers besides (bench/results/low_precision.md has what that cost).
using ChunkIndex = std::int32_t;
static_assert(kChunk <= INT32_MAX, "a chunk's index fits ChunkIndex");

// How a kernel's arrays are stored and what its arithmetic runs in. A kernel loads each element
// with load<Compute>, runs its formula in Compute and rounds once with store: so a low-precision
// array gives exactly the compute type's result, rounded. Conversions to bfloat16 and float16
// are Eigen's, which round to nearest even (ties to even, NaN stays NaN), as ml_dtypes and
// NumPy round.
template <typename C, typename P, typename G, typename S>
struct Storage {
  using Compute = C;
  using Param = P;
  using Grad = G;
  using State = S;
};
template <typename T>
using Uniform = Storage<T, T, T, T>;

template <typename Compute, typename Stored>
FUSEDOPT_INLINE Compute load(Stored x) {
  return static_cast<Compute>(x);
}
// bfloat16 to float32 is exact: its 16 bits are the float's high half. Written as a shift so
// that it vectorizes.
template <typename Compute>
FUSEDOPT_INLINE Compute load(Eigen::bfloat16 x) {
  const std::uint32_t u = static_cast<std::uint32_t>(Eigen::numext::bit_cast<std::uint16_t>(x))
                          << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return static_cast<Compute>(f);
}
template <typename Stored, typename Compute>
FUSEDOPT_INLINE void store(Stored& to, Compute x) {
  to = static_cast<Stored>(x);
}

// An element of an int8 state staged as float32 (csrc/level.cpp), as a kernel sees it: its value,
// and kCodePiece elements further on, as a float's bits, the 16 random bits that encode it again
// (Rounder::term_bits). The kernel's store computes them: its loop waits on the divider (sqrt
// and division), and their integer arithmetic runs beside it there, where a loop of their own
// took a sixth of the pipeline (bench/results/low_precision.md).
struct StagedCode {
  float value;
};
// The elements of a chunk that a quantized state's pipeline (decode, step, encode) runs at once:
// the param and grad then stream through the whole pipeline, not only through its step.
inline constexpr Index kCodePiece = 512;
template <typename Compute>
FUSEDOPT_INLINE Compute load(StagedCode x) {
  return static_cast<Compute>(x.value);
}
// Only a Rounder stores one, bits and all.
template <typename Compute>
void store(StagedCode& to, Compute x) = delete;

// float16 by integer arithmetic, branch-free, so that it vectorizes at every SIMD level (GCC
// has no vector type for _Float16 without AVX512-FP16, so F16C's one-element conversions were
// all it emitted). Bit for bit NumPy's conversions: to nearest even, NaN payloads kept.
FUSEDOPT_INLINE std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
FUSEDOPT_INLINE float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// Loops select with such masks, not branches or ternaries, so that GCC vectorizes them at every
// SIMD level.
FUSEDOPT_INLINE std::uint32_t all_ones_if(bool condition) {
  return 0U - static_cast<std::uint32_t>(condition);
}
FUSEDOPT_INLINE float half_to_float(std::uint16_t h) {
  const std::uint32_t shifted = (h & 0x7FFFU) << 13;  // exponent and mantissa in float's place
  const std::uint32_t normal = shifted + ((127U - 15U) << 23);
  // a subnormal as the normal with the smallest exponent, less that power of two (exact)
  const std::uint32_t subnormal =
      float_bits(bits_float(shifted + (113U << 23)) - bits_float(113U << 23));
  const std::uint32_t special = shifted | 0x7F800000U;  // inf, or NaN with its payload
  const std::uint32_t is_subnormal = all_ones_if(shifted < (1U << 23));
  const std::uint32_t is_special = all_ones_if(shifted >= (31U << 23));
  const std::uint32_t bits =
      (normal & ~(is_subnormal | is_special)) | (subnormal & is_subnormal) | (special & is_special);
  return bits_float(bits | (static_cast<std::uint32_t>(h & 0x8000U) << 16));
}
FUSEDOPT_INLINE std::uint16_t float_to_half(float x) {
  const std::uint32_t u = float_bits(x), a = u & 0x7FFFFFFFU;
  // rounded at bit 13 to nearest even and rebiased; a carry into the exponent, or up to inf,
  // is the right result
  const std::uint32_t normal = (a + 0xFFFU + ((a >> 13) & 1U) - ((127U - 15U) << 23)) >> 13;
  // below the smallest normal, adding 0.5 makes the FPU round at the subnormal step 2^-24
  const std::uint32_t subnormal = float_bits(bits_float(a) + 0.5F) - float_bits(0.5F);
  const std::uint32_t payload = (a >> 13) & 0x3FFU;
  const std::uint32_t nan = 0x7C00U | payload | (all_ones_if(payload == 0) & 1U);  // stays NaN
  const std::uint32_t is_subnormal = all_ones_if(a < (113U << 23));
  const std::uint32_t is_large = all_ones_if(a >= (143U << 23));  // rounds to inf at least
  const std::uint32_t is_nan = all_ones_if(a > 0x7F800000U);
  std::uint32_t h =
      (normal & ~(is_subnormal | is_large)) | (subnormal & is_subnormal) | (0x7C00U & is_large);
  h = (h & ~is_nan) | (nan & is_nan);
  return static_cast<std::uint16_t>(h | ((u >> 16) & 0x8000U));
}
template <typename Compute>
FUSEDOPT_INLINE Compute load(Eigen::half x) {
  return static_cast<Compute>(half_to_float(Eigen::numext::bit_cast<std::uint16_t>(x)));
}
template <typename Compute>
FUSEDOPT_INLINE void store(Eigen::half& to, Compute x) {
  to = Eigen::numext::bit_cast<Eigen::half>(float_to_half(static_cast<float>(x)));
}

// Whole chunks of float16: through F16C, eight elements an instruction, where the level has it
// (the kernels' loops then run on float32 copies: cheaper than the integer conversions above).
// F16C quiets a signaling NaN where NumPy keeps it, which no result can show: every stored
// value comes out of the formula's arithmetic, which quiets NaNs itself.
#if defined(__F16C__) || (defined(_MSC_VER) && defined(__AVX2__))
#define FUSEDOPT_F16C 1
inline void halves_to_floats(const Eigen::half* in, Index n, float* out) {
  Index i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  for (; i < n; ++i) out[i] = load<float>(in[i]);
}
inline void floats_to_halves(const float* in, Index n, Eigen::half* out) {
  Index i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(out + i),
        _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) store(out[i], in[i]);
}
#else
#define FUSEDOPT_F16C 0
inline void halves_to_floats(const Eigen::half* in, Index n, float* out) {
#pragma omp simd
  for (Index i = 0; i < n; ++i) out[i] = load<float>(in[i]);
}
inline void floats_to_halves(const float* in, Index n, Eigen::half* out) {
#pragma omp simd
  for (Index i = 0; i < n; ++i) store(out[i], in[i]);
}
#endif

// The quiet NaN of the sign of float bits u, as Eigen's (and so ml_dtypes') conversion makes a
// NaN. U is std::uint32_t or a GCC vector of them (a vector lane's RegisterBits), as for
// nearest_even_below below: the scalar loops and the vector lanes round with one text.
template <typename U>
FUSEDOPT_INLINE U quiet_nan_bits(U u) {
  return (u & 0x80000000U) | 0x7FC00000U;
}
// x rounded to bfloat16: its high 16 bits after below(its bits) is added to the low 16; a NaN
// becomes the quiet NaN of its sign. Branch-free, so that it vectorizes at every SIMD level.
template <typename Below>
FUSEDOPT_INLINE Eigen::bfloat16 round_to_bfloat16(float x, const Below& below) {
  const std::uint32_t u = float_bits(x);
  const std::uint32_t nan = quiet_nan_bits(u);
  const std::uint32_t rounded = x != x ? nan : u + below(u);
  return Eigen::numext::bit_cast<Eigen::bfloat16>(static_cast<std::uint16_t>(rounded >> 16));
}

// What rounding to nearest, ties to even, adds below the bfloat16 bits of float bits u.
template <typename U>
FUSEDOPT_INLINE U nearest_even_below(U u) {
  return 0x7FFFU + ((u >> 16) & 1U);
}
// To nearest, ties to even: Eigen's (and so ml_dtypes') result.
template <typename Compute>
FUSEDOPT_INLINE void store(Eigen::bfloat16& to, Compute x) {
  to = round_to_bfloat16(static_cast<float>(x),
                         [](std::uint32_t u) { return nearest_even_below(u); });
}

// Random bits for stochastic rounding. Per tensor, a 64-bit key from (seed, step, tensor index)
// by SplitMix64's output function (Steele et al. 2014); per element, 32 bits for array slots 0-1
// (half 0): MurmurHash3's finalizer of the element's term of a Weyl sequence that starts at the
// key's low 32 bits, as SplitMix builds its outputs (weyl_term). Slots 2-3 (half 1) take a
// cheaper remix of those 32 bits (folded_product). 16 bits for each array written, in 32-bit
// arithmetic, so that it vectorizes on every SIMD level. The bits of an element are a pure
// function of (seed, step, tensor, element index): the same for every thread count and
// chunking, and reproducible. fusedopt.reference computes the same. The finalizer alone leaves
// neighbours' bits dependent, and a lower-bias two-round hash alone those of elements 16-8192
// apart (tests/test_kernels.py): the Weyl step's multiply is needed. The vector lanes,
// for_each_lane's loops, chunk_bits and store_param_copy add it instead; other loops multiply
// (Rounder::term).
inline constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
// fmix32, folded_product and slot_bits take std::uint32_t or a GCC vector of them: the vector
// lanes (lanes.hpp) hash 16 or 8 terms at once with the scalar loops' text.
template <typename U>
FUSEDOPT_INLINE U fmix32(U h) {
  h ^= h >> 16;
  h *= 0x85EBCA6BU;
  h ^= h >> 13;
  h *= 0xC2B2AE35U;
  return h ^ (h >> 16);
}
// Half 1 from half 0: its halves folded (xor, which undoes fmix32's last shift) and multiplied
// by an odd constant. One multiply where a second fmix32 took two: the multiplies are most of
// what the random bits cost. A bijection of half 0, so each slot's 16 bits are uniform and every
// rounding unbiased. Slot 2's bits (the product's high half) depend on all 32 bits, with no
// measurable dependence on slot 0's or 1's (tests/test_kernels.py); slot 3's (the low half) are
// a bijection of slot 0's xor slot 1's: independent of each.
template <typename U>
FUSEDOPT_INLINE U folded_product(U half0) {
  return (half0 ^ (half0 >> 16)) * 0x7FEB352DU;
}
// The 16 random bits for array slot `slot` from half 0 (fmix32 of the element's Weyl term):
// slots 1 and 2 take the high halves of half 0 and half 1, slots 0 and 3 the low.
template <typename U>
FUSEDOPT_INLINE U slot_bits(U half0, int slot) {
  if (slot == 0) return half0 & 0xFFFFU;
  if (slot == 1) return half0 >> 16;
  const U product = folded_product(half0);
  return slot == 2 ? product >> 16 : product & 0xFFFFU;
}
// An element's 64-bit index folded to the 32-bit counter that is hashed. Within a chunk the high
// half is constant (chunks start at multiples of kChunk, which divides 2^32), so a loop folds
// its chunk's first index once and adds i in 32-bit lanes.
FUSEDOPT_INLINE std::uint32_t counter_of(std::uint64_t index) {
  return static_cast<std::uint32_t>(index) + static_cast<std::uint32_t>(index >> 32) * 0x27D4EB2FU;
}
static_assert((std::uint64_t{1} << 32) % static_cast<std::uint64_t>(kChunk) == 0,
              "a chunk never spans a multiple of 2^32");
// The Weyl sequence's step: 2^32 over the golden ratio, odd.
inline constexpr std::uint32_t kWeylStep = 0x9E3779B1U;
// The term that counter `counter` hashes: linear in the counter, so that a loop adds a constant
// per element where a multiply was (the multiplies are most of what the random bits cost).
FUSEDOPT_INLINE std::uint32_t weyl_term(std::uint64_t key, std::uint32_t counter) {
  return static_cast<std::uint32_t>(key) + counter * kWeylStep;
}
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
inline std::uint64_t splitmix(std::uint64_t x) { return mix64(x + kGolden); }

// How a call rounds what it stores: to nearest even, or stochastically with the call's seed
// and step. `key` is the tensor's (splitmix of seed, step and tensor index); `first` the
// chunk's first element in the tensor. And, where the chunk's loop prefetches, what (Ahead).
struct Ahead;
struct Rounding {
  bool stochastic = false;
  std::uint64_t key = 0;
  Index first = 0;
  const Ahead* ahead = nullptr;  // the chunk's arrays, where its loop prefetches (Ahead)
};

// Software prefetch, for the loops whose arithmetic is more than a few instructions per cache
// line: the vector lanes' (lanes.hpp) and int8 states' pipeline's, and the probe's for the same
// rows (csrc/level.cpp turns it on). There the hardware prefetchers alone leave the streams short
// of the bandwidth that a plain copy reaches, and on a shared machine at times far short: the
// loads wait on memory, where their latency could overlap the arithmetic. So every
// kPrefetchBlock elements such a loop prefetches each array's lines of the block kPrefetchAhead
// elements on, for writing where the kernel writes the array: a few prefetches spread through the
// loop, not a burst per chunk (bench/results/low_precision.md, "Software prefetch in the loops").
#if defined(__GNUC__)
#define FUSEDOPT_PREFETCH 1
#else
#define FUSEDOPT_PREFETCH 0  // no prefetch instruction named: the loops run as they did
#endif
inline constexpr ChunkIndex kPrefetchBlock = 128;
inline constexpr ChunkIndex kPrefetchAhead = 512;
inline constexpr std::size_t kMaxPrefetched = 7;  // a kernel's arrays and a param copy
struct Ahead {
  std::array<const char*, kMaxPrefetched> arrays{};  // the chunk's first element in each
  std::array<Index, kMaxPrefetched> sizes{};         // bytes per element
  std::array<bool, kMaxPrefetched> written{};
  std::size_t count = 0;
  Index available = 0;  // elements from the chunk's first to its tensor's end

  // Prefetches the block of kPrefetchBlock elements kPrefetchAhead after element i of the chunk.
  FUSEDOPT_INLINE void block(ChunkIndex i) const {
    const Index first = static_cast<Index>(i) + kPrefetchAhead;
    const Index n = std::min<Index>(kPrefetchBlock, available - first);
    if (n <= 0) return;  // past the tensor's end
#if FUSEDOPT_PREFETCH
    for (std::size_t a = 0; a < count; ++a) {
      const char* line = arrays[a] + first * sizes[a];
      for (Index b = 0; b < n * sizes[a]; b += 64) {
        if (written[a]) {
          __builtin_prefetch(line + b, 1, 3);
        } else {
          __builtin_prefetch(line + b, 0, 3);
        }
      }
    }
#endif
  }
};

// fn(first, end) over a chunk's n elements: at once, or, where the chunk's loop prefetches
// (rounding.ahead), block by block, each after its prefetches. One loop either way, so that the
// loop fn holds is compiled once.
template <typename Fn>
FUSEDOPT_INLINE void in_prefetched_blocks(const Rounding& rounding, Index n, const Fn& fn) {
  const Ahead* const ahead = rounding.ahead;
  const auto count = static_cast<ChunkIndex>(n);
  const ChunkIndex block = ahead != nullptr ? kPrefetchBlock : count;
  for (ChunkIndex first = 0; first < count; first += block) {
    if (ahead != nullptr) ahead->block(first);
    fn(first, std::min(count, first + block));
  }
}

inline std::uint64_t tensor_key(std::uint64_t seed, std::uint64_t step, std::uint64_t tensor) {
  return splitmix(splitmix(splitmix(seed) ^ step) ^ tensor);
}

// x rounded to bfloat16 up or down with probability by its distance: `bits` (16 random bits)
// added below the kept bits, then truncated. Unbiased: the expected result is x.
FUSEDOPT_INLINE Eigen::bfloat16 stochastic_bfloat16(float x, std::uint32_t bits) {
  return round_to_bfloat16(x, [bits](std::uint32_t) { return bits; });
}

// x rounded up or down to float16's grid with probability by its distance, as a float32: the
// top 13 of `bits` (16 random bits) added below the 10 mantissa bits kept, then truncated.
// Below 2^-14 (float16's subnormals, a step of 2^-24) 2^-14 is added first, in float32: the step
// then sits at bit 13, as for normal values, and what float32 rounds away in that addition lies
// 13 bits below a step. The result converts to float16 exactly, to inf from 2^16 up (past the
// largest float16 the next step up is inf), and inf and NaN as to nearest: any conversion to
// nearest gives the stored float16, F16C's too (which quiets a signaling NaN: none reaches it,
// see floats_to_halves).
FUSEDOPT_INLINE float stochastic_half_grid(float x, std::uint32_t bits) {
  const std::uint32_t u = float_bits(x), a = u & 0x7FFFFFFFU;
  const float offset = bits_float(113U << 23);  // 2^-14, the smallest normal float16
  const std::uint32_t is_small = all_ones_if(a < (113U << 23));
  const std::uint32_t is_special = all_ones_if(a >= 0x7F800000U);
  const std::uint32_t shifted = (float_bits(bits_float(a) + offset) & is_small) | (a & ~is_small);
  const std::uint32_t kept = (shifted + (bits >> 3)) & ~0x1FFFU;
  const std::uint32_t value =
      (float_bits(bits_float(kept) - offset) & is_small) | (kept & ~is_small);
  const std::uint32_t rounded = (value & ~is_special) | (a & is_special);
  return bits_float(rounded | (u & 0x80000000U));
}
FUSEDOPT_INLINE Eigen::half stochastic_half(float x, std::uint32_t bits) {
  return Eigen::numext::bit_cast<Eigen::half>(float_to_half(stochastic_half_grid(x, bits)));
}

// The array slot of a kernel's role: the param (role 0) is slot 0, state role r (r >= 2, after
// the grad) slot r - 1. Kernels store through slots; callers that stage a chunk map them back.
constexpr std::size_t slot_of_role(std::size_t role) { return role == 0 ? 0 : role - 1; }

// Stores `x` into `to`, element i of the chunk, array slot `slot` (the param 0, the state
// buffers 1, 2, 3): rounded to nearest even, or, with Stochastic and a bfloat16 or float16
// array, stochastically with the slot's 16 of element i's random bits.
template <bool Stochastic>
struct Rounder {
  explicit Rounder(const Rounding& r)
      : start(weyl_term(r.key, counter_of(static_cast<std::uint64_t>(r.first)))) {}

  // Element i's Weyl term. A loop that carries it from element to element instead (`linear`)
  // saves the vectorizer a multiply per vector (for_each_lane's, store_param_copy's).
  FUSEDOPT_INLINE std::uint32_t term(ChunkIndex i) const {
    return start + static_cast<std::uint32_t>(i) * kWeylStep;
  }
  // The 16 random bits for array slot `slot` of the element with Weyl term `term`.
  static FUSEDOPT_INLINE std::uint32_t term_bits(std::uint32_t term, int slot) {
    return slot_bits(fmix32(term), slot);
  }

  // x stored into `to`, element i of the chunk (Weyl term `term`), array slot `slot`.
  template <typename Stored, typename Compute>
  FUSEDOPT_INLINE void store_at(std::uint32_t term, int slot, Stored& to, Compute x) const {
    if constexpr (Stochastic && (std::is_same_v<Stored, Eigen::bfloat16> ||
                                 std::is_same_v<Stored, Eigen::half>)) {
      const std::uint32_t bits = term_bits(term, slot);
      if constexpr (std::is_same_v<Stored, Eigen::bfloat16>) {
        to = stochastic_bfloat16(static_cast<float>(x), bits);
      } else {
        to = stochastic_half(static_cast<float>(x), bits);
      }
    } else if constexpr (std::is_same_v<Stored, StagedCode>) {  // always stochastic
      to.value = static_cast<float>(x);
      (&to)[kCodePiece].value = bits_float(term_bits(term, slot));
    } else {
      (void)term;
      (void)slot;
      store(to, x);
    }
  }
  template <typename Stored, typename Compute>
  FUSEDOPT_INLINE void operator()(ChunkIndex i, int slot, Stored& to, Compute x) const {
    store_at(term(i), slot, to, x);
  }

  std::uint32_t start;  // the Weyl term of the chunk's first element
};

// Calls fn(out) with the call's way to store: Rounder<stochastic>. The stochastic variant is
// compiled only for the storage types that write low precision (for others it would be the same
// code).
template <typename Types, typename Fn>
FUSEDOPT_INLINE void with_rounding(const Rounding& rounding, const Fn& fn) {
  constexpr bool writes_low_precision = std::is_same_v<typename Types::Param, Eigen::bfloat16> ||
                                        std::is_same_v<typename Types::Param, Eigen::half> ||
                                        std::is_same_v<typename Types::State, Eigen::bfloat16>;
  if constexpr (writes_low_precision) {
    if (rounding.stochastic) {
      fn(Rounder<true>(rounding));
      return;
    }
  }
  fn(Rounder<false>(rounding));
}

// The random bits (half 0) of a chunk's n elements, the first at `offset` in its tensor: what
// the int8 codec rounds a quantized state's chunk with.
inline void chunk_bits(std::uint64_t key, Index offset, Index n, std::uint32_t* out) {
  // The term carried from element to element (linear): the vectorizer steps it by one add per
  // vector, where start + i * kWeylStep kept a multiply.
  std::uint32_t term = weyl_term(key, counter_of(static_cast<std::uint64_t>(offset)));
  // A 32-bit loop counter (n <= kChunk): a 64-bit one is computed in 64-bit lanes and narrowed.
  const auto count = static_cast<std::uint32_t>(n);
#pragma omp simd linear(term : kWeylStep)
  for (std::uint32_t i = 0; i < count; ++i) {
    out[i] = fmix32(term);
    term += kWeylStep;
  }
}

// Role r of a chunk that starts at `offset`, typed; nullptr for an absent optional array.
template <typename Stored>
inline Stored* role(void* const* arrays, std::size_t r, Index offset) {
  return arrays[r] == nullptr ? nullptr : static_cast<Stored*>(arrays[r]) + offset;
}

// Calls fn(std::bool_constant<flag>...) with each runtime flag as a compile-time constant, so
// that every kernel loop is branch-free: GCC vectorizes no loop with control flow in it.
template <typename Fn>
FUSEDOPT_INLINE void with_flags(const Fn& fn) {
  fn();
}
template <typename Fn, typename... Flags>
FUSEDOPT_INLINE void with_flags(const Fn& fn, bool first, Flags... rest) {
  if (first) {
    with_flags([&](auto... flags) FUSEDOPT_INLINE_LAMBDA { fn(std::true_type{}, flags...); },
               rest...);
  } else {
    with_flags([&](auto... flags) FUSEDOPT_INLINE_LAMBDA { fn(std::false_type{}, flags...); },
               rest...);
  }
}

// -x if maximizing, else x: the sign bit xor-ed with a mask, which flips a NaN's sign as unary
// minus and the reference's -grad do (a multiplication by -1 would keep it). A runtime mask, not
// a with_flags flag: one xor per vector even when not maximizing, for half the loop
// instantiations of every kernel with the option (level.cpp dominates a build's time).
template <typename T>
struct Negation {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "T is float or double");
  using Bits = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint64_t>;

  explicit Negation(bool maximize) : mask(maximize ? Bits{1} << (8 * sizeof(T) - 1) : Bits{0}) {}
  FUSEDOPT_INLINE T operator()(T x) const {
    Bits u;
    std::memcpy(&u, &x, sizeof u);
    u ^= mask;
    std::memcpy(&x, &u, sizeof x);
    return x;
  }

  Bits mask;
};

// A weight decay coefficient in T, and whether its term is taken at all: decided as the
// reference decides it, on the value given (a double), not on its rounding. One below T's range
// still adds 0 * param, NaN for an infinite param, as torch's gives too.
template <typename T>
struct Coefficient {
  explicit Coefficient(double given = 0.0) : value(T(given)), on(given != 0.0) {}
  T value;
  bool on;
};

// The gradient every formula starts from: g = -grad if maximize else grad; g = g + l2 * param
// only with an L2 term, as the reference (0 * inf would be NaN).
template <bool has_l2, typename T>
FUSEDOPT_INLINE T effective_grad(const Negation<T>& maximize, T grad, T param, T l2) {
  const T g = maximize(grad);
  if constexpr (has_l2) return g + l2 * param;
  return g;
}

// The arrays of one call: tensor t's array of role r at data[t * roles + r] (nullptr for an
// absent optional array); starts[t] is tensor t's first element in the concatenation of all
// tensors, starts[tensors] the total. Positions are 64-bit: a call may hold more than 2^31
// elements.
struct TensorSet {
  void* const* data;
  const Index* starts;
  std::size_t tensors;
  std::size_t roles;

  Index total() const { return starts[tensors]; }
  void* const* arrays(std::size_t t) const { return data + t * roles; }
};

// `pos` rounded down to the start of its chunk. Chunks start at multiples of kChunk within each
// tensor, so where threads split the work never changes how elements are grouped: results do
// not depend on the thread count.
inline Index chunk_start(const TensorSet& set, Index pos) {
  const Index* next = std::upper_bound(set.starts, set.starts + set.tensors + 1, pos);
  const Index tensor_start = *(next - 1);
  return tensor_start + (pos - tensor_start) / kChunk * kChunk;
}

// Where thread `me` of `team` starts: its even share of all elements, floor(total * me / team)
// computed without overflow, moved back to the start of its chunk. Thread `team` "starts" at
// the total.
inline Index thread_begin(const TensorSet& set, Index me, Index team) {
  const Index total = set.total();
  return chunk_start(set, total / team * me + total % team * me / team);
}

// Calls fn(tensor, offset, n) for every chunk from global position `begin` to `end` (both chunk
// starts) until fn returns false.
template <typename Fn>
void walk(const TensorSet& set, Index begin, Index end, const Fn& fn) {
  if (begin >= end) return;
  auto t = static_cast<std::size_t>(
      std::upper_bound(set.starts, set.starts + set.tensors + 1, begin) - set.starts - 1);
  for (Index pos = begin; pos < end;) {
    while (pos >= set.starts[t + 1]) ++t;  // skips finished and empty tensors
    const Index offset = pos - set.starts[t];
    const Index n = std::min(kChunk, set.starts[t + 1] - pos);
    if (!fn(t, offset, n)) return;
    pos += n;
  }
}

}  // namespace fusedopt
