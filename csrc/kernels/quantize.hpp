// 8-bit block-quantized state: block floating point with one power-of-two scale per block of
// kBlock elements (as in the OCP Microscaling formats) and 8-bit minifloat codes relative to it,
// three mantissa bits each. Signed states (int8 codes) are E4M3 with a sign bit; states that are
// never negative (uint8 codes) are E5M3, whose 30 binades cover second moments, which span the
// square of the gradients' range. IEEE-style codes keep inf and NaN, so a non-finite state
// propagates as in float32. fusedopt/quantize.py is the same codec in NumPy, bit for bit, and
// states the format and its error bound. Pure C++, no Python.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.hpp"
#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace fusedopt {

inline constexpr Index kBlock = 256;
static_assert(kChunk % kBlock == 0 && kCodePiece % kBlock == 0 && kChunk % kCodePiece == 0,
              "a chunk holds whole pieces, a piece whole blocks");

// Whole blocks with no inf or NaN (and an exponent below 127) take AVX-512 loops where the level
// has it: the same arithmetic, bit for bit, in an order GCC's vectorizer does not find (codes
// widened and narrowed as they are loaded and stored, the block's checks passes over 64-byte
// vectors, masked selects). Other blocks, and other levels, take the portable loops. (Byte masks
// of 16 lanes need AVX512VL as well as AVX512BW.)
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define FUSEDOPT_AVX512_CODEC 1
#else
#define FUSEDOPT_AVX512_CODEC 0
#endif
// GCC 12's AVX-512 intrinsics start from a self-initialized `undefined` vector, which its
// -Wmaybe-uninitialized takes for a read of an uninitialized one wherever they are inlined
// (GCC PR 105593, fixed in 12.3): silenced for this file's functions, not for its includers.
#if FUSEDOPT_AVX512_CODEC && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FUSEDOPT_CODEC_PRAGMAS 1
#endif
template <typename Count>
inline constexpr bool kWholeBlock = std::is_same_v<Count, std::integral_constant<Index, kBlock>>;
static_assert(kBlock % 64 == 0, "a whole block is whole 64-byte vectors of codes");

// The code's layout: 3 mantissa bits below an exponent field of 4 (signed) or 5 (unsigned) bits,
// whose top value is inf (mantissa 0) or NaN. Field f >= 1 of top normal field F is
// (1 + m/8) 2^(f-F); f = 0 is subnormal, m 2^(-2-F).
template <bool Signed>
struct Minifloat {
  static constexpr std::uint32_t kExponentMax = Signed ? 15 : 31;  // inf and NaN
  static constexpr std::uint32_t kTop = kExponentMax - 1;          // F: values up to 1.875
  static constexpr std::uint32_t kInf = kExponentMax << 3;
  static constexpr std::uint32_t kNaN = kInf | 4;
  static constexpr std::uint32_t kMaxFinite = kInf - 1;
  using Code = std::conditional_t<Signed, std::int8_t, std::uint8_t>;
};

// The bits of value(code) (scale 1). Zero: the code may be zero; Subnormal: any subnormal code
// (exponent field 0, zero among them); Special: inf or NaN (field all ones). Without them, only
// normal codes, which skips those selects.
template <bool Signed, bool Zero, bool Subnormal, bool Special>
FUSEDOPT_INLINE std::uint32_t decoded_bits(std::uint32_t code) {
  static_assert(Zero || !Subnormal, "zero is a subnormal code");
  using F = Minifloat<Signed>;
  const std::uint32_t q = Signed ? code & 0x7FU : code;
  std::uint32_t v = (q << 20) + ((127U - F::kTop) << 23);  // a normal code's value
  if constexpr (Zero && !Subnormal) v &= all_ones_if(q != 0);
  if constexpr (Subnormal) {
    const float smallest_normal = bits_float((128U - F::kTop) << 23);  // 2^(1-F)
    const std::uint32_t is_subnormal = all_ones_if(q < 8U);
    // field 0 read as field 1, less that binade's implicit leading 2^(1-F): exact
    const std::uint32_t subnormal = float_bits(bits_float(v + (1U << 23)) - smallest_normal);
    v = (v & ~is_subnormal) | (subnormal & is_subnormal);
  }
  if constexpr (Special) {
    const std::uint32_t is_special = all_ones_if(q >= F::kInf);
    const std::uint32_t special = 0x7F800000U | (all_ones_if(q != F::kInf) & 0x00400000U);
    v = (v & ~is_special) | (special & is_special);
  }
  if constexpr (Signed) v |= (code & 0x80U) << 24;
  return v;
}

// Which kinds of code a block holds besides normal ones: zero, other subnormal codes, and inf
// or NaN. Zeros are common (a gradient that is exactly zero, as a dead ReLU unit's, leaves a
// zero moment), other subnormal codes less so, inf and NaN rare. The checks run on the 8-bit
// codes in byte lanes, four times as many a vector as in 32-bit ones: first whether every code
// is normal (q - 8 wraps for subnormal codes, so its maximum is below kInf - 8 only if all
// are), the common case, and only if not, which kinds the others are.
struct CodeKinds {
  bool zero;
  bool subnormal;  // other than zero
  bool special;
};
template <bool Signed, typename Count>
FUSEDOPT_INLINE CodeKinds code_kinds(const std::uint8_t* __restrict codes, Count count) {
  using F = Minifloat<Signed>;
#if FUSEDOPT_AVX512_CODEC
  if constexpr (kWholeBlock<Count>) {
    const auto load = [&](Index i) FUSEDOPT_INLINE_LAMBDA {
      const __m512i q = _mm512_loadu_si512(codes + i);
      return Signed ? _mm512_and_si512(q, _mm512_set1_epi8(0x7F)) : q;
    };
    __mmask64 other = 0;
    for (Index i = 0; i < kBlock; i += 64) {
      other |= _mm512_cmpge_epu8_mask(_mm512_sub_epi8(load(i), _mm512_set1_epi8(8)),
                                      _mm512_set1_epi8(static_cast<char>(F::kInf - 8U)));
    }
    if (other == 0) return {false, false, false};
    __mmask64 zero = 0, subnormal = 0, special = 0;
    for (Index i = 0; i < kBlock; i += 64) {
      const __m512i q = load(i);
      zero |= _mm512_cmpeq_epu8_mask(q, _mm512_setzero_si512());
      // q - 1 wraps for zero: below 7 only for codes 1 ... 7
      subnormal |=
          _mm512_cmplt_epu8_mask(_mm512_sub_epi8(q, _mm512_set1_epi8(1)), _mm512_set1_epi8(7));
      special |= _mm512_cmpge_epu8_mask(q, _mm512_set1_epi8(static_cast<char>(F::kInf)));
    }
    return {zero != 0, subnormal != 0, special != 0};
  }
#endif
  const Index n = count;  // a constant for whole blocks; an omp simd loop's bound must be integral
  std::uint8_t highest_less_8 = 0;
#pragma omp simd reduction(max : highest_less_8)
  for (Index i = 0; i < n; ++i) {
    const auto q_less_8 = static_cast<std::uint8_t>((Signed ? codes[i] & 0x7FU : codes[i]) - 8U);
    highest_less_8 = q_less_8 > highest_less_8 ? q_less_8 : highest_less_8;
  }
  if (highest_less_8 < F::kInf - 8U) return {false, false, false};
  std::uint8_t lowest = 0xFF, lowest_less_1 = 0xFF, highest = 0;
#pragma omp simd reduction(min : lowest, lowest_less_1) reduction(max : highest)
  for (Index i = 0; i < n; ++i) {
    const auto q = static_cast<std::uint8_t>(Signed ? codes[i] & 0x7FU : codes[i]);
    const auto q_less_1 = static_cast<std::uint8_t>(q - 1U);  // wraps for zero
    lowest = q < lowest ? q : lowest;
    lowest_less_1 = q_less_1 < lowest_less_1 ? q_less_1 : lowest_less_1;
    highest = q > highest ? q : highest;
  }
  return {lowest == 0, lowest_less_1 < 7U, highest >= F::kInf};
}

#if FUSEDOPT_AVX512_CODEC
// decode_block's loop for a whole block with no inf or NaN code. Zero: it may hold zero codes;
// Subnormal: any subnormal codes, zero among them.
template <bool Signed, bool Zero, bool Subnormal>
FUSEDOPT_INLINE void decode_finite_block(const std::uint8_t* __restrict codes, float scale,
                                         float* __restrict out) {
  // decoded_bits<Signed, Zero, Subnormal, false>: a signed code sign-extended and shifted has its
  // sign at bit 31 and copies of it at 27-30, which the mask clears; q << 20 plus the bias never
  // carries into bit 31. Where every normal code's value(code) 2^E is normal (2^(1-F+E) is:
  // E + 127 >= F) the multiply by the scale is exact, and the bias's add adds E as well: the
  // biased exponent stays below 255, so this never carries into bit 31 either. (The scale is a
  // power of two in [2^-126, 2^127], as the encoder writes them: the binding refuses others.) A
  // subnormal code is read as field 1, less 2^(1-F) (times the scale, where the bias adds E):
  // exact (Sterbenz). Then the multiply by the scale, where the bias did not add it, rounds as
  // the general loop's does (an unsigned subnormal code times a scale below 2^-117 may fall
  // between float32's subnormals).
  using F = Minifloat<Signed>;
  const bool exponent_in_bias = float_bits(scale) >= F::kTop << 23;
  const __m512i bias = _mm512_set1_epi32(static_cast<int>(
      exponent_in_bias ? float_bits(scale) - (F::kTop << 23) : (127U - F::kTop) << 23));
  const __m512 scales = _mm512_set1_ps(scale);
  const float smallest_normal = bits_float((128U - F::kTop) << 23);  // 2^(1-F)
  [[maybe_unused]] const __m512 subnormal_offset =
      _mm512_set1_ps(exponent_in_bias ? smallest_normal * scale : smallest_normal);
  [[maybe_unused]] const __m512i sign_bit = _mm512_set1_epi32(static_cast<int>(0x80000000U));
  for (Index i = 0; i < kBlock; i += 16) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i));
    __m512i v;
    [[maybe_unused]] __m512i shifted;
    if constexpr (Signed) {
      // with subnormal codes the sign is set last: (-x) - (-x) would be +0, not -0
      shifted = _mm512_slli_epi32(_mm512_cvtepi8_epi32(c), 20);
      v = _mm512_and_si512(
          shifted, _mm512_set1_epi32(static_cast<int>(Subnormal ? 0x07FFFFFFU : 0x87FFFFFFU)));
    } else {
      v = _mm512_slli_epi32(_mm512_cvtepu8_epi32(c), 20);
    }
    if constexpr (Zero && !Subnormal) {  // a zero code's value 0, with its sign: no bias
      const __mmask16 nonzero = _mm_test_epi8_mask(c, _mm_set1_epi8(Signed ? 0x7F : -1));
      v = _mm512_mask_add_epi32(v, nonzero, v, bias);
    } else {
      v = _mm512_add_epi32(v, bias);
    }
    if constexpr (Subnormal) {
      const __m128i q = Signed ? _mm_and_si128(c, _mm_set1_epi8(0x7F)) : c;
      const __mmask16 is_subnormal = _mm_cmplt_epu8_mask(q, _mm_set1_epi8(8));
      v = _mm512_mask_add_epi32(v, is_subnormal, v, _mm512_set1_epi32(1 << 23));
      v = _mm512_castps_si512(_mm512_mask_sub_ps(_mm512_castsi512_ps(v), is_subnormal,
                                                 _mm512_castsi512_ps(v), subnormal_offset));
      if constexpr (Signed)
        v = _mm512_ternarylogic_epi32(v, shifted, sign_bit, 0xF8);  // v | (s & b)
    }
    const __m512 value = _mm512_castsi512_ps(v);
    _mm512_storeu_ps(out + i, exponent_in_bias ? value : _mm512_mul_ps(value, scales));
  }
}
#endif

// out[i] = value(codes[i]) * scale over one block, by the loop with only the selects that its
// codes need: most blocks hold only normal codes and zeros. The decode widens the codes as it
// loads them: no 32-bit copy is written and read back (bench/results/low_precision.md). Count is
// Index, or kBlock as a std::integral_constant for a whole block.
template <bool Signed, typename Count>
inline void decode_block(const std::uint8_t* __restrict codes, float scale, Count count,
                         float* __restrict out) {
  const Index n = count;
  const CodeKinds kinds = code_kinds<Signed>(codes, count);
  const auto decode_each = [&](auto zero, auto subnormal, auto special) FUSEDOPT_INLINE_LAMBDA {
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
      out[i] = bits_float(decoded_bits<Signed, decltype(zero)::value, decltype(subnormal)::value,
                                       decltype(special)::value>(codes[i])) *
               scale;
    }
  };
  if (kinds.special) {
    decode_each(std::true_type{}, std::true_type{}, std::true_type{});
    return;
  }
#if FUSEDOPT_AVX512_CODEC
  if constexpr (kWholeBlock<Count>) {
    if (kinds.subnormal) {
      decode_finite_block<Signed, true, true>(codes, scale, out);
    } else if (kinds.zero) {
      decode_finite_block<Signed, true, false>(codes, scale, out);
    } else {
      decode_finite_block<Signed, false, false>(codes, scale, out);
    }
    return;
  }
#endif
  if (kinds.subnormal) {
    decode_each(std::true_type{}, std::true_type{}, std::false_type{});
  } else if (kinds.zero) {
    decode_each(std::true_type{}, std::false_type{}, std::false_type{});
  } else {
    decode_each(std::false_type{}, std::false_type{}, std::false_type{});
  }
}

// The code of x (x 2^-E, exactly, is `scaled`), rounded with 16 random bits. Zero: x may be
// zero; Small: x 2^-E may be below the smallest normal code (zero among them); Special: x may be
// inf or NaN, or E 127. Without them (x 2^-E finite and at least the smallest normal code) it
// skips their selects and the clamp to the largest code.
template <bool Signed, bool Zero, bool Small, bool Special>
FUSEDOPT_INLINE std::uint32_t encoded(float x, float scaled, std::uint32_t random) {
  static_assert((Zero || !Small) && (Small || !Special), "each kind of x includes the one before");
  using F = Minifloat<Signed>;
  const std::uint32_t smallest_normal = (128U - F::kTop) << 23;  // bits of 2^(1-F)
  const std::uint32_t a = float_bits(scaled) & 0x7FFFFFFFU;
  std::uint32_t shifted = a, below_normal = 0, is_nan = 0;
  if constexpr (Small) {
    const std::uint32_t is_small = all_ones_if(a < smallest_normal);
    shifted =
        (float_bits(bits_float(a) + bits_float(smallest_normal)) & is_small) | (a & ~is_small);
    below_normal = is_small & 8U;
  }
  std::uint32_t q = ((shifted + (random << 4)) >> 20) - ((127U - F::kTop) << 3) - below_normal;
  // zero's code is 0, as Small computes it (q is then less the bias: negative)
  if constexpr (Zero && !Small) q = static_cast<std::int32_t>(q) > 0 ? q : 0U;
  if constexpr (Special) {
    // else q <= kMaxFinite: x 2^-E <= 1.875, the largest code, as E (below 127) is the largest
    // magnitude's exponent rounded up to 3 mantissa bits, or -126 for a block whose largest is
    // below 2^-126, and under 2^20 added below the kept bits of a value at most 1.875 cannot
    // carry past it
    q = q < F::kMaxFinite ? q : F::kMaxFinite;
    const std::uint32_t is_inf = all_ones_if(a == 0x7F800000U);
    is_nan = all_ones_if(a > 0x7F800000U);
    q = (q & ~(is_inf | is_nan)) | (F::kInf & is_inf) | (F::kNaN & is_nan);
  }
  const std::uint32_t sign = float_bits(x) >> 31;
  if constexpr (Signed) return (sign << 7) | q;
  return q & ~(all_ones_if(sign != 0) & ~is_nan);
}

// The largest and smallest bits of a block's magnitudes (|x| as uint32 orders as |x|).
template <typename Count>
FUSEDOPT_INLINE void magnitude_range(const float* __restrict in, Count count,
                                     std::uint32_t& highest, std::uint32_t& lowest) {
  highest = 0;
  lowest = 0xFFFFFFFFU;
#if FUSEDOPT_AVX512_CODEC
  if constexpr (kWholeBlock<Count>) {
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i high = _mm512_setzero_si512(), low = _mm512_set1_epi32(-1);
    for (Index i = 0; i < kBlock; i += 16) {
      const __m512i a = _mm512_and_si512(_mm512_loadu_si512(in + i), magnitude);
      high = _mm512_max_epu32(high, a);
      low = _mm512_min_epu32(low, a);
    }
    highest = _mm512_reduce_max_epu32(high);
    lowest = _mm512_reduce_min_epu32(low);
    return;
  }
#endif
  const Index n = count;
#pragma omp simd reduction(max : highest) reduction(min : lowest)
  for (Index i = 0; i < n; ++i) {
    const std::uint32_t a = float_bits(in[i]) & 0x7FFFFFFFU;
    highest = a > highest ? a : highest;
    lowest = a < lowest ? a : lowest;
  }
}

// The smallest bits of a block's nonzero magnitudes, or 0 for a block of zeros: |x| - 1 wraps
// for zero. A second pass, for blocks whose smallest magnitude is below the smallest normal
// code: zero, as often, or not.
template <typename Count>
FUSEDOPT_INLINE std::uint32_t lowest_nonzero(const float* __restrict in, Count count) {
  const Index n = count;
  std::uint32_t lowest_less_1 = 0xFFFFFFFFU;
#pragma omp simd reduction(min : lowest_less_1)
  for (Index i = 0; i < n; ++i) {
    const std::uint32_t a_less_1 = (float_bits(in[i]) & 0x7FFFFFFFU) - 1U;
    lowest_less_1 = a_less_1 < lowest_less_1 ? a_less_1 : lowest_less_1;
  }
  return lowest_less_1 + 1U;
}

// An encoder's random bits come as uint32, or as a float's bits where a kernel wrote them next
// to its staged state (StagedCode).
FUSEDOPT_INLINE std::uint32_t bits_word(std::uint32_t word) { return word; }
FUSEDOPT_INLINE std::uint32_t bits_word(float word) { return float_bits(word); }

#if FUSEDOPT_AVX512_CODEC
// encoded<Signed, true, Small, false> over a whole block, each code narrowed to 8 bits as it is
// stored (the narrowing keeps a lane's low 8 bits). The block's exponent E, below 127. Zero's code
// is 0 (with the sign bit, signed) in either loop.
template <bool Signed, bool HighHalf, bool Small, typename Bits>
FUSEDOPT_INLINE void encode_finite_block(const float* __restrict in, std::int32_t exponent,
                                         std::uint8_t* __restrict codes,
                                         const Bits* __restrict random_bits) {
  using F = Minifloat<Signed>;
  // The code is the low 8 bits of ((bits of |x| 2^-E) + (random << 4)) >> 20, less the bias
  // (127 - F) << 3. Scaled by 2^j more, with j = F - 127 mod 32, the exponent field's low 5
  // bits there are those the bias's subtraction leaves, and the sign bit lands in bit 11, above
  // the 8 kept: the multiply does the mask's and the subtraction's work. 2^(j-E) is normal for
  // E <= 126 + j, and then so is every x 2^(j-E) (at least 2^(1-F+j) = 2^-30): exact. Not with
  // small values, whose x 2^-E is rounded as encoded's (plus 2^(1-F) in float32), and less 8.
  constexpr std::int32_t kFold = (static_cast<std::int32_t>(F::kTop) + 1) % 32 - 32;
  const bool folded = !Small && exponent <= 126 + kFold;
  const std::int32_t multiplier_exponent = folded ? kFold - exponent : -exponent;
  const __m512 multiplier =
      _mm512_set1_ps(bits_float(static_cast<std::uint32_t>(multiplier_exponent + 127) << 23));
  const __m512i bias = _mm512_set1_epi32(static_cast<int>((127U - F::kTop) << 3));
  [[maybe_unused]] const __m512i small_bias =
      _mm512_set1_epi32(static_cast<int>(((127U - F::kTop) << 3) + 8U));
  [[maybe_unused]] const __m512i smallest_normal =
      _mm512_set1_epi32(static_cast<int>((128U - F::kTop) << 23));  // bits of 2^(1-F)
  for (Index i = 0; i < kBlock; i += 16) {
    const __m512 x = _mm512_loadu_ps(in + i);
    __m512i a = _mm512_castps_si512(_mm512_mul_ps(x, multiplier));
    if (!folded) a = _mm512_and_si512(a, _mm512_set1_epi32(0x7FFFFFFF));
    [[maybe_unused]] __mmask16 is_small = 0;
    if constexpr (Small) {
      is_small = _mm512_cmplt_epu32_mask(a, smallest_normal);
      a = _mm512_castps_si512(_mm512_mask_add_ps(_mm512_castsi512_ps(a), is_small,
                                                 _mm512_castsi512_ps(a),
                                                 _mm512_castsi512_ps(smallest_normal)));
    }
    const __m512i bits = _mm512_loadu_si512(random_bits + i);
    const __m512i random =
        HighHalf ? _mm512_srli_epi32(bits, 16) : _mm512_and_si512(bits, _mm512_set1_epi32(0xFFFF));
    __m512i q = _mm512_srli_epi32(_mm512_add_epi32(a, _mm512_slli_epi32(random, 4)), 20);
    if constexpr (Small) {
      q = _mm512_sub_epi32(q, _mm512_mask_blend_epi32(is_small, bias, small_bias));
    } else if (!folded) {  // zero's code is 0 (folded, the multiply leaves it 0)
      q = _mm512_maskz_sub_epi32(_mm512_test_epi32_mask(a, a), q, bias);
    }
    const __m512i u = _mm512_castps_si512(x);
    if constexpr (Signed) {  // the sign bit as the code's bit 7
      q = _mm512_or_si512(q, _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80)));
    } else {  // a negative value's code is 0
      q = _mm512_andnot_si512(_mm512_srai_epi32(u, 31), q);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(q));
  }
}
#endif

// Codes of one block and its scale: the largest finite magnitude rounded up to 3 mantissa bits
// sets the exponent E; each element is x 2^-E (exact) rounded stochastically on its float bits,
// with 16 random bits, the low or high half of random_bits[i], added below the 3 kept (see
// quantize.py for why never to nearest). Below the smallest normal code, 2^(1-F) is added first
// (in float32, rounding 20 bits below a step): the subnormal step then is the mantissa's top 3
// bits, as for normal codes. Each block takes the loop with only the selects that it needs
// (found by the magnitudes' pass, and for a block whose smallest is below the smallest normal
// code, a second pass for its smallest but zeros): without inf and NaN (almost every block) no
// clamp to the largest code, and with no nonzero element below the smallest normal code not
// those selects either.
template <bool Signed, bool HighHalf, typename Count, typename Bits>
inline float encode_block(const float* __restrict in, Count count, std::uint8_t* __restrict codes,
                          const Bits* __restrict random_bits, std::uint32_t highest,
                          std::uint32_t lowest) {
  using F = Minifloat<Signed>;
  constexpr int kShift = HighHalf ? 16 : 0;  // a constant: no shift count in a register
  const Index n = count;
  // the largest finite magnitude: a second pass only for blocks holding inf or NaN
  std::uint32_t largest = highest;
  if (highest >= 0x7F800000U) {
    largest = 0;
#pragma omp simd reduction(max : largest)
    for (Index i = 0; i < n; ++i) {
      const std::uint32_t a = float_bits(in[i]) & 0x7FFFFFFFU;
      const std::uint32_t finite = a & all_ones_if(a < 0x7F800000U);
      largest = finite > largest ? finite : largest;
    }
  }
  // rounded up to 3 mantissa bits: every element's code fits, however it is rounded (a
  // saturated maximum would bias stochastic rounding down)
  std::int32_t exponent = static_cast<std::int32_t>((largest + 0xFFFFFU) >> 23) - 127;
  exponent = exponent < -126 ? -126 : (exponent > 127 ? 127 : exponent);
  const float scale = bits_float(static_cast<std::uint32_t>(exponent + 127) << 23);
  // 2^-E: a normal float for E >= -126 up to 2^126, and the subnormal 2^-127 for E = 127
  const float inverse = exponent == 127
                            ? bits_float(0x00400000U)
                            : bits_float(static_cast<std::uint32_t>(127 - exponent) << 23);
  // Finite: no inf or NaN, and every x 2^-E is x times a normal power of two. Normal too: every
  // nonzero x 2^-E normal (exact) and at least 2^(1-F), the smallest normal code:
  // |x| >= 2^(E+1-F).
  const bool finite = highest < 0x7F800000U && exponent < 127;
  const std::int32_t threshold = exponent + 1 - static_cast<std::int32_t>(F::kTop) + 127;
  const auto normal_code = [&](std::uint32_t magnitude) {
    return threshold >= 1 && magnitude >= static_cast<std::uint32_t>(threshold) << 23;
  };
  bool all_normal = finite && normal_code(lowest);
  if (finite && !all_normal) {
    const std::uint32_t smallest = lowest_nonzero(in, count);
    all_normal = smallest == 0 || normal_code(smallest);
  }
#if FUSEDOPT_AVX512_CODEC
  if constexpr (kWholeBlock<Count>) {
    if (all_normal) {
      encode_finite_block<Signed, HighHalf, false>(in, exponent, codes, random_bits);
      return scale;
    }
    if (finite) {
      encode_finite_block<Signed, HighHalf, true>(in, exponent, codes, random_bits);
      return scale;
    }
  }
#endif
  alignas(64) std::uint32_t wide[kBlock];
  const auto encode_each = [&](auto zero, auto small, auto special) FUSEDOPT_INLINE_LAMBDA {
#pragma omp simd
    for (Index i = 0; i < n; ++i) {
      wide[i] =
          encoded<Signed, decltype(zero)::value, decltype(small)::value, decltype(special)::value>(
              in[i], in[i] * inverse, (bits_word(random_bits[i]) >> kShift) & 0xFFFFU);
    }
  };
  if (all_normal && lowest != 0) {
    encode_each(std::false_type{}, std::false_type{}, std::false_type{});
  } else if (all_normal) {
    encode_each(std::true_type{}, std::false_type{}, std::false_type{});
  } else if (finite) {
    encode_each(std::true_type{}, std::true_type{}, std::false_type{});
  } else {
    encode_each(std::true_type{}, std::true_type{}, std::true_type{});
  }
#pragma omp simd
  for (Index i = 0; i < n; ++i) codes[i] = static_cast<std::uint8_t>(wide[i]);
  return scale;
}

// Calls fn(b, count) for each block b of a chunk of n elements, each whole block's count the
// constant kBlock: its loops then have a known trip count, without remainder loops.
template <typename Fn>
FUSEDOPT_INLINE void for_each_block(Index n, const Fn& fn) {
  Index b = 0;
  for (; (b + 1) * kBlock <= n; ++b) fn(b, std::integral_constant<Index, kBlock>{});
  if (b * kBlock < n) fn(b, n - b * kBlock);
}

// A chunk (or a piece of one) of a quantized state: decoded into `out`, then encoded back from
// it. It starts at a multiple of kBlock in its tensor.
inline void decode_chunk(bool is_signed, const std::uint8_t* codes, const float* scales, Index n,
                         float* out) {
  for_each_block(n, [&](Index b, auto count) {
    if (is_signed) {
      decode_block<true>(codes + b * kBlock, scales[b], count, out + b * kBlock);
    } else {
      decode_block<false>(codes + b * kBlock, scales[b], count, out + b * kBlock);
    }
  });
}
// `random` holds the elements' random bits of the array slot's half (chunk_bits, or its
// folded_product), `high_half` picking its 16; or those a kernel wrote (StagedCode), the slot's
// 16 in the low half.
template <typename Bits>
inline void encode_chunk(bool is_signed, const float* in, Index n, std::uint8_t* codes,
                         float* scales, const Bits* random, bool high_half) {
  with_flags(
      [&](auto signed_codes, auto high) {
        // every block's range first: the reductions' latencies then overlap, where each
        // block's encoding would otherwise wait for its own
        std::uint32_t highest[kChunk / kBlock], lowest[kChunk / kBlock];
        for_each_block(n, [&](Index b, auto count) {
          magnitude_range(in + b * kBlock, count, highest[b], lowest[b]);
        });
        for_each_block(n, [&](Index b, auto count) {
          const Index at = b * kBlock;
          scales[b] = encode_block<decltype(signed_codes)::value, decltype(high)::value>(
              in + at, count, codes + at, random + at, highest[b], lowest[b]);
        });
      },
      is_signed, high_half);
}

#if defined(FUSEDOPT_CODEC_PRAGMAS)
#pragma GCC diagnostic pop
#undef FUSEDOPT_CODEC_PRAGMAS
#endif

}  // namespace fusedopt
