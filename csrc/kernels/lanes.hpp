// A kernel's formula written once over a lane, so that one text runs two ways: one element at a
// time in an `omp simd` loop (GCC vectorizes it, at every level), or, at the avx512 level for the
// rows that write bfloat16, 32 float32 elements at a time in AVX-512 registers. There loads widen
// 16 bfloat16 with one instruction, one NaN test covers every array a lane writes, and stores pack
// 32 results with one vpermt2w, where GCC's loops spent a fifth of all-bfloat16 Adam's arithmetic
// on conversions (bench/bfloat16_avx512.cpp; bench/results/low_precision.md, "Vector lanes"). The
// arithmetic is the same, in the same order: so are the bits.
//
// A kernel runs `for_each_lane<Types>(rounding, n, body)`, body(lane) reading element(s) with
// lane.load(pointer) and writing them with lane.store(slot, pointer, value) (array slots as
// Rounder's), each array written once and never read back, in arithmetic on the loaded values and
// the kernel's constants (+, -, *, /, sqrt, abs, effective_grad, numpy_maximum, numpy_sign,
// zero_if_negative). A kernel calls step() on a local copy of itself: a lambda's loop would read
// the constants through `this`, which its stores may alias (the omp simd loops had __restrict
// pointers), and reload them at every element (float32 Adam at avx2 took 1.13x at 1e4).
#pragma once

#include <array>
#include <cassert>
#include <cmath>
#include <type_traits>

#include "common.hpp"
#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace fusedopt {

// sqrt(x) and abs(x) in a formula: std's for a scalar, Floats32's for a vector lane.
using std::abs;
using std::sqrt;

// Element i of a chunk, in the compute type T, as the omp simd loop's body; `term` its Weyl
// term, which the loop carries (Rounder::term).
template <typename T, typename Out>
struct ScalarLane {
  template <typename Stored>
  FUSEDOPT_INLINE T load(const Stored* p) const {
    return fusedopt::load<T>(p[i]);
  }
  template <typename Stored, typename Value>
  FUSEDOPT_INLINE void store(int slot, Stored* p, Value x) const {
    out.store_at(term, slot, p[i], x);
  }

  const Out& out;
  ChunkIndex i;
  std::uint32_t term;
};

// numpy.maximum: the first NaN of a and b, else the larger (b where they are equal). Three
// selects in sequence: GCC if-converts them at every level, where the nested conditional was
// control flow that kept the loop scalar at avx2.
template <typename T>
FUSEDOPT_INLINE T numpy_maximum(T a, T b) {
  const T larger = a > b ? a : b;  // b where either is NaN
  const T b_if_nan = b != b ? b : larger;
  return a != a ? a : b_if_nan;
}
// numpy.sign, branch-free: (x > 0) - (x < 0) is +0 for either zero; NaN stays NaN.
template <typename T>
FUSEDOPT_INLINE T numpy_sign(T x) {
  return x != x ? x : static_cast<T>(x > T(0)) - static_cast<T>(x < T(0));
}
// 0 where x < 0, else x (NaN and -0 stay).
template <typename T>
FUSEDOPT_INLINE T zero_if_negative(T x) {
  return x < T(0) ? T(0) : x;
}

#if defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__GNUC__)
#define FUSEDOPT_VECTOR_LANES 1
// GCC 12's AVX-512 intrinsics start from a self-initialized `undefined` vector, which its
// -Wmaybe-uninitialized takes for a read of an uninitialized one wherever they are inlined (GCC
// PR 105593, fixed in 12.3).
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
FUSEDOPT_INLINE __m512i splat(std::uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }

// 32 float32 values, as two AVX-512 registers.
struct Floats32 {
  __m512 lo, hi;
};
#define FUSEDOPT_FLOATS32_OPERATOR(op, fn)                       \
  FUSEDOPT_INLINE Floats32 operator op(Floats32 a, Floats32 b) { \
    return {fn(a.lo, b.lo), fn(a.hi, b.hi)};                     \
  }                                                              \
  FUSEDOPT_INLINE Floats32 operator op(float a, Floats32 b) {    \
    const __m512 s = _mm512_set1_ps(a);                          \
    return {fn(s, b.lo), fn(s, b.hi)};                           \
  }                                                              \
  FUSEDOPT_INLINE Floats32 operator op(Floats32 a, float b) {    \
    const __m512 s = _mm512_set1_ps(b);                          \
    return {fn(a.lo, s), fn(a.hi, s)};                           \
  }
FUSEDOPT_FLOATS32_OPERATOR(+, _mm512_add_ps)
FUSEDOPT_FLOATS32_OPERATOR(-, _mm512_sub_ps)
FUSEDOPT_FLOATS32_OPERATOR(*, _mm512_mul_ps)
FUSEDOPT_FLOATS32_OPERATOR(/, _mm512_div_ps)
#undef FUSEDOPT_FLOATS32_OPERATOR
FUSEDOPT_INLINE Floats32 sqrt(Floats32 a) { return {_mm512_sqrt_ps(a.lo), _mm512_sqrt_ps(a.hi)}; }
// the sign bit cleared, as std::abs (NaN too)
FUSEDOPT_INLINE Floats32 abs(Floats32 a) { return {_mm512_abs_ps(a.lo), _mm512_abs_ps(a.hi)}; }

// vmaxps gives b unless a > b (so where either is NaN): a where a is NaN.
FUSEDOPT_INLINE __m512 numpy_maximum(__m512 a, __m512 b) {
  return _mm512_mask_mov_ps(_mm512_max_ps(a, b), _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a);
}
FUSEDOPT_INLINE Floats32 numpy_maximum(Floats32 a, Floats32 b) {
  return {numpy_maximum(a.lo, b.lo), numpy_maximum(a.hi, b.hi)};
}
FUSEDOPT_INLINE __m512 numpy_sign(__m512 x) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 sign =
      _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), _mm512_set1_ps(1.0F));
  sign = _mm512_mask_mov_ps(sign, _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.0F));
  return _mm512_mask_mov_ps(sign, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}
FUSEDOPT_INLINE Floats32 numpy_sign(Floats32 x) { return {numpy_sign(x.lo), numpy_sign(x.hi)}; }
FUSEDOPT_INLINE __m512 zero_if_negative(__m512 x) {
  return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ),
                            _mm512_setzero_ps());
}
FUSEDOPT_INLINE Floats32 zero_if_negative(Floats32 x) {
  return {zero_if_negative(x.lo), zero_if_negative(x.hi)};
}

template <bool has_l2, typename Param>
FUSEDOPT_INLINE Floats32 effective_grad(const Negation<float>& maximize, Floats32 grad, Param param,
                                        float l2) {
  const __m512i mask = splat(maximize.mask);
  const Floats32 g{_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(grad.lo), mask)),
                   _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(grad.hi), mask))};
  if constexpr (has_l2) return g + l2 * param;
  return g;
}

// Elements i .. i + 31 of a chunk. A bfloat16 store is made at once as if no value were NaN (its
// bits plus the rounding's: round_to_bfloat16 but for NaN); finish() makes the lane's bfloat16
// stores again, with NaN made the quiet NaN of its sign, if any value was. Stochastically, the
// bits are Rounder's: half 0 of the 32 elements (fmix32 of their Weyl terms), half 1 folded from
// it. (Below, `half` is instead the register, lo or hi, whose 16 elements' bits are meant.)
//
// Unpacked (rows whose every array is bfloat16): the 32 elements lie in the two registers in the
// order vpunpcklwd and vpunpckhwd widen 64 bytes into, so that a load is one load and two unpacks,
// where in element order it takes two widening loads and two shifts. `lo` holds the low four
// elements of each 16-byte quarter (0-3, 8-11, 16-19, 24-27), `hi` the high four. The arithmetic
// is element by element; only the Weyl offsets and the packing of stores see the order.
template <bool Stochastic, bool Unpacked, bool Codes = false>
struct VectorLane {
  FUSEDOPT_INLINE VectorLane(std::uint64_t key, std::uint32_t first, ChunkIndex at) : i(at) {
    static_assert(tables_agree(), "kPositions and kHighWords disagree");
    if constexpr (Stochastic || Codes) {  // the lane's first Weyl term plus each position's offset
      const __m512i start = splat(weyl_term(key, first + static_cast<std::uint32_t>(at)));
      half0[0] = fmix32(_mm512_add_epi32(start, _mm512_loadu_si512(kWeylOffsets.data())));
      half0[1] = fmix32(_mm512_add_epi32(start, _mm512_loadu_si512(kWeylOffsets.data() + 16)));
    }
  }

  FUSEDOPT_INLINE Floats32 load(const float* p) const {
    static_assert(!Unpacked, "an unpacked row loads bfloat16 arrays only");
    return {_mm512_loadu_ps(p + i), _mm512_loadu_ps(p + i + 16)};
  }
  // bfloat16 to float32 is exact: its bits in the high half
  FUSEDOPT_INLINE Floats32 load(const Eigen::bfloat16* p) const {
    if constexpr (Unpacked) {
      const __m512i words = _mm512_loadu_si512(p + i), zero = _mm512_setzero_si512();
      return {_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, words)),
              _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, words))};
    } else {
      return {widen(p + i), widen(p + i + 16)};
    }
  }
  FUSEDOPT_INLINE Floats32 load(const StagedCode* p) const {
    return load(reinterpret_cast<const float*>(p));
  }
  // A staged int8 state's values and, kCodePiece elements further on, the slot's 16 random bits,
  // as Rounder stores a StagedCode: drawn here, beside the formula's divider.
  FUSEDOPT_INLINE void store(int slot, StagedCode* p, Floats32 x) const {
    static_assert(Codes && !Unpacked, "a row with staged codes draws their bits, in order");
    float* const values = reinterpret_cast<float*>(p);
    _mm512_storeu_ps(values + i, x.lo);
    _mm512_storeu_ps(values + i + 16, x.hi);
    _mm512_storeu_si512(values + kCodePiece + i, slot_bits(slot, 0));
    _mm512_storeu_si512(values + kCodePiece + i + 16, slot_bits(slot, 1));
  }
  FUSEDOPT_INLINE void store(int, float* p, Floats32 x) const {
    static_assert(!Unpacked, "an unpacked row stores bfloat16 arrays only");
    _mm512_storeu_ps(p + i, x.lo);
    _mm512_storeu_ps(p + i + 16, x.hi);
  }
  FUSEDOPT_INLINE void store(int slot, Eigen::bfloat16* p, Floats32 x) {
    assert(count < 4 && "a kernel writes each of at most 4 arrays once");
    nan |= _mm512_cmp_ps_mask(x.lo, x.hi, _CMP_UNORD_Q);
    pending[count++] = {slot, p, x};
    round_into(slot, p, x, false);
  }
  FUSEDOPT_INLINE void finish() const {
    if (__builtin_expect(nan != 0, 0)) {
      for (int s = 0; s < count; ++s)
        round_into(pending[s].slot, pending[s].to, pending[s].x, true);
    }
  }

 private:
  // The element in each of lo's 16 positions; hi's is kHighOffset more.
  static constexpr std::uint32_t kHighOffset = Unpacked ? 4 : 16;
  alignas(64) static constexpr std::array<std::uint32_t, 16> kPositions = [] {
    std::array<std::uint32_t, 16> positions{};
    for (std::uint32_t p = 0; p < 16; ++p) positions[p] = Unpacked ? p / 4 * 8 + p % 4 : p;
    return positions;
  }();
  // The Weyl offset of each position's element from the lane's first: lo's, then hi's.
  alignas(64) static constexpr std::array<std::uint32_t, 32> kWeylOffsets = [] {
    std::array<std::uint32_t, 32> offsets{};
    for (std::uint32_t p = 0; p < 16; ++p) {
      offsets[p] = kPositions[p] * kWeylStep;
      offsets[16 + p] = (kPositions[p] + kHighOffset) * kWeylStep;
    }
    return offsets;
  }();
  // The 16-bit word holding element e's bfloat16, the high half of its 32-bit lane, in
  // vpermt2w's numbering of two registers (lo's words, then hi's).
  alignas(64) static constexpr std::array<std::uint16_t, 32> kHighWords = [] {
    std::array<std::uint16_t, 32> words{};
    for (std::uint32_t e = 0; e < 32; ++e) {
      const std::uint32_t lane = !Unpacked ? e : e % 8 / 4 * 16 + e / 8 * 4 + e % 4;
      words[e] = static_cast<std::uint16_t>(2 * lane + 1);
    }
    return words;
  }();
  // The tables agree: lo's position p holds element kPositions[p], hi's that element plus
  // kHighOffset (as kWeylOffsets has them), and each one's word is where the store looks.
  static constexpr bool tables_agree() {
    for (std::uint32_t p = 0; p < 16; ++p) {
      if (kHighWords[kPositions[p]] != 2 * p + 1 ||
          kHighWords[kPositions[p] + kHighOffset] != 2 * (16 + p) + 1) {
        return false;
      }
    }
    return true;
  }

  static FUSEDOPT_INLINE __m512 widen(const Eigen::bfloat16* p) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16));
  }
  static FUSEDOPT_INLINE __m512i fmix32(__m512i weyl) {
    __m512i h = _mm512_xor_si512(weyl, _mm512_srli_epi32(weyl, 16));
    h = _mm512_mullo_epi32(h, splat(0x85EBCA6BU));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, splat(0xC2B2AE35U));
    return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  }
  // Rounder::term_bits of 16 of the lane's elements (`half` 0 or 1) for array slot `slot`.
  FUSEDOPT_INLINE __m512i slot_bits(int slot, int half) const {
    const __m512i h = half0[half];
    if (slot == 0) return _mm512_and_si512(h, splat(0xFFFFU));
    if (slot == 1) return _mm512_srli_epi32(h, 16);
    const __m512i product =  // folded_product
        _mm512_mullo_epi32(_mm512_xor_si512(h, _mm512_srli_epi32(h, 16)), splat(0x7FEB352DU));
    return slot == 2 ? _mm512_srli_epi32(product, 16) : _mm512_and_si512(product, splat(0xFFFFU));
  }
  // What round_to_bfloat16 adds below the kept bits of x (16 of its lanes, `half` 0 or 1).
  FUSEDOPT_INLINE __m512i below(int slot, int half, __m512 x) const {
    if constexpr (Stochastic) {
      return slot_bits(slot, half);
    } else {  // to nearest even
      (void)slot;
      (void)half;
      const __m512i u = _mm512_castps_si512(x);
      return _mm512_add_epi32(splat(0x7FFFU), _mm512_and_si512(_mm512_srli_epi32(u, 16), splat(1)));
    }
  }
  FUSEDOPT_INLINE __m512i rounded(int slot, int half, __m512 x, bool fix_nan) const {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i sum = _mm512_add_epi32(u, below(slot, half, x));
    if (!fix_nan) return sum;
    return _mm512_mask_or_epi32(sum, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                                _mm512_and_si512(u, splat(0x80000000U)), splat(0x7FC00000U));
  }
  FUSEDOPT_INLINE void round_into(int slot, Eigen::bfloat16* p, Floats32 x, bool fix_nan) const {
    _mm512_storeu_si512(p + i, _mm512_permutex2var_epi16(rounded(slot, 0, x.lo, fix_nan),
                                                         _mm512_loadu_si512(kHighWords.data()),
                                                         rounded(slot, 1, x.hi, fix_nan)));
  }

  struct Pending {
    int slot;
    Eigen::bfloat16* to;
    Floats32 x;
  };
  ChunkIndex i;
  __m512i half0[2];
  Pending pending[4];  // slots 0-3
  int count = 0;
  __mmask16 nan = 0;
};

template <typename T>
inline constexpr bool kFloatOrBfloat16 =
    std::is_same_v<T, float> || std::is_same_v<T, Eigen::bfloat16>;
// The rows whose every array is bfloat16: their lanes are unpacked (VectorLane).
template <typename Types>
inline constexpr bool kBfloat16Only = std::is_same_v<typename Types::Param, Eigen::bfloat16> &&
                                      std::is_same_v<typename Types::Grad, Eigen::bfloat16> &&
                                      std::is_same_v<typename Types::State, Eigen::bfloat16>;
// The rows that run on vector lanes: float32 arithmetic on float32 and bfloat16 arrays (and an
// int8 state's staged float32, StagedCode), some bfloat16 written (float32 rows gain nothing:
// GCC's loops already run them at full width).
template <typename Types>
inline constexpr bool kVectorLanes =
    std::is_same_v<typename Types::Compute, float> && kFloatOrBfloat16<typename Types::Param> &&
    kFloatOrBfloat16<typename Types::Grad> &&
    (kFloatOrBfloat16<typename Types::State> ||
     std::is_same_v<typename Types::State, StagedCode>) &&
    (std::is_same_v<typename Types::Param, Eigen::bfloat16> ||
     std::is_same_v<typename Types::State, Eigen::bfloat16>);
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#else
#define FUSEDOPT_VECTOR_LANES 0
template <typename Types>
inline constexpr bool kVectorLanes = false;
#endif

// Runs body(lane) over a chunk's n elements, rounding as `rounding` says: on vector lanes where
// the row takes them, the rest, and every other row, in an omp simd loop over ScalarLane.
// InElementOrder: never unpacked lanes, for a body that stores float32 arrays in a bfloat16 row.
template <typename Types, bool InElementOrder = false, typename Body>
FUSEDOPT_INLINE void for_each_lane(const Rounding& rounding, Index n, const Body& body) {
  // the omp simd loop over elements [first, count)
  const auto elements = [&](const Rounding& how, ChunkIndex first,
                            ChunkIndex count) FUSEDOPT_INLINE_LAMBDA {
    with_rounding<Types>(how, [&](const auto& out) FUSEDOPT_INLINE_LAMBDA {
      using Out = std::decay_t<decltype(out)>;
      std::uint32_t term = out.term(first);
#pragma omp simd linear(term : kWeylStep)
      for (ChunkIndex i = first; i < count; ++i) {
        ScalarLane<typename Types::Compute, Out> lane{out, i, term};
        body(lane);
        term += kWeylStep;
      }
    });
  };
#if FUSEDOPT_VECTOR_LANES
  if constexpr (kVectorLanes<Types>) {
    const std::uint32_t first = counter_of(static_cast<std::uint64_t>(rounding.first));
    // a local: read through `rounding`, which the lanes' stores may alias, the key was loaded
    // and broadcast again for every lane
    const std::uint64_t key = rounding.key;
    const auto whole = static_cast<ChunkIndex>(n / 32 * 32);
    const Ahead* const ahead = rounding.ahead;  // a local, as the key
    static_assert(kPrefetchBlock % 32 == 0, "a prefetch block is whole lanes");
    const auto lanes = [&](auto stochastic) FUSEDOPT_INLINE_LAMBDA {
      for (ChunkIndex i = 0; i < whole; i += 32) {
        // a branch in the loop of lanes: a loop of blocks around it measured slower
        if (ahead != nullptr && i % kPrefetchBlock == 0) ahead->block(i);
        VectorLane<stochastic.value, kBfloat16Only<Types> && !InElementOrder,
                   std::is_same_v<typename Types::State, StagedCode>>
            lane(key, first, i);
        body(lane);
        lane.finish();
      }
    };
    if (rounding.stochastic) {
      lanes(std::true_type{});
    } else {
      lanes(std::false_type{});
    }
    elements(rounding, whole, static_cast<ChunkIndex>(n));
    return;
  }
#endif
  in_prefetched_blocks(rounding, n,
                       [&](ChunkIndex first, ChunkIndex end) { elements(rounding, first, end); });
}

// A chunk's n <= kChunk float32 values (just updated) rounded into the low-precision param `to`
// (bfloat16 if to_bfloat16, else float16), as a kernel stores its param: slot 0's random bits with
// stochastic rounding, else to nearest even. Kernels with masters write their params so, while
// the chunk is still in cache, and float16 params staged as float32 are written back so.
inline void store_param_copy(const Rounding& rounding, Index n, const float* master,
                             bool to_bfloat16, void* to) {
  // as a kernel's store of slot 0: on vector lanes for bfloat16 where the level has them
  const auto rounded = [&](auto* param) {
    using P = std::remove_pointer_t<decltype(param)>;
    for_each_lane<Storage<float, P, float, float>>(
        rounding, n,
        [&](auto& lane) FUSEDOPT_INLINE_LAMBDA { lane.store(0, param, lane.load(master)); });
  };
  if (to_bfloat16) {
    rounded(static_cast<Eigen::bfloat16*>(to));
  } else if (rounding.stochastic) {
#if FUSEDOPT_F16C  // onto float16's grid in float32, then converted by F16C, eight at a time
    alignas(64) float grid[kChunk];
    std::uint32_t term = Rounder<true>(rounding).term(0);
#pragma omp simd linear(term : kWeylStep)
    for (ChunkIndex i = 0; i < n; ++i) {
      grid[i] = stochastic_half_grid(master[i], Rounder<true>::term_bits(term, 0));
      term += kWeylStep;
    }
    floats_to_halves(grid, n, static_cast<Eigen::half*>(to));
#else
    rounded(static_cast<Eigen::half*>(to));
#endif
  } else {
    floats_to_halves(master, n, static_cast<Eigen::half*>(to));  // F16C where the level has it
  }
}

}  // namespace fusedopt
