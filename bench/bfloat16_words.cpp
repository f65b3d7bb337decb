// Would reading bfloat16 arrays as 32-bit words make the all-bfloat16 Adam step much cheaper?
// The kernels' loops load a bfloat16 with an order-keeping widening that crosses 128-bit lanes,
// and store it with a pack and a permute (bench/bfloat16_widen.cpp). Read as 32-bit words, a
// chunk's even elements are the words shifted left by 16 and its odd ones the words masked:
// in-lane, one instruction each. This runs Adam's own kernel (csrc/kernels) over one chunk in
// L1 three ways, and checks that all give the same bits:
//   - as the library does (bfloat16 arrays);
//   - as two passes over the words, even elements then odd ones: the kernel instantiated with
//     word-half storage types, each store merged into its word (the random bits' counter is the
//     element's index, 2 k + half, so the stochastic bits are the library's);
//   - float32, for scale.
// One thread, ns per element, median of 9 alternations.
//
//   eigen=$(python -c "import cmeel; print(cmeel.__path__[0] + '.prefix/include/eigen3')")
//   flags="-std=c++17 -O3 -fno-math-errno -ffp-contract=off -fopenmp-simd -mavx2 -mfma -mf16c"
//   g++ $flags -mbmi2 -Icsrc -I"$eigen" bench/bfloat16_words.cpp -o /tmp/bfloat16_words
//   /tmp/bfloat16_words
//
// Figures: bench/results/low_precision.md.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "adam_chunk.hpp"

namespace fusedopt {

// Half 0 (even elements: the low 16 bits) or 1 (odd: the high 16) of a 32-bit word. It reads
// and writes bfloat16 arrays: may_alias keeps that defined.
template <int Half>
struct __attribute__((may_alias)) WordHalf {
  std::uint32_t word;
};
template <typename Compute, int Half>
FUSEDOPT_INLINE Compute load(WordHalf<Half> x) {
  return bits_float(Half == 0 ? x.word << 16 : x.word & 0xFFFF0000U);
}

// The library's own rounding (Rounder) into a bfloat16, whose 16 bits are then merged into the
// word. Element k of a pass is element 2 k + Half of the chunk: the rounder's first counter is
// Half, and it is called with 2 k, so the random bits are the library's.
template <bool Stochastic>
struct WordRounder {
  Rounder<Stochastic> rounder;

  template <int Half, typename Compute>
  FUSEDOPT_INLINE void operator()(ChunkIndex k, int slot, WordHalf<Half>& to, Compute x) const {
    Eigen::bfloat16 stored;
    rounder(2 * k, slot, stored, x);
    const std::uint32_t rounded = Eigen::numext::bit_cast<std::uint16_t>(stored);
    to.word = Half == 0 ? (to.word & 0xFFFF0000U) | rounded : (to.word & 0xFFFFU) | (rounded << 16);
  }
};

}  // namespace fusedopt

namespace {

using namespace fusedopt;
using namespace fusedopt::bench;
using bfloat16 = Eigen::bfloat16;
constexpr std::uint64_t kKey = 1234;

template <int Half>
WordHalf<Half>* words(std::vector<bfloat16>& x) {
  static_assert(sizeof(WordHalf<Half>) == 2 * sizeof(bfloat16));
  return reinterpret_cast<WordHalf<Half>*>(x.data());
}

using EvenKernel = AdamKernel<Storage<float, WordHalf<0>, WordHalf<0>, WordHalf<0>>>;
using OddKernel = AdamKernel<Storage<float, WordHalf<1>, WordHalf<1>, WordHalf<1>>>;

// Two passes, even elements then odd, with Adam's kernel over kCount / 2 words.
template <bool Stochastic>
void word_step(const EvenKernel& even, const OddKernel& odd, AdamArrays<bfloat16>& a) {
  even.template run<false, false>(
      kCount / 2, WordRounder<Stochastic>{Rounder<Stochastic>(Rounding{Stochastic, kKey, 0})},
      words<0>(a.param), words<0>(a.grad), words<0>(a.exp_avg), words<0>(a.exp_avg_sq), nullptr);
  odd.template run<false, false>(
      kCount / 2, WordRounder<Stochastic>{Rounder<Stochastic>(Rounding{Stochastic, kKey, 1})},
      words<1>(a.param), words<1>(a.grad), words<1>(a.exp_avg), words<1>(a.exp_avg_sq), nullptr);
}

std::uint64_t checksum(const AdamArrays<bfloat16>& a) {
  std::uint64_t sum = 0;
  for (const auto* x : {&a.param, &a.exp_avg, &a.exp_avg_sq}) {
    for (const bfloat16 y : *x) sum = sum * 31 + Eigen::numext::bit_cast<std::uint16_t>(y);
  }
  return sum;
}

}  // namespace

int main() {
  const auto float32_kernel = adam_kernel<Uniform<float>>();
  const auto bfloat16_kernel = adam_kernel<Storage<float, bfloat16, bfloat16, bfloat16>>();
  const auto even = adam_kernel<Storage<float, WordHalf<0>, WordHalf<0>, WordHalf<0>>>();
  const auto odd = adam_kernel<Storage<float, WordHalf<1>, WordHalf<1>, WordHalf<1>>>();
  const Rounding nearest{}, stochastic{true, kKey, 0};

  std::mt19937 generator(1);
  AdamArrays<float> float32(generator);
  AdamArrays<bfloat16> library(generator);
  AdamArrays<bfloat16> word_view = library;

  // the same bits, to nearest and stochastically, over a few steps
  for (int r = 0; r < 3; ++r) {
    bfloat16_kernel(library.pointers().data(), 0, kCount, r % 2 ? stochastic : nearest);
    if (r % 2) {
      word_step<true>(even, odd, word_view);
    } else {
      word_step<false>(even, odd, word_view);
    }
  }
  if (checksum(library) != checksum(word_view)) {
    std::printf("!! the word view computes other bits than the library\n");
    return 1;
  }

  const char* names[] = {"float32", "bfloat16, to nearest (library)",
                         "bfloat16, to nearest (words)", "bfloat16, stochastic (library)",
                         "bfloat16, stochastic (words)"};
  std::vector<double> times[5];
  for (int alternation = 0; alternation < 9; ++alternation) {
    times[0].push_back(
        ns_per_element([&] { float32_kernel(float32.pointers().data(), 0, kCount, nearest); }));
    times[1].push_back(
        ns_per_element([&] { bfloat16_kernel(library.pointers().data(), 0, kCount, nearest); }));
    times[2].push_back(ns_per_element([&] { word_step<false>(even, odd, word_view); }));
    times[3].push_back(
        ns_per_element([&] { bfloat16_kernel(library.pointers().data(), 0, kCount, stochastic); }));
    times[4].push_back(ns_per_element([&] { word_step<true>(even, odd, word_view); }));
  }
  // (the timed steps' results are used: the compiler cannot drop them)
  std::printf(
      "Adam, one chunk of %td elements in L1, one thread, median of 9 (same bits: yes; "
      "checksums %llx %llx %g)\n",
      kCount, static_cast<unsigned long long>(checksum(library)),
      static_cast<unsigned long long>(checksum(word_view)),
      static_cast<double>(float32.param[kCount / 2]));
  for (int i = 0; i < 5; ++i) {
    std::sort(times[i].begin(), times[i].end());
    std::printf("%-32s %.3f ns/element\n", names[i], times[i][4]);
  }
}
