// How much of all-bfloat16 Adam's arithmetic is the generic loops' conversions? Adam's kernel
// (csrc/kernels, as the library runs it) against the same step hand-written with AVX-512
// intrinsics, bit for bit the library's, over one 2048-element chunk in L1 on one thread:
//   - loads widen 16 bfloat16 with one vpmovzxwd from memory and a shift (GCC's loops load 32,
//     reload half and extract the other: three instructions where this takes two);
//   - stores pick the high 16 bits of 32 floats with one vpermt2w (GCC shifts both first);
//   - to nearest, 32 floats convert with one AVX512-BF16 vcvtne2ps2bf16; the lanes it treats
//     otherwise than the library (NaN keeps a payload, subnormals flush to zero) are found with
//     vfpclassps and, when there are any, the 32 are redone in software;
//   - stochastically, the random bits are the library's (Rounder); the quiet-NaN fix runs only
//     for a block of 32 that holds a NaN, one test for all its vectors.
// A check first runs both for six steps (to nearest and stochastic, with NaN, inf and
// subnormal lanes) and stops unless every bit agrees. Then ns per element, median (and range)
// of 9 alternations.
//
//   eigen=$(python -c "import cmeel; print(cmeel.__path__[0] + '.prefix/include/eigen3')")
//   flags="-std=c++17 -O3 -fno-math-errno -ffp-contract=off -fopenmp-simd -mavx2 -mfma -mf16c"
//   flags="$flags -mbmi2 -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx512bf16"
//   g++ $flags -Icsrc -I"$eigen" bench/bfloat16_avx512.cpp -o /tmp/bfloat16_avx512
//   /tmp/bfloat16_avx512
//
// Without -mavx512bf16 the store to nearest is in software too. Figures:
// bench/results/low_precision.md.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "adam_chunk.hpp"

namespace {

using namespace fusedopt;
using namespace fusedopt::bench;
using bfloat16 = Eigen::bfloat16;
using Kernel = AdamKernel<Storage<float, bfloat16, bfloat16, bfloat16>>;
constexpr std::uint64_t kKey = 1234;

__m512i broadcast(std::uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }

// 16 bfloat16 to float32, in order.
__m512 load16(const std::uint16_t* p) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// x's bits plus `below`, or the quiet NaN of x's sign where x is NaN (round_to_bfloat16).
__m512i add_below(__m512 x, __m512i below) {
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(_mm512_add_epi32(u, below), nan,
                              _mm512_and_si512(u, broadcast(0x80000000U)), broadcast(0x7FC00000U));
}

// The high 16 bits of 32 words (lo's 16, then hi's), stored as 32 bfloat16.
void store_high_halves(std::uint16_t* p, __m512i lo, __m512i hi) {
  const __m512i odd_words =
      _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27,
                       25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  _mm512_storeu_si512(p, _mm512_permutex2var_epi16(lo, odd_words, hi));
}

__m512i nearest_even_below(__m512 x) {  // 0x7FFF plus the bit kept last
  const __m512i kept_last =
      _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 16), broadcast(1));
  return _mm512_add_epi32(broadcast(0x7FFF), kept_last);
}

void store_nearest(std::uint16_t* p, __m512 lo, __m512 hi) {
#ifdef __AVX512BF16__
  // quiet NaN, denormal, signaling NaN (none reaches here: arithmetic quiets NaNs, but a
  // lane the instruction would treat otherwise must never pass unchecked)
  constexpr int kNaNOrSubnormal = 0x01 | 0x20 | 0x80;
  const __mmask16 odd_lo = _mm512_fpclass_ps_mask(lo, kNaNOrSubnormal);
  const __mmask16 odd_hi = _mm512_fpclass_ps_mask(hi, kNaNOrSubnormal);
  if (__builtin_expect(_kortestz_mask16_u8(odd_lo, odd_hi), 1)) {
    _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    return;
  }
#endif
  store_high_halves(p, add_below(lo, nearest_even_below(lo)),
                    add_below(hi, nearest_even_below(hi)));
}

// Adam without an L2 term, AMSGrad or maximize, over one chunk: the kernel's formula, in its
// order, 32 elements an iteration.
template <bool Stochastic>
__attribute__((noinline)) void intrinsics_step(const Kernel& k, const Rounding& rounding,
                                               std::uint16_t* param, const std::uint16_t* grad,
                                               std::uint16_t* exp_avg, std::uint16_t* exp_avg_sq) {
  const __m512 beta1 = _mm512_set1_ps(k.beta1), one_minus_beta1 = _mm512_set1_ps(k.one_minus_beta1);
  const __m512 beta2 = _mm512_set1_ps(k.beta2), one_minus_beta2 = _mm512_set1_ps(k.one_minus_beta2);
  const __m512 eps = _mm512_set1_ps(k.eps), step_size = _mm512_set1_ps(k.step_size);
  const __m512 inverse_bc2 = _mm512_set1_ps(k.inverse_bias_correction2_sqrt);
  const __m512 decay = _mm512_set1_ps(k.decay);
  const Rounder<true> rounder(rounding);
  const __m512i step = broadcast(16 * kWeylStep);
  __m512i weyl = _mm512_add_epi32(  // the Weyl terms of 16 elements (Rounder::term)
      broadcast(rounder.start),
      _mm512_mullo_epi32(broadcast(kWeylStep),
                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)));
  for (Index i = 0; i < kCount; i += 32) {
    __m512 p_new[2], m_new[2], v_new[2];
    __m512i half0[2];
    for (int h = 0; h < 2; ++h) {
      const Index at = i + 16 * h;
      const __m512 p = load16(param + at), g = load16(grad + at);
      const __m512 m = _mm512_add_ps(_mm512_mul_ps(beta1, load16(exp_avg + at)),
                                     _mm512_mul_ps(one_minus_beta1, g));
      const __m512 v = _mm512_add_ps(_mm512_mul_ps(beta2, load16(exp_avg_sq + at)),
                                     _mm512_mul_ps(_mm512_mul_ps(one_minus_beta2, g), g));
      const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), inverse_bc2), eps);
      p_new[h] =
          _mm512_sub_ps(_mm512_mul_ps(p, decay), _mm512_div_ps(_mm512_mul_ps(step_size, m), denom));
      m_new[h] = m;
      v_new[h] = v;
      if constexpr (Stochastic) {  // fmix32 of the Weyl terms
        __m512i x = _mm512_xor_si512(weyl, _mm512_srli_epi32(weyl, 16));
        x = _mm512_mullo_epi32(x, broadcast(0x85EBCA6BU));
        x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
        x = _mm512_mullo_epi32(x, broadcast(0xC2B2AE35U));
        half0[h] = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
        weyl = _mm512_add_epi32(weyl, step);
      }
    }
    if constexpr (Stochastic) {
      __m512i param_bits[2], exp_avg_bits[2], exp_avg_sq_bits[2];  // slots 0, 1, 2
      for (int h = 0; h < 2; ++h) {
        param_bits[h] = _mm512_and_si512(half0[h], broadcast(0xFFFF));
        exp_avg_bits[h] = _mm512_srli_epi32(half0[h], 16);
        const __m512i folded = _mm512_xor_si512(half0[h], exp_avg_bits[h]);
        exp_avg_sq_bits[h] =
            _mm512_srli_epi32(_mm512_mullo_epi32(folded, broadcast(0x7FEB352DU)), 16);
      }
      const __mmask16 any_nan = _mm512_cmp_ps_mask(m_new[0], v_new[0], _CMP_UNORD_Q) |
                                _mm512_cmp_ps_mask(m_new[1], v_new[1], _CMP_UNORD_Q) |
                                _mm512_cmp_ps_mask(p_new[0], p_new[1], _CMP_UNORD_Q);
      const auto add = [any_nan](__m512 x, __m512i bits) {
        return any_nan == 0 ? _mm512_add_epi32(_mm512_castps_si512(x), bits) : add_below(x, bits);
      };
      store_high_halves(exp_avg + i, add(m_new[0], exp_avg_bits[0]),
                        add(m_new[1], exp_avg_bits[1]));
      store_high_halves(exp_avg_sq + i, add(v_new[0], exp_avg_sq_bits[0]),
                        add(v_new[1], exp_avg_sq_bits[1]));
      store_high_halves(param + i, add(p_new[0], param_bits[0]), add(p_new[1], param_bits[1]));
    } else {
      store_nearest(exp_avg + i, m_new[0], m_new[1]);
      store_nearest(exp_avg_sq + i, v_new[0], v_new[1]);
      store_nearest(param + i, p_new[0], p_new[1]);
    }
  }
}

__attribute__((noinline)) void library_step(const Kernel& k, void* const* arrays,
                                            const Rounding& rounding) {
  k(arrays, 0, kCount, rounding);
}

// A chunk of Adam's arrays, and the intrinsics' view of them.
struct Arrays : AdamArrays<bfloat16> {
  using AdamArrays::AdamArrays;
  static std::uint16_t* words(std::vector<bfloat16>& x) {
    return reinterpret_cast<std::uint16_t*>(x.data());
  }
  template <bool Stochastic>
  void intrinsics(const Kernel& k, const Rounding& rounding) {
    intrinsics_step<Stochastic>(k, rounding, words(param), words(grad), words(exp_avg),
                                words(exp_avg_sq));
  }
  bool operator==(const Arrays& other) const {
    const auto same = [](const std::vector<bfloat16>& a, const std::vector<bfloat16>& b) {
      return std::memcmp(a.data(), b.data(), a.size() * sizeof(bfloat16)) == 0;
    };
    return same(param, other.param) && same(exp_avg, other.exp_avg) &&
           same(exp_avg_sq, other.exp_avg_sq);
  }
};

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx512bw")) {
    std::printf("this CPU has no AVX-512 (BW)\n");
    return 0;
  }
#ifdef __AVX512BF16__
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("this CPU has no AVX512-BF16: build without -mavx512bf16\n");
    return 0;
  }
#endif
  const auto kernel = adam_kernel<Storage<float, bfloat16, bfloat16, bfloat16>>();
  // a tensor key as the library makes them (the random bits take its low 32 bits)
  const Rounding nearest{}, stochastic{true, tensor_key(kKey, 10, 0), 4096};

  std::mt19937 generator(1);
  Arrays library(generator);
  for (int j = 0; j < 64; ++j) {  // first moments that stay subnormal
    library.grad[100 + j] = bfloat16(j % 2 ? -1e-38f : 1e-39f);
    library.exp_avg[100 + j] = bfloat16(0.0f);
  }
  library.param[7] = Eigen::numext::bit_cast<bfloat16>(std::uint16_t{0x7F81});  // NaN payloads
  library.grad[9] = Eigen::numext::bit_cast<bfloat16>(std::uint16_t{0xFFC3});
  library.exp_avg_sq[11] = bfloat16(INFINITY);
  library.param[13] = bfloat16(1e-39f);  // a param that stays subnormal: no update
  library.grad[13] = library.exp_avg[13] = bfloat16(0.0f);
  Arrays hand = library;
  for (int step = 0; step < 6; ++step) {
    const bool is_stochastic = step % 2 == 1;
    library_step(kernel, library.pointers().data(), is_stochastic ? stochastic : nearest);
    if (is_stochastic) {
      hand.intrinsics<true>(kernel, stochastic);
    } else {
      hand.intrinsics<false>(kernel, nearest);
    }
    if (!(library == hand)) {
      std::printf("!! the intrinsics compute other bits than the library (step %d)\n", step);
      return 1;
    }
  }
  std::printf("same bits: yes (six steps, to nearest and stochastic, NaN, inf, subnormal lanes)\n");

  const char* names[] = {"library, to nearest", "intrinsics, to nearest", "library, stochastic",
                         "intrinsics, stochastic"};
  std::vector<double> times[4];
  for (int alternation = 0; alternation < 9; ++alternation) {
    times[0].push_back(
        ns_per_element([&] { library_step(kernel, library.pointers().data(), nearest); }));
    times[1].push_back(ns_per_element([&] { hand.intrinsics<false>(kernel, nearest); }));
    times[2].push_back(
        ns_per_element([&] { library_step(kernel, library.pointers().data(), stochastic); }));
    times[3].push_back(ns_per_element([&] { hand.intrinsics<true>(kernel, stochastic); }));
  }
  std::printf("Adam, one chunk of %td bfloat16 elements in L1, one thread, ns per element\n",
              kCount);
  for (int i = 0; i < 4; ++i) {
    std::sort(times[i].begin(), times[i].end());
    std::printf("%-24s %.3f (%.3f-%.3f)\n", names[i], times[i][4], times[i][0], times[i][8]);
  }
}
