// Adam's kernel (csrc/kernels, as the library runs it) on one 2048-element chunk in L1, one
// thread, for float32 and the rows that write bfloat16: ns per element, median (and 2nd-10th of
// 11) of alternations. What a level's vector lanes buy shows when the same file is built against
// two source trees (say `git archive <commit> csrc | tar -x -C /tmp/old`) and the two binaries
// run one after the other, several times: this machine's speed drifts, so read each run's rows
// against its own float32 row.
//
//   eigen=$(python -c "import cmeel; print(cmeel.__path__[0] + '.prefix/include/eigen3')")
//   flags="-std=c++17 -O3 -fno-math-errno -ffp-contract=off -fopenmp-simd -mavx2 -mfma -mf16c"
//   g++ $flags -mbmi2 -Icsrc -Ibench -I"$eigen" bench/adam_rows_l1.cpp -o /tmp/adam_rows_l1
//   /tmp/adam_rows_l1
//
// (add -mavx512f -mavx512vl -mavx512bw -mavx512dq for the avx512 level's lanes). Figures:
// bench/results/low_precision.md.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "adam_chunk.hpp"

namespace {

using namespace fusedopt;
using namespace fusedopt::bench;
using bfloat16 = Eigen::bfloat16;

// One storage row's kernel and chunk: params and grads N(0, 1), moments of a step's scale.
template <typename P, typename G, typename S>
struct Row {
  using Types = Storage<float, P, G, S>;
  AdamKernel<Types> kernel = adam_kernel<Types>();
  std::vector<P> param;
  std::vector<G> grad;
  std::vector<S> exp_avg, exp_avg_sq;
  explicit Row(std::mt19937& generator)
      : param(normal<P>(1, false, generator)),
        grad(normal<G>(1, false, generator)),
        exp_avg(normal<S>(0.01f, false, generator)),
        exp_avg_sq(normal<S>(0.01f, true, generator)) {}
  __attribute__((noinline)) void step(const Rounding& rounding) {
    void* arrays[5] = {param.data(), grad.data(), exp_avg.data(), exp_avg_sq.data(), nullptr};
    kernel(arrays, 0, kCount, rounding);
  }
};

}  // namespace

int main() {
  const Rounding nearest{}, stochastic{true, tensor_key(1234, 10, 0), 4096};
  std::mt19937 generator(1);
  Row<float, float, float> all_float32(generator);
  Row<float, float, bfloat16> bfloat16_state(generator);
  Row<bfloat16, bfloat16, float> bfloat16_params(generator);
  Row<bfloat16, bfloat16, bfloat16> all_bfloat16(generator);
  Row<float, bfloat16, bfloat16> bfloat16_grads_and_state(generator);
  const char* names[] = {"float32/float32/float32",   "float32/float32/bfloat16",
                         "bfloat16/bfloat16/float32", "bfloat16/bfloat16/bfloat16",
                         "bfloat16 stochastic",       "float32/bfloat16/bfloat16"};
  std::vector<double> times[6];
  for (int alternation = 0; alternation < 11; ++alternation) {
    times[0].push_back(ns_per_element([&] { all_float32.step(nearest); }));
    times[1].push_back(ns_per_element([&] { bfloat16_state.step(nearest); }));
    times[2].push_back(ns_per_element([&] { bfloat16_params.step(nearest); }));
    times[3].push_back(ns_per_element([&] { all_bfloat16.step(nearest); }));
    times[4].push_back(ns_per_element([&] { all_bfloat16.step(stochastic); }));
    times[5].push_back(ns_per_element([&] { bfloat16_grads_and_state.step(nearest); }));
  }
  std::printf("Adam, one chunk of %td elements in L1, one thread, ns per element\n", kCount);
  for (int i = 0; i < 6; ++i) {
    std::sort(times[i].begin(), times[i].end());
    std::printf("%-28s %.3f (%.3f-%.3f)\n", names[i], times[i][5], times[i][1], times[i][9]);
  }
}
