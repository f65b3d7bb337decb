// A kernel's formula written once over a lane, so that one text runs two ways: one element at a
// time in an `omp simd` loop (GCC vectorizes it, at every level), or, for the rows that write
// bfloat16, kLaneWidth float32 elements at a time in vector registers: 32 in AVX-512 registers at
// the avx512 level, 16 in AVX ones at the avx2 level. There loads widen bfloat16 with one or two
// instructions, one NaN test covers every array a lane writes, and stores pack the results with
// one or two, where GCC's loops spent a fifth of all-bfloat16 Adam's arithmetic on conversions
// at avx512 and a quarter to a third at avx2 (bench/bfloat16_avx512.cpp, bench/adam_rows_l1.cpp;
// bench/results/low_precision.md, "Vector lanes", "Vector lanes at the avx2 level"). The
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
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fusedopt {

// sqrt(x) and abs(x) in a formula: std's for a scalar, Floats32's or Floats16's for a vector lane.
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
inline constexpr ChunkIndex kLaneWidth = 32;
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

#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#elif defined(__AVX2__) && defined(__GNUC__) && !defined(__SANITIZE_ADDRESS__)
// Not in AddressSanitizer builds (CI's build baseline and avx2): there GCC 12 took over 27 CPU
// minutes for the avx2 level's level.cpp with lanes, where baseline's took about 17, which took
// CI to the edge of its time limit. The suite checks the lanes' bits at avx2 in every other build;
// they read and write only a chunk's whole lanes (the rest runs in the omp simd loop).
#define FUSEDOPT_VECTOR_LANES 1
// The avx2 level's lanes: 16 elements, as two 8-float registers. Where the avx512 lanes pick
// their bfloat16 words with vpermt2w, these pack them with vpackusdw, or, unpacked, blend them;
// AVX2 has no mask registers, so the NaN test is a compare whose sign bits finish() reads.
inline constexpr ChunkIndex kLaneWidth = 16;
FUSEDOPT_INLINE __m256i splat(std::uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }

// 16 float32 values, as two AVX registers.
struct Floats16 {
  __m256 lo, hi;
};
#define FUSEDOPT_FLOATS16_OPERATOR(op, fn)                       \
  FUSEDOPT_INLINE Floats16 operator op(Floats16 a, Floats16 b) { \
    return {fn(a.lo, b.lo), fn(a.hi, b.hi)};                     \
  }                                                              \
  FUSEDOPT_INLINE Floats16 operator op(float a, Floats16 b) {    \
    const __m256 s = _mm256_set1_ps(a);                          \
    return {fn(s, b.lo), fn(s, b.hi)};                           \
  }                                                              \
  FUSEDOPT_INLINE Floats16 operator op(Floats16 a, float b) {    \
    const __m256 s = _mm256_set1_ps(b);                          \
    return {fn(a.lo, s), fn(a.hi, s)};                           \
  }
FUSEDOPT_FLOATS16_OPERATOR(+, _mm256_add_ps)
FUSEDOPT_FLOATS16_OPERATOR(-, _mm256_sub_ps)
FUSEDOPT_FLOATS16_OPERATOR(*, _mm256_mul_ps)
FUSEDOPT_FLOATS16_OPERATOR(/, _mm256_div_ps)
#undef FUSEDOPT_FLOATS16_OPERATOR
FUSEDOPT_INLINE Floats16 sqrt(Floats16 a) { return {_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)}; }
FUSEDOPT_INLINE __m256 abs(__m256 a) {  // the sign bit cleared, as std::abs (NaN too)
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(a), splat(0x7FFFFFFFU)));
}
FUSEDOPT_INLINE Floats16 abs(Floats16 a) { return {abs(a.lo), abs(a.hi)}; }

// vmaxps gives b unless a > b (so where either is NaN): a where a is NaN.
FUSEDOPT_INLINE __m256 numpy_maximum(__m256 a, __m256 b) {
  return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}
FUSEDOPT_INLINE Floats16 numpy_maximum(Floats16 a, Floats16 b) {
  return {numpy_maximum(a.lo, b.lo), numpy_maximum(a.hi, b.hi)};
}
FUSEDOPT_INLINE __m256 numpy_sign(__m256 x) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 sign = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), _mm256_set1_ps(1.0F));
  sign = _mm256_blendv_ps(sign, _mm256_set1_ps(-1.0F), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
  return _mm256_blendv_ps(sign, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
FUSEDOPT_INLINE Floats16 numpy_sign(Floats16 x) { return {numpy_sign(x.lo), numpy_sign(x.hi)}; }
FUSEDOPT_INLINE __m256 zero_if_negative(__m256 x) {
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ), x);
}
FUSEDOPT_INLINE Floats16 zero_if_negative(Floats16 x) {
  return {zero_if_negative(x.lo), zero_if_negative(x.hi)};
}

template <bool has_l2, typename Param>
FUSEDOPT_INLINE Floats16 effective_grad(const Negation<float>& maximize, Floats16 grad, Param param,
                                        float l2) {
  const __m256i mask = splat(maximize.mask);
  const Floats16 g{_mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(grad.lo), mask)),
                   _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(grad.hi), mask))};
  if constexpr (has_l2) return g + l2 * param;
  return g;
}

// Elements i .. i + 15 of a chunk, as the avx512 VectorLane's 32 (its comment says how a store
// rounds, and how NaN is fixed in finish()), with its interface.
//
// Unpacked (rows whose every array is bfloat16): `lo` holds the even elements and `hi` the odd,
// as the 32-bit words of 16 bfloat16 split: a load is one load, a shift and a mask, a store a
// shift and a blend. In element order, a load widens 8 bfloat16 at a time, and a store packs
// the words (in 128-bit halves) and puts their 64-bit quarters in order.
template <bool Stochastic, bool Unpacked, bool Codes = false>
struct VectorLane {
  FUSEDOPT_INLINE VectorLane(std::uint64_t key, std::uint32_t first, ChunkIndex at) : i(at) {
    if constexpr (Stochastic || Codes) {  // the lane's first Weyl term plus each position's offset
      const __m256i start = splat(weyl_term(key, first + static_cast<std::uint32_t>(at)));
      half0[0] = fmix32(_mm256_add_epi32(start, offsets(0)));
      half0[1] = fmix32(_mm256_add_epi32(start, offsets(1)));
    }
  }

  FUSEDOPT_INLINE Floats16 load(const float* p) const {
    static_assert(!Unpacked, "an unpacked row loads bfloat16 arrays only");
    return {_mm256_loadu_ps(p + i), _mm256_loadu_ps(p + i + 8)};
  }
  // bfloat16 to float32 is exact: its bits in the high half
  FUSEDOPT_INLINE Floats16 load(const Eigen::bfloat16* p) const {
    if constexpr (Unpacked) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
      return {_mm256_castsi256_ps(_mm256_slli_epi32(words, 16)),
              _mm256_castsi256_ps(_mm256_and_si256(words, splat(0xFFFF0000U)))};
    } else {
      return {widen(p + i), widen(p + i + 8)};
    }
  }
  FUSEDOPT_INLINE Floats16 load(const StagedCode* p) const {
    return load(reinterpret_cast<const float*>(p));
  }
  // A staged int8 state's values and, kCodePiece elements further on, the slot's 16 random bits,
  // as Rounder stores a StagedCode: drawn here, beside the formula's divider.
  FUSEDOPT_INLINE void store(int slot, StagedCode* p, Floats16 x) const {
    static_assert(Codes && !Unpacked, "a row with staged codes draws their bits, in order");
    float* const values = reinterpret_cast<float*>(p);
    _mm256_storeu_ps(values + i, x.lo);
    _mm256_storeu_ps(values + i + 8, x.hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + kCodePiece + i), slot_bits(slot, 0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + kCodePiece + i + 8),
                        slot_bits(slot, 1));
  }
  FUSEDOPT_INLINE void store(int, float* p, Floats16 x) const {
    static_assert(!Unpacked, "an unpacked row stores bfloat16 arrays only");
    _mm256_storeu_ps(p + i, x.lo);
    _mm256_storeu_ps(p + i + 8, x.hi);
  }
  FUSEDOPT_INLINE void store(int slot, Eigen::bfloat16* p, Floats16 x) {
    assert(count < 4 && "a kernel writes each of at most 4 arrays once");
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x.lo, x.hi, _CMP_UNORD_Q));
    pending[count++] = {slot, p, x};
    round_into(slot, p, x, false);
  }
  FUSEDOPT_INLINE void finish() const {
    if (__builtin_expect(_mm256_movemask_ps(nan) != 0, 0)) {
      for (int s = 0; s < count; ++s)
        round_into(pending[s].slot, pending[s].to, pending[s].x, true);
    }
  }

 private:
  // The Weyl offsets of register `half`'s 8 elements from the lane's first: lo's elements are
  // 0-7 (in element order) or the even ones (unpacked), hi's the next 8 or the odd ones.
  static FUSEDOPT_INLINE __m256i offsets(int half) {
    const auto element = [half](std::uint32_t p) {
      return Unpacked ? 2 * p + static_cast<std::uint32_t>(half)
                      : p + 8 * static_cast<std::uint32_t>(half);
    };
    return _mm256_setr_epi32(
        static_cast<int>(element(0) * kWeylStep), static_cast<int>(element(1) * kWeylStep),
        static_cast<int>(element(2) * kWeylStep), static_cast<int>(element(3) * kWeylStep),
        static_cast<int>(element(4) * kWeylStep), static_cast<int>(element(5) * kWeylStep),
        static_cast<int>(element(6) * kWeylStep), static_cast<int>(element(7) * kWeylStep));
  }
  static FUSEDOPT_INLINE __m256 widen(const Eigen::bfloat16* p) {
    const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16));
  }
  static FUSEDOPT_INLINE __m256i fmix32(__m256i weyl) {
    __m256i h = _mm256_xor_si256(weyl, _mm256_srli_epi32(weyl, 16));
    h = _mm256_mullo_epi32(h, splat(0x85EBCA6BU));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, splat(0xC2B2AE35U));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  }
  // Rounder::term_bits of 8 of the lane's elements (`half` 0 or 1) for array slot `slot`.
  FUSEDOPT_INLINE __m256i slot_bits(int slot, int half) const {
    const __m256i h = half0[half];
    if (slot == 0) return _mm256_and_si256(h, splat(0xFFFFU));
    if (slot == 1) return _mm256_srli_epi32(h, 16);
    const __m256i product =  // folded_product
        _mm256_mullo_epi32(_mm256_xor_si256(h, _mm256_srli_epi32(h, 16)), splat(0x7FEB352DU));
    return slot == 2 ? _mm256_srli_epi32(product, 16) : _mm256_and_si256(product, splat(0xFFFFU));
  }
  // What round_to_bfloat16 adds below the kept bits of x (8 of its lanes, `half` 0 or 1).
  FUSEDOPT_INLINE __m256i below(int slot, int half, __m256 x) const {
    if constexpr (Stochastic) {
      return slot_bits(slot, half);
    } else {  // to nearest even
      (void)slot;
      (void)half;
      const __m256i u = _mm256_castps_si256(x);
      return _mm256_add_epi32(splat(0x7FFFU), _mm256_and_si256(_mm256_srli_epi32(u, 16), splat(1)));
    }
  }
  FUSEDOPT_INLINE __m256i rounded(int slot, int half, __m256 x, bool fix_nan) const {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i sum = _mm256_add_epi32(u, below(slot, half, x));
    if (!fix_nan) return sum;
    const __m256i quiet =
        _mm256_or_si256(_mm256_and_si256(u, splat(0x80000000U)), splat(0x7FC00000U));
    return _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(sum), _mm256_castsi256_ps(quiet), _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  }
  FUSEDOPT_INLINE void round_into(int slot, Eigen::bfloat16* p, Floats16 x, bool fix_nan) const {
    const __m256i lo = rounded(slot, 0, x.lo, fix_nan), hi = rounded(slot, 1, x.hi, fix_nan);
    __m256i words;
    if constexpr (Unpacked) {  // even elements' words from lo's high halves, odd from hi's
      words = _mm256_blend_epi16(_mm256_srli_epi32(lo, 16), hi, 0xAA);
    } else {  // packed per 128-bit half: 0-3, 8-11, 4-7, 12-15
      words = _mm256_permute4x64_epi64(
          _mm256_packus_epi32(_mm256_srli_epi32(lo, 16), _mm256_srli_epi32(hi, 16)), 0xD8);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), words);
  }

  struct Pending {
    int slot;
    Eigen::bfloat16* to;
    Floats16 x;
  };
  ChunkIndex i;
  __m256i half0[2];
  Pending pending[4];  // slots 0-3
  int count = 0;
  __m256 nan = _mm256_setzero_ps();
};
#else
#define FUSEDOPT_VECTOR_LANES 0
#endif

#if FUSEDOPT_VECTOR_LANES
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
#else
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
    const auto whole = static_cast<ChunkIndex>(n / kLaneWidth * kLaneWidth);
    const Ahead* const ahead = rounding.ahead;  // a local, as the key
    static_assert(kPrefetchBlock % kLaneWidth == 0, "a prefetch block is whole lanes");
    const auto lanes = [&](auto stochastic) FUSEDOPT_INLINE_LAMBDA {
      for (ChunkIndex i = 0; i < whole; i += kLaneWidth) {
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
