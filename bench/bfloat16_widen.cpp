// What a bfloat16 load and store cost per element on this core, in L1, by the instructions that
// do them: the order-keeping ones GCC emits for the kernels' loops (vpmovzxwd and vpslld to
// widen, a mask, vpackusdw and vpermq to narrow: the widening and the vpermq cross 128-bit
// lanes) against in-lane ones, which reorder the elements: unpacking with zero puts elements
// 0-3 and 8-11 of 16 in the first vector, and 32-bit words of two elements put the even ones in
// the first vector and the odd ones in the second. A kernel could use those only if every array
// of its loop were read and written in the same order.
//
//   g++ -O2 -mavx2 -o /tmp/bfloat16_widen bench/bfloat16_widen.cpp && /tmp/bfloat16_widen
//
// Figures: bench/results/low_precision.md.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr int kCount = 4096;  // 8 KiB of bfloat16, 16 KiB of float32: in L1
constexpr int kRepeats = 4000;

enum class Kind { keep_order, unpack_with_zero, pairs };

// 16 bfloat16 (one 256-bit load) into two vectors of float32 bits.
template <Kind kind>
inline void widen(__m256i x, __m256i& first, __m256i& second) {
  if constexpr (kind == Kind::keep_order) {
    first = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(x)), 16);
    second = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1)), 16);
  } else if constexpr (kind == Kind::unpack_with_zero) {
    first = _mm256_unpacklo_epi16(_mm256_setzero_si256(), x);
    second = _mm256_unpackhi_epi16(_mm256_setzero_si256(), x);
  } else {
    first = _mm256_slli_epi32(x, 16);
    second = _mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000U)));
  }
}

// Two vectors of float32 bits (already rounded: the bfloat16 in the high halves) into 16
// bfloat16, the inverse of widen<kind>.
template <Kind kind>
inline __m256i narrow(__m256i first, __m256i second) {
  if constexpr (kind == Kind::keep_order) {
    const __m256i low = _mm256_set1_epi32(0xFFFF);  // GCC's mask before the unsigned pack
    const __m256i packed =
        _mm256_packus_epi32(_mm256_and_si256(_mm256_srli_epi32(first, 16), low),
                            _mm256_and_si256(_mm256_srli_epi32(second, 16), low));
    return _mm256_permute4x64_epi64(packed, 0xD8);
  } else if constexpr (kind == Kind::unpack_with_zero) {
    return _mm256_packus_epi32(_mm256_srli_epi32(first, 16), _mm256_srli_epi32(second, 16));
  } else {
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000U));
    return _mm256_or_si256(_mm256_srli_epi32(first, 16), _mm256_and_si256(second, high));
  }
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// ns per element of widening, each result added into one of eight sums held in registers (one
// add per widened vector, no chain of adds long enough to bound it), best of nine.
template <Kind kind>
double widen_time(const std::uint16_t* in) {
  double best = 1e9;
  for (int run = 0; run < 9; ++run) {
    const auto start = std::chrono::steady_clock::now();
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    const auto add = [](__m256& sum, __m256i bits) {
      sum = _mm256_add_ps(sum, _mm256_castsi256_ps(bits));
    };
    for (int r = 0; r < kRepeats; ++r) {
      for (int i = 0; i < kCount; i += 64) {
        __m256i first, second;
        widen<kind>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)), first, second);
        add(s0, first);
        add(s1, second);
        widen<kind>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i + 16)), first,
                    second);
        add(s2, first);
        add(s3, second);
        widen<kind>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i + 32)), first,
                    second);
        add(s4, first);
        add(s5, second);
        widen<kind>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i + 48)), first,
                    second);
        add(s6, first);
        add(s7, second);
      }
    }
    best = std::min(best, seconds_since(start) / kRepeats / kCount * 1e9);
    // every sum is used, so no widening is dead code
    const __m256 total = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)),
                                       _mm256_add_ps(_mm256_add_ps(s4, s5), _mm256_add_ps(s6, s7)));
    volatile float sink = _mm256_cvtss_f32(total);
    (void)sink;
  }
  return best;
}

// ns per element of a load, widening, narrowing and store (the bits unchanged), best of nine.
template <Kind kind>
double round_trip_time(std::uint16_t* data) {
  double best = 1e9;
  for (int run = 0; run < 9; ++run) {
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < kRepeats; ++r) {
      for (int i = 0; i < kCount; i += 16) {
        auto* at = reinterpret_cast<__m256i*>(data + i);
        __m256i first, second;
        widen<kind>(_mm256_loadu_si256(at), first, second);
        _mm256_storeu_si256(at, narrow<kind>(first, second));
      }
    }
    best = std::min(best, seconds_since(start) / kRepeats / kCount * 1e9);
  }
  return best;
}

}  // namespace

int main() {
  std::vector<std::uint16_t> data(kCount);
  for (int i = 0; i < kCount; ++i) data[i] = static_cast<std::uint16_t>(0x3F80 + (i & 127));
  const std::vector<std::uint16_t> before = data;
  std::printf("ns per element, in L1    widen    load, widen, narrow, store\n");
  std::printf("order kept (GCC's)       %.4f   %.4f\n", widen_time<Kind::keep_order>(data.data()),
              round_trip_time<Kind::keep_order>(data.data()));
  std::printf("unpack with zero         %.4f   %.4f\n",
              widen_time<Kind::unpack_with_zero>(data.data()),
              round_trip_time<Kind::unpack_with_zero>(data.data()));
  std::printf("pairs                    %.4f   %.4f\n", widen_time<Kind::pairs>(data.data()),
              round_trip_time<Kind::pairs>(data.data()));
  return data == before ? 0 : 1;  // every round trip must give back the same bits
}
