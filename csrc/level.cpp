// Every kernel, compiled for one SIMD level (CMake builds this file once per level, each into a
// library of its own with hidden symbols, so that no inline function compiled for one level can
// stand in for another's). The binding loads the best library the CPU runs and calls
// fusedopt_kernel_table().
#include <Eigen/Core>
#include <utility>

#include "kernels/table.hpp"

namespace fusedopt {
namespace {

template <typename Decl, typename Types>
void update(const Value* hyper, const RoundingRequest& request, const TensorSet& set, Index begin,
            Index end) {
  const typename Decl::template Kernel<Types> kernel{Values<Decl>(hyper)};
  walk(set, begin, end, [&](std::size_t t, Index offset, Index n) {
    const Rounding rounding{request.stochastic,
                            tensor_key(request.seed, request.step, static_cast<std::uint64_t>(t)),
                            offset};
    kernel(set.arrays(t), offset, n, rounding);
    return true;
  });
}

template <typename T>
bool nonfinite(const TensorSet& set, std::size_t r, Index begin, Index end,
               std::atomic<bool>& found) {
  bool mine = false;
  walk(set, begin, end, [&](std::size_t t, Index offset, Index n) {
    if (found.load(std::memory_order_relaxed)) return false;
    if (has_nonfinite(n, role<const T>(set.arrays(t), r, offset))) {
      mine = true;
      found.store(true, std::memory_order_relaxed);
      return false;
    }
    return true;
  });
  return mine;
}

template <typename T>
void sums_of_squares(const TensorSet& set, const Index* first_chunk, Index begin, Index end,
                     double* partial) {
  walk(set, begin, end, [&](std::size_t t, Index offset, Index n) {
    partial[first_chunk[t] + offset / kChunk] =
        sum_squares(n, role<const T>(set.arrays(t), 0, offset));
    return true;
  });
}

// Every storage row's update of one kernel.
template <typename Decl, std::size_t... Rows>
std::array<UpdateFn, kStorageCount> rows_of(std::index_sequence<Rows...>) {
  return {&update<Decl, typename RowTypes<Rows>::type>...};
}

template <typename... Decls>
KernelTable make_table(List<Decls...>) {
  static_assert((well_formed<Decls>() && ...), "a declaration is malformed: see well_formed");
  using AllRows = std::make_index_sequence<kStorageCount>;
  return KernelTable{
      kTableVersion,
      kFingerprint,
      FUSEDOPT_SIMD_LEVEL,
      Eigen::SimdInstructionSetsInUse(),
      {rows_of<Decls>(AllRows{})...},
      {&nonfinite<float>, &nonfinite<double>, &nonfinite<Eigen::bfloat16>, &nonfinite<Eigen::half>},
      {&sums_of_squares<float>, &sums_of_squares<double>, &sums_of_squares<Eigen::bfloat16>,
       &sums_of_squares<Eigen::half>}};
}

}  // namespace
}  // namespace fusedopt

#if defined(_WIN32)
#define FUSEDOPT_EXPORT __declspec(dllexport)
#else
#define FUSEDOPT_EXPORT __attribute__((visibility("default")))
#endif

extern "C" FUSEDOPT_EXPORT const fusedopt::KernelTable* fusedopt_kernel_table() {
  static const fusedopt::KernelTable table = fusedopt::make_table(fusedopt::Kernels{});
  return &table;
}
