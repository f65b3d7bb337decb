// What the int8 state codec (csrc/kernels/quantize.hpp) costs per element on this core: one
// chunk decoded or encoded again and again in L1, signed (first moments) and unsigned (second
// moments) codes, and the random bits the encoder rounds with. The values are a moment's: a
// normal distribution for the signed codes, its squares for the unsigned ones, so most blocks
// take the codec's loops for normal values, as in training. Built with the kernel libraries'
// flags, at a level's SIMD flags:
//
//   eigen=$(python -c "import cmeel; print(cmeel.__path__[0] + '.prefix/include/eigen3')")
//   flags="-std=c++17 -O3 -fno-math-errno -ffp-contract=off -fopenmp-simd -mavx2 -mfma -mf16c"
//   g++ $flags -mbmi2 -Icsrc/kernels -I"$eigen" bench/int8_codec.cpp -o /tmp/int8_codec
//   /tmp/int8_codec
//
// At the avx512 level (whose whole blocks take the codec's AVX-512 loops), add its flags:
// -mavx512f -mavx512vl -mavx512bw -mavx512dq.
//
// With `zeros`, every seventh value is zero (and so its square), as where gradients are exactly
// zero (a dead ReLU unit's): every block then holds zeros.
//
// With a name (decode_signed, decode_unsigned, encode_signed, encode_unsigned, random_bits,
// none) it runs only that, 1000 times, for an instruction count:
//   valgrind --tool=callgrind --callgrind-out-file=/dev/null /tmp/int8_codec encode_signed
// (the count less `none`'s, over 1000 x 2048, is instructions per element).
//
// Figures: bench/results/low_precision.md.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "quantize.hpp"

namespace {

using fusedopt::kBlock;
using fusedopt::kChunk;

struct Chunk {
  std::vector<float> values = std::vector<float>(kChunk);
  std::vector<float> decoded = std::vector<float>(kChunk);
  std::vector<std::uint8_t> codes = std::vector<std::uint8_t>(kChunk);
  std::vector<float> scales = std::vector<float>(kChunk / kBlock);
};

}  // namespace

int main(int argc, char** argv) {
  const bool zeros = argc > 1 && std::string(argv[1]) == "zeros";
  if (zeros) {
    --argc;
    ++argv;
  }
  std::mt19937 generator(1);
  std::normal_distribution<float> moment(0.0F, 1e-2F);
  Chunk signed_chunk, unsigned_chunk;
  std::vector<std::uint32_t> bits(kChunk);
  for (std::size_t i = 0; i < bits.size(); ++i) {
    signed_chunk.values[i] = zeros && i % 7 == 3 ? 0.0F : moment(generator);
    unsigned_chunk.values[i] = signed_chunk.values[i] * signed_chunk.values[i];
    bits[i] = static_cast<std::uint32_t>(generator());
  }
  // signed codes round with the random bits' low half, unsigned with the high, as Adam's first
  // and second moments do
  const auto encode = [&](Chunk& c, bool is_signed) {
    fusedopt::encode_chunk(is_signed, c.values.data(), kChunk, c.codes.data(), c.scales.data(),
                           bits.data(), !is_signed);
  };
  const auto decode = [](Chunk& c, bool is_signed) {
    fusedopt::decode_chunk(is_signed, c.codes.data(), c.scales.data(), kChunk, c.decoded.data());
  };
  encode(signed_chunk, true);
  encode(unsigned_chunk, false);
  const std::vector<std::pair<std::string, std::function<void()>>> cases = {
      {"none", [] {}},
      {"decode_signed", [&] { decode(signed_chunk, true); }},
      {"decode_unsigned", [&] { decode(unsigned_chunk, false); }},
      {"encode_signed", [&] { encode(signed_chunk, true); }},
      {"encode_unsigned", [&] { encode(unsigned_chunk, false); }},
      {"random_bits", [&] { fusedopt::chunk_bits(12345, 0, kChunk, bits.data()); }},
  };
  for (const auto& [name, run] : cases) {
    if (argc > 1) {
      if (name != argv[1]) continue;
      for (int k = 0; k < 1000; ++k) run();
      return 0;
    }
    if (name == "none") continue;
    double best = 1e30;  // the fastest of 7 rounds of 20,000 calls: the least disturbed
    for (int round = 0; round < 7; ++round) {
      const auto start = std::chrono::steady_clock::now();
      for (int k = 0; k < 20000; ++k) run();
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      best = std::min(best, took.count() / 20000 / kChunk);
    }
    std::printf("%-16s %.3f ns per element\n", name.c_str(), best * 1e9);
  }
  // the buffers are read, so that no call is optimized away
  return signed_chunk.decoded[7] + unsigned_chunk.decoded[9] == 12345.0F ? 1 : 0;
}
