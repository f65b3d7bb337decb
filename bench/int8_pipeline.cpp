// Where float32 Adam with int8 state spends its time: its pipeline (decode both states, the
// float32 step, the random bits, encode both states) over one tensor of n elements on OpenMP
// threads, in 2048-element chunks as the library splits it. Run at a size whose arrays fit L3
// (1e6) and at one in DRAM (1e7), the difference is what memory adds to the arithmetic. The
// variants: the whole pipeline per chunk (`pipeline`, as csrc/level.cpp ran it up to b6f0914),
// with the next chunk prefetched, or with the param and grad kept in cache; and per 512-element
// piece (`pieces`), then with the random bits drawn in the step's loop (`pieces+bits`, as
// csrc/level.cpp runs it since 2d894de, kCodePiece and StagedCode), and that with the next piece
// prefetched (`+ahead`, not in the library). The step is Adam's formula in
// fusedopt's order (csrc/kernels/optimizers/adam.hpp).
//
//   eigen=$(python -c "import cmeel; print(cmeel.__path__[0] + '.prefix/include/eigen3')")
//   flags="-std=c++17 -O3 -fno-math-errno -ffp-contract=off -fopenmp -mavx2 -mfma -mf16c -mbmi2"
//   flags="$flags -mavx512f -mavx512vl -mavx512bw -mavx512dq"   # the avx512 level
//   g++ $flags -Icsrc/kernels -I"$eigen" bench/int8_pipeline.cpp -o /tmp/int8_pipeline
//   OMP_NUM_THREADS=2 /tmp/int8_pipeline 10000000
//   OMP_NUM_THREADS=1 /tmp/int8_pipeline 1000000 phases   # the time of each phase, one thread
//
// Prints, per variant, the median ns per element of 15 alternated rounds and its ratio to the
// plain pipeline in the same round (median and quartiles). Figures: bench/results/low_precision.md.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "quantize.hpp"

namespace {

using fusedopt::Index;
using fusedopt::kBlock;
using fusedopt::kChunk;
using Clock = std::chrono::steady_clock;

constexpr float kBeta1 = 0.9F, kBeta2 = 0.999F, kEps = 1e-8F, kStepSize = 1e-3F, kBias2 = 1.3F;
constexpr Index kRing = 32768;  // elements: 256 KiB of param and grad together, in L2

enum class Variant { plain, prefetch, ring, pieces, pieces_bits, pieces_ahead };

struct Tensor {
  Index n;
  std::vector<float> param, grad, exp_avg_scales, exp_avg_sq_scales;
  std::vector<std::uint8_t> exp_avg, exp_avg_sq;  // int8 (signed) and uint8 codes
};

double phase_seconds[3];  // decode, step, bits and encode: one thread's, with `phases`

// Prefetches elements [from, to) of the chunk (or piece) at `next`, none past the tensor: param
// (for writing), grad, codes; into L1 (locality 3) or L2 (2).
template <int Locality = 3>
void prefetch(const Tensor& t, Index next, Index from, Index to) {
  to = std::min(to, t.n - next);
  for (Index e = from; e < to; e += 16) {
    __builtin_prefetch(t.param.data() + next + e, 1, Locality);
    __builtin_prefetch(t.grad.data() + next + e, 0, Locality);
    if (e % 64 == 0) {
      __builtin_prefetch(t.exp_avg.data() + next + e, 1, Locality);
      __builtin_prefetch(t.exp_avg_sq.data() + next + e, 1, Locality);
    }
  }
}

// Adam's step on element i, in fusedopt's order.
inline void adam_element(Index i, float* __restrict param, const float* __restrict grad,
                         float* __restrict m, float* __restrict v) {
  const float g = grad[i];
  const float mi = kBeta1 * m[i] + (1.0F - kBeta1) * g;
  const float vi = kBeta2 * v[i] + (1.0F - kBeta2) * g * g;
  m[i] = mi;
  v[i] = vi;
  param[i] = param[i] * 1.0F - kStepSize * mi / (std::sqrt(vi) * kBias2 + kEps);
}

// Adam's step over n elements; with `m_bits`, each element's random bits as the kernel's
// StagedCode stores draw them (half 0 for m's slot 1, folded_product for v's slot 2).
void step(Index n, float* __restrict param, const float* __restrict grad, float* __restrict m,
          float* __restrict v, std::uint64_t key, Index first, std::uint32_t* __restrict m_bits,
          std::uint32_t* __restrict v_bits) {
  if (m_bits == nullptr) {
#pragma omp simd
    for (Index i = 0; i < n; ++i) adam_element(i, param, grad, m, v);
    return;
  }
  std::uint32_t term = fusedopt::weyl_term(key, fusedopt::counter_of(first));
  const auto count = static_cast<std::uint32_t>(n);
#pragma omp simd linear(term : fusedopt::kWeylStep)
  for (std::uint32_t i = 0; i < count; ++i) {
    adam_element(i, param, grad, m, v);
    const std::uint32_t half0 = fusedopt::fmix32(term);
    m_bits[i] = half0;
    v_bits[i] = fusedopt::folded_product(half0);
    term += fusedopt::kWeylStep;
  }
}

// Elements [e, e + n) of the chunk at `offset`, the whole pipeline (the `pieces` variants); with
// `ahead`, the next piece's param, grad and codes prefetched into L2 as its blocks decode.
void run_piece(Tensor& t, Index offset, Index e, Index n, std::uint64_t key, bool bits_in_step,
               bool ahead, float* m, float* v, std::uint32_t* m_bits, std::uint32_t* v_bits) {
  const Index at = offset + e;
  std::uint8_t* const m_codes = t.exp_avg.data() + at;
  std::uint8_t* const v_codes = t.exp_avg_sq.data() + at;
  float* const m_scales = t.exp_avg_scales.data() + at / kBlock;
  float* const v_scales = t.exp_avg_sq_scales.data() + at / kBlock;
  fusedopt::for_each_block(n, [&](Index b, auto count) {
    fusedopt::decode_block<true>(m_codes + b * kBlock, m_scales[b], count, m + b * kBlock);
    fusedopt::decode_block<false>(v_codes + b * kBlock, v_scales[b], count, v + b * kBlock);
    if (ahead) prefetch<2>(t, at + fusedopt::kCodePiece, b * kBlock, (b + 1) * kBlock);
  });
  if (bits_in_step) {
    step(n, t.param.data() + at, t.grad.data() + at, m, v, key, at, m_bits, v_bits);
  } else {
    step(n, t.param.data() + at, t.grad.data() + at, m, v, key, at, nullptr, nullptr);
    fusedopt::chunk_bits(key, at, n, m_bits);
#pragma omp simd
    for (Index i = 0; i < n; ++i) v_bits[i] = fusedopt::folded_product(m_bits[i]);
  }
  fusedopt::for_each_block(n, [&](Index b, auto count) {
    const Index f = b * kBlock;
    std::uint32_t highest, lowest;
    fusedopt::magnitude_range(m + f, count, highest, lowest);
    m_scales[b] =
        fusedopt::encode_block<true, true>(m + f, count, m_codes + f, m_bits + f, highest, lowest);
    fusedopt::magnitude_range(v + f, count, highest, lowest);
    v_scales[b] =
        fusedopt::encode_block<false, true>(v + f, count, v_codes + f, v_bits + f, highest, lowest);
  });
}

void run(Tensor& t, Variant variant, std::uint64_t key, bool phases) {
  const Index chunks = (t.n + kChunk - 1) / kChunk;
#pragma omp parallel
  {
    alignas(64) static thread_local float m[kChunk], v[kChunk];
    alignas(64) static thread_local std::uint32_t bits[kChunk], other_bits[kChunk];
    // each thread's own ring, filled like the tensor: two threads never write one line
    alignas(64) static thread_local float ring_param[kRing], ring_grad[kRing];
    if (variant == Variant::ring) {
      std::copy_n(t.param.data(), kRing, ring_param);
      std::copy_n(t.grad.data(), kRing, ring_grad);
    }
#pragma omp for schedule(static)
    for (Index k = 0; k < chunks; ++k) {
      const Index offset = k * kChunk, n = std::min(kChunk, t.n - offset);
      if (variant >= Variant::pieces) {
        for (Index e = 0; e < n; e += fusedopt::kCodePiece) {
          run_piece(t, offset, e, std::min(fusedopt::kCodePiece, n - e), key,
                    variant != Variant::pieces, variant == Variant::pieces_ahead, m, v, bits,
                    other_bits);
        }
        continue;
      }
      const bool ring = variant == Variant::ring;
      float* const param = ring ? ring_param + offset % kRing : t.param.data() + offset;
      const float* const grad = ring ? ring_grad + offset % kRing : t.grad.data() + offset;
      std::uint8_t* const m_codes = t.exp_avg.data() + offset;
      std::uint8_t* const v_codes = t.exp_avg_sq.data() + offset;
      float* const m_scales = t.exp_avg_scales.data() + offset / kBlock;
      float* const v_scales = t.exp_avg_sq_scales.data() + offset / kBlock;
      const bool ahead = variant == Variant::prefetch && offset + kChunk < t.n;
      const auto start = Clock::now();
      fusedopt::for_each_block(n, [&](Index b, auto count) {  // spread over decode and encode
        fusedopt::decode_block<true>(m_codes + b * kBlock, m_scales[b], count, m + b * kBlock);
        fusedopt::decode_block<false>(v_codes + b * kBlock, v_scales[b], count, v + b * kBlock);
        if (ahead) prefetch(t, offset + kChunk, b * kBlock / 2, (b + 1) * kBlock / 2);
      });
      const auto decoded = Clock::now();
      step(n, param, grad, m, v, key, offset, nullptr, nullptr);
      const auto stepped = Clock::now();
      fusedopt::chunk_bits(key, offset, n, bits);
      fusedopt::for_each_block(n, [&](Index b, auto count) {
        const Index e = b * kBlock;
        std::uint32_t highest, lowest;
        fusedopt::magnitude_range(m + e, count, highest, lowest);
        m_scales[b] = fusedopt::encode_block<true, false>(m + e, count, m_codes + e, bits + e,
                                                          highest, lowest);
        fusedopt::magnitude_range(v + e, count, highest, lowest);
        v_scales[b] = fusedopt::encode_block<false, true>(v + e, count, v_codes + e, bits + e,
                                                          highest, lowest);
        if (ahead) prefetch(t, offset + kChunk, (kChunk + e) / 2, (kChunk + e + kBlock) / 2);
      });
      if (phases) {  // one thread only: phase_seconds is shared
        phase_seconds[0] += std::chrono::duration<double>(decoded - start).count();
        phase_seconds[1] += std::chrono::duration<double>(stepped - decoded).count();
        phase_seconds[2] += std::chrono::duration<double>(Clock::now() - stepped).count();
      }
    }
  }
}

double median(std::vector<double> x, double q = 0.5) {
  std::sort(x.begin(), x.end());
  return x[static_cast<std::size_t>(q * static_cast<double>(x.size() - 1) + 0.5)];
}

}  // namespace

int main(int argc, char** argv) {
  Tensor t;
  t.n = argc > 1 ? std::atol(argv[1]) : 10000000;
  const bool phases = argc > 2 && std::strcmp(argv[2], "phases") == 0;
  const Index blocks = (t.n + kBlock - 1) / kBlock;
  t.param.resize(std::max(t.n, kRing));  // the ring variant copies its first kRing
  t.grad.resize(std::max(t.n, kRing));
  t.exp_avg.resize(t.n);
  t.exp_avg_sq.resize(t.n);
  t.exp_avg_scales.resize(blocks);
  t.exp_avg_sq_scales.resize(blocks);
  std::mt19937 generator(1);
  std::normal_distribution<float> normal(0.0F, 1e-2F);
  for (auto& x : t.param) x = normal(generator);
  for (auto& x : t.grad) x = normal(generator);
  std::vector<float> m(kChunk), v(kChunk);
  std::vector<std::uint32_t> bits(kChunk);
  for (Index offset = 0; offset < t.n; offset += kChunk) {  // a moment's values, encoded
    const Index n = std::min(kChunk, t.n - offset);
    for (Index i = 0; i < n; ++i) {
      m[i] = normal(generator);
      v[i] = m[i] * m[i] + 1e-6F;
    }
    fusedopt::chunk_bits(7, offset, n, bits.data());
    fusedopt::encode_chunk(true, m.data(), n, t.exp_avg.data() + offset,
                           t.exp_avg_scales.data() + offset / kBlock, bits.data(), false);
    fusedopt::encode_chunk(false, v.data(), n, t.exp_avg_sq.data() + offset,
                           t.exp_avg_sq_scales.data() + offset / kBlock, bits.data(), true);
  }
  const std::pair<const char*, Variant> variants[] = {
      {"pipeline", Variant::plain},
      {"prefetch", Variant::prefetch},  // the next chunk, spread over decode and encode
      {"ring", Variant::ring},          // param and grad from a 256 KiB ring (codes as ever)
      {"pieces", Variant::pieces},
      {"pieces+bits", Variant::pieces_bits},
      {"+ahead", Variant::pieces_ahead},  // pieces+bits, the next piece prefetched into L2
  };
  constexpr std::size_t kVariants = sizeof variants / sizeof variants[0];
  constexpr int kRounds = 15;
  std::vector<std::vector<double>> seconds(kVariants);
  for (int round = 0; round < kRounds; ++round) {
    for (std::size_t v = 0; v < kVariants; ++v) {
      if (phases && round == kRounds - 1 && v == 0) std::fill_n(phase_seconds, 3, 0.0);
      const auto start = Clock::now();
      run(t, variants[v].second, static_cast<std::uint64_t>(round), phases && v == 0);
      seconds[v].push_back(std::chrono::duration<double>(Clock::now() - start).count());
    }
  }
  std::printf("n = %ld, %d rounds\n", static_cast<long>(t.n), kRounds);
  for (std::size_t v = 0; v < kVariants; ++v) {
    std::vector<double> ratio;
    for (int r = 0; r < kRounds; ++r) ratio.push_back(seconds[v][r] / seconds[0][r]);
    std::printf("%-11s %.3f ns per element, %.3f (%.3f-%.3f) of the pipeline\n", variants[v].first,
                median(seconds[v]) / static_cast<double>(t.n) * 1e9, median(ratio),
                median(ratio, 0.25), median(ratio, 0.75));
  }
  if (phases) {
    std::printf(
        "phases of the last round, ns per element: decode %.3f, step %.3f, bits and "
        "encode %.3f\n",
        phase_seconds[0] / static_cast<double>(t.n) * 1e9,
        phase_seconds[1] / static_cast<double>(t.n) * 1e9,
        phase_seconds[2] / static_cast<double>(t.n) * 1e9);
  }
  return 0;
}
