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
#include <cstring>
#include <type_traits>

#include "common.hpp"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fusedopt {

// sqrt(x) and abs(x) in a formula: std's for a scalar, Floats' for a vector lane.
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
// 0 where x < 0, else x (NaN and -0 stay); on a float or a GCC vector of them.
template <typename T>
FUSEDOPT_INLINE T zero_if_negative(T x) {
  return x < T{} ? T{} : x;
}

#if defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__GNUC__)
#define FUSEDOPT_VECTOR_LANES 1
#define FUSEDOPT_LANES_AVX512 1
#elif defined(__AVX2__) && defined(__GNUC__) && !defined(__SANITIZE_ADDRESS__)
// Not in AddressSanitizer builds (CI's build baseline and avx2): there GCC 12 took over 27 CPU
// minutes for the avx2 level's level.cpp with lanes, where baseline's took about 17, which took
// CI to the edge of its time limit. The suite checks the lanes' bits at avx2 in every other build;
// they read and write only a chunk's whole lanes (the rest runs in the omp simd loop).
#define FUSEDOPT_VECTOR_LANES 1
#define FUSEDOPT_LANES_AVX512 0
#else
#define FUSEDOPT_VECTOR_LANES 0
#endif

#if FUSEDOPT_VECTOR_LANES
// GCC 12's AVX-512 intrinsics start from a self-initialized `undefined` vector, which its
// -Wmaybe-uninitialized takes for a read of an uninitialized one wherever they are inlined (GCC
// PR 105593, fixed in 12.3).
#if FUSEDOPT_LANES_AVX512 && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// A lane is two registers of kRegister float32 values, GCC vector types whose operators work
// element by element, as do fmix32's and the rounding's on their bits: the formula, the random
// bits and the rounding are written once for both levels. What differs between them is below:
// the registers, a few instructions, and the order in which an unpacked load lays bfloat16 out.
#if FUSEDOPT_LANES_AVX512
inline constexpr ChunkIndex kRegister = 16;
using Register = __m512;
typedef std::uint32_t RegisterBits __attribute__((vector_size(64)));
using NanFlags = __mmask16;
// Unpacked, a lane's elements lie in the order vpunpcklwd and vpunpckhwd widen 64 bytes into:
// a load is one load and two unpacks, where in element order it takes two widening loads and two
// shifts. `lo` holds the low four elements of each 16-byte quarter (0-3, 8-11, 16-19, 24-27),
// `hi` the high four.
constexpr std::uint32_t unpacked_element(std::uint32_t position, std::uint32_t half) {
  return position / 4 * 8 + position % 4 + 4 * half;
}
#else
inline constexpr ChunkIndex kRegister = 8;
using Register = __m256;
typedef std::uint32_t RegisterBits __attribute__((vector_size(32)));
using NanFlags = RegisterBits;  // AVX2 has no mask registers: a compare's sign bits
// Unpacked, `lo` holds a lane's even elements and `hi` its odd, as the 32-bit words of 16
// bfloat16 split: a load is one load, a shift and a mask, a store a shift and a blend.
constexpr std::uint32_t unpacked_element(std::uint32_t position, std::uint32_t half) {
  return 2 * position + half;
}
#endif
inline constexpr ChunkIndex kLaneWidth = 2 * kRegister;

// The lane's element in `position` of register `half` (0: lo, 1: hi), unpacked or in element
// order.
constexpr std::uint32_t element_at(std::uint32_t position, std::uint32_t half, bool unpacked) {
  return unpacked ? unpacked_element(position, half)
                  : position + static_cast<std::uint32_t>(kRegister) * half;
}

// kLaneWidth float32 values.
struct Floats {
  Register lo, hi;
};

// The same bits, as the other vector type. GCC before 11 has no __builtin_bit_cast; there a cast
// between vector types of one size keeps the bits too.
#if defined(__clang__) || __GNUC__ >= 11
FUSEDOPT_INLINE RegisterBits bits_of(Register x) { return __builtin_bit_cast(RegisterBits, x); }
FUSEDOPT_INLINE Register floats_of(RegisterBits u) { return __builtin_bit_cast(Register, u); }
#else
FUSEDOPT_INLINE RegisterBits bits_of(Register x) { return RegisterBits(x); }
FUSEDOPT_INLINE Register floats_of(RegisterBits u) { return Register(u); }
#endif
template <typename Vector>
FUSEDOPT_INLINE Vector load_register(const void* from) {
  Vector v;
  std::memcpy(&v, from, sizeof v);
  return v;
}
template <typename Vector>
FUSEDOPT_INLINE void store_register(void* to, const Vector& v) {
  std::memcpy(to, &v, sizeof v);
}

#if FUSEDOPT_LANES_AVX512
FUSEDOPT_INLINE Register max_of(Register a, Register b) { return _mm512_max_ps(a, b); }
FUSEDOPT_INLINE Register sqrt(Register a) { return _mm512_sqrt_ps(a); }
FUSEDOPT_INLINE NanFlags nan_flags(Floats x) {
  return _mm512_cmp_ps_mask(x.lo, x.hi, _CMP_UNORD_Q);
}
FUSEDOPT_INLINE bool any_nan(NanFlags flags) { return flags != 0; }
// kRegister bfloat16 widened to float32, in element order: one vpmovzxwd from memory and a shift
// (GCC 12's __builtin_convertvector widens two halves and joins them).
FUSEDOPT_INLINE Register widen(const Eigen::bfloat16* p) {
  const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16));
}
FUSEDOPT_INLINE Floats load_unpacked(const Eigen::bfloat16* p) {
  const __m512i words = _mm512_loadu_si512(p), zero = _mm512_setzero_si512();
  return {_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, words)),
          _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, words))};
}
// The 16-bit word holding element e's bfloat16, the high half of its 32-bit lane, in vpermt2w's
// numbering of two registers (lo's words, then hi's).
template <bool Unpacked>
alignas(64) inline constexpr std::array<std::uint16_t, kLaneWidth> kHighWords = [] {
  std::array<std::uint16_t, kLaneWidth> words{};
  for (std::uint32_t half = 0; half < 2; ++half) {
    for (std::uint32_t p = 0; p < kRegister; ++p)
      words[element_at(p, half, Unpacked)] =
          static_cast<std::uint16_t>(2 * (kRegister * half + p) + 1);
  }
  return words;
}();
// The high words of lo's and hi's 32-bit lanes (rounded bfloat16), stored in element order.
template <bool Unpacked>
FUSEDOPT_INLINE void store_high_words(Eigen::bfloat16* p, RegisterBits lo, RegisterBits hi) {
  _mm512_storeu_si512(
      p, _mm512_permutex2var_epi16(__m512i(lo), _mm512_loadu_si512(kHighWords<Unpacked>.data()),
                                   __m512i(hi)));
}
#else
FUSEDOPT_INLINE Register max_of(Register a, Register b) { return _mm256_max_ps(a, b); }
FUSEDOPT_INLINE Register sqrt(Register a) { return _mm256_sqrt_ps(a); }
FUSEDOPT_INLINE NanFlags nan_flags(Floats x) {
  return bits_of(_mm256_cmp_ps(x.lo, x.hi, _CMP_UNORD_Q));
}
FUSEDOPT_INLINE bool any_nan(NanFlags flags) { return _mm256_movemask_ps(floats_of(flags)) != 0; }
FUSEDOPT_INLINE Register widen(const Eigen::bfloat16* p) {
  const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16));
}
FUSEDOPT_INLINE Floats load_unpacked(const Eigen::bfloat16* p) {
  const auto words = load_register<RegisterBits>(p);
  return {floats_of(words << 16), floats_of(words & 0xFFFF0000U)};
}
template <bool Unpacked>
FUSEDOPT_INLINE void store_high_words(Eigen::bfloat16* p, RegisterBits lo, RegisterBits hi) {
  __m256i words;
  if constexpr (Unpacked) {  // even elements' words from lo's high halves, odd from hi's
    words = _mm256_blend_epi16(__m256i(lo >> 16), __m256i(hi), 0xAA);
  } else {  // packed per 128-bit half: 0-3, 8-11, 4-7, 12-15
    words =
        _mm256_permute4x64_epi64(_mm256_packus_epi32(__m256i(lo >> 16), __m256i(hi >> 16)), 0xD8);
  }
  store_register(p, words);
}
#endif

#define FUSEDOPT_FLOATS_OPERATOR(op)                                                              \
  FUSEDOPT_INLINE Floats operator op(Floats a, Floats b) { return {a.lo op b.lo, a.hi op b.hi}; } \
  FUSEDOPT_INLINE Floats operator op(float a, Floats b) { return {a op b.lo, a op b.hi}; }        \
  FUSEDOPT_INLINE Floats operator op(Floats a, float b) { return {a.lo op b, a.hi op b}; }
FUSEDOPT_FLOATS_OPERATOR(+)
FUSEDOPT_FLOATS_OPERATOR(-)
FUSEDOPT_FLOATS_OPERATOR(*)
FUSEDOPT_FLOATS_OPERATOR(/)
#undef FUSEDOPT_FLOATS_OPERATOR
// the sign bit cleared, as std::abs (NaN too)
FUSEDOPT_INLINE Register abs(Register x) { return floats_of(bits_of(x) & 0x7FFFFFFFU); }
// numpy.sign: +0 for either zero; NaN stays NaN
FUSEDOPT_INLINE Register numpy_sign(Register x) {
  const Register zero{}, one = zero + 1.0F;
  return x != x ? x : x > zero ? one : x < zero ? -one : zero;
}
// vmaxps gives b unless a > b (so where either is NaN): a where a is NaN.
FUSEDOPT_INLINE Register numpy_maximum(Register a, Register b) { return a != a ? a : max_of(a, b); }
// Each applied to both of a lane's registers.
#define FUSEDOPT_LANE_FUNCTION(name) \
  FUSEDOPT_INLINE Floats name(Floats x) { return {name(x.lo), name(x.hi)}; }
FUSEDOPT_LANE_FUNCTION(abs)
FUSEDOPT_LANE_FUNCTION(sqrt)
FUSEDOPT_LANE_FUNCTION(numpy_sign)
FUSEDOPT_LANE_FUNCTION(zero_if_negative)
#undef FUSEDOPT_LANE_FUNCTION
FUSEDOPT_INLINE Floats numpy_maximum(Floats a, Floats b) {
  return {numpy_maximum(a.lo, b.lo), numpy_maximum(a.hi, b.hi)};
}

template <bool has_l2, typename Param>
FUSEDOPT_INLINE Floats effective_grad(const Negation<float>& maximize, Floats grad, Param param,
                                      float l2) {
  const Floats g{floats_of(bits_of(grad.lo) ^ maximize.mask),
                 floats_of(bits_of(grad.hi) ^ maximize.mask)};
  if constexpr (has_l2) return g + l2 * param;
  return g;
}

// The Weyl offset of each position's element from the lane's first: lo's, then hi's.
template <bool Unpacked>
alignas(64) inline constexpr std::array<std::uint32_t, kLaneWidth> kWeylOffsets = [] {
  std::array<std::uint32_t, kLaneWidth> offsets{};
  for (std::uint32_t half = 0; half < 2; ++half) {
    for (std::uint32_t p = 0; p < kRegister; ++p)
      offsets[half * kRegister + p] = element_at(p, half, Unpacked) * kWeylStep;
  }
  return offsets;
}();

// Elements i .. i + kLaneWidth - 1 of a chunk. A bfloat16 store is made at once as if no value
// were NaN (its bits plus the rounding's: round_to_bfloat16 but for NaN); finish() makes the
// lane's bfloat16 stores again, with NaN made the quiet NaN of its sign, if any value was.
// Stochastically, the bits are Rounder's (slot_bits of fmix32 of the elements' Weyl terms).
//
// Unpacked (rows whose every array is bfloat16): the elements lie in the registers in the order
// element_at gives, which the level's bfloat16 loads and stores take in the fewest instructions.
// The arithmetic is element by element; only the Weyl offsets and the packing of stores see the
// order.
template <bool Stochastic, bool Unpacked, bool Codes = false>
struct VectorLane {
  FUSEDOPT_INLINE VectorLane(std::uint64_t key, std::uint32_t first, ChunkIndex at) : i(at) {
    if constexpr (Stochastic || Codes) {  // the lane's first Weyl term plus each position's offset
      const std::uint32_t start = weyl_term(key, first + static_cast<std::uint32_t>(at));
      const std::uint32_t* const offsets = kWeylOffsets<Unpacked>.data();
      half0[0] = fmix32(start + load_register<RegisterBits>(offsets));
      half0[1] = fmix32(start + load_register<RegisterBits>(offsets + kRegister));
    }
  }

  FUSEDOPT_INLINE Floats load(const float* p) const {
    static_assert(!Unpacked, "an unpacked row loads bfloat16 arrays only");
    return {load_register<Register>(p + i), load_register<Register>(p + i + kRegister)};
  }
  // bfloat16 to float32 is exact: its bits in the high half
  FUSEDOPT_INLINE Floats load(const Eigen::bfloat16* p) const {
    if constexpr (Unpacked) {
      return load_unpacked(p + i);
    } else {
      return {widen(p + i), widen(p + i + kRegister)};
    }
  }
  FUSEDOPT_INLINE Floats load(const StagedCode* p) const {
    return load(reinterpret_cast<const float*>(p));
  }
  // A staged int8 state's values and, kCodePiece elements further on, the slot's 16 random bits,
  // as Rounder stores a StagedCode: drawn here, beside the formula's divider.
  FUSEDOPT_INLINE void store(int slot, StagedCode* p, Floats x) const {
    static_assert(Codes && !Unpacked, "a row with staged codes draws their bits, in order");
    float* const values = reinterpret_cast<float*>(p);
    store(slot, values, x);
    store_register(values + kCodePiece + i, slot_bits(half0[0], slot));
    store_register(values + kCodePiece + i + kRegister, slot_bits(half0[1], slot));
  }
  FUSEDOPT_INLINE void store(int, float* p, Floats x) const {
    static_assert(!Unpacked, "an unpacked row stores bfloat16 arrays only");
    store_register(p + i, x.lo);
    store_register(p + i + kRegister, x.hi);
  }
  FUSEDOPT_INLINE void store(int slot, Eigen::bfloat16* p, Floats x) {
    assert(count < 4 && "a kernel writes each of at most 4 arrays once");
    nan |= nan_flags(x);
    pending[count++] = {slot, p, x};
    round_into(slot, p, x, false);
  }
  FUSEDOPT_INLINE void finish() const {
    if (__builtin_expect(any_nan(nan), 0)) {
      for (int s = 0; s < count; ++s)
        round_into(pending[s].slot, pending[s].to, pending[s].x, true);
    }
  }

 private:
  // x's bits rounded to bfloat16 in their high halves; register `half` (0: lo, 1: hi).
  FUSEDOPT_INLINE RegisterBits rounded(int slot, int half, Register x, bool fix_nan) const {
    const RegisterBits u = bits_of(x);
    RegisterBits sum;
    if constexpr (Stochastic) {
      sum = u + slot_bits(half0[half], slot);
    } else {
      sum = u + nearest_even_below(u);
    }
    if (!fix_nan) return sum;
    return x != x ? quiet_nan_bits(u) : sum;
  }
  FUSEDOPT_INLINE void round_into(int slot, Eigen::bfloat16* p, Floats x, bool fix_nan) const {
    store_high_words<Unpacked>(p + i, rounded(slot, 0, x.lo, fix_nan),
                               rounded(slot, 1, x.hi, fix_nan));
  }

  struct Pending {
    int slot;
    Eigen::bfloat16* to;
    Floats x;
  };
  ChunkIndex i;
  RegisterBits half0[2];  // fmix32 of lo's and hi's Weyl terms
  Pending pending[4];     // slots 0-3
  int count = 0;
  NanFlags nan{};
};
#if FUSEDOPT_LANES_AVX512 && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

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
