// Every kernel, compiled for one SIMD level (CMake builds this file once per level, each into a
// library of its own with hidden symbols, so that no inline function compiled for one level can
// stand in for another's). The binding loads the best library the CPU runs and calls
// fusedopt_kernel_table().
#include <Eigen/Core>
#include <utility>

#include "export.hpp"
#include "kernels/quantize.hpp"
#include "kernels/table.hpp"
#include "parallel.hpp"

namespace fusedopt {
namespace {

// The bytes of one element of an array of `part` in row Types.
template <typename Types>
constexpr Index element_size(Part part) {
  return static_cast<Index>(part == Part::param  ? sizeof(typename Types::Param)
                            : part == Part::grad ? sizeof(typename Types::Grad)
                                                 : sizeof(typename Types::State));
}

template <typename Decl>
constexpr bool has_part(Part part) {
  for (const ArrayDecl& a : Decl::arrays) {
    if (a.part == part) return true;
  }
  return false;
}

// float16 arrays are staged as float32 chunks where the level converts them in blocks (F16C).
template <typename T>
inline constexpr bool kStagesHalf = FUSEDOPT_F16C && std::is_same_v<T, Eigen::half>;
template <typename T>
using StagedAs = std::conditional_t<kStagesHalf<T>, float, T>;

// The arrays of chunk (t, offset, n) as the kernel takes them: each float16 param or grad
// converted and each quantized state decoded into its float32 copy in `staged`, the others in
// place. Shared by the update and a two-pass kernel's first pass, which must see the same values.
template <typename Decl, typename Types, bool quantized, typename Staged>
std::array<void*, Decl::arrays.size()> stage(const RoundingRequest& request, const TensorSet& set,
                                             void* const* scales, std::size_t t, Index offset,
                                             Index n, Staged& staged) {
  using P = typename Types::Param;
  using G = typename Types::Grad;
  void* const* arrays = set.arrays(t);
  std::array<void*, Decl::arrays.size()> at{};
  for (std::size_t r = 0; r < at.size(); ++r) {
    if (arrays[r] == nullptr) continue;
    const Part part = Decl::arrays[r].part;
    if ((part == Part::param && kStagesHalf<P>) || (part == Part::grad && kStagesHalf<G>)) {
      halves_to_floats(static_cast<const Eigen::half*>(arrays[r]) + offset, n, staged[r].data());
      at[r] = staged[r].data();
    } else if (quantized && scales[t * set.roles + r] != nullptr) {
      decode_chunk((request.unsigned_codes >> r & 1U) == 0,
                   static_cast<const std::uint8_t*>(arrays[r]) + offset,
                   static_cast<const float*>(scales[t * set.roles + r]) + offset / kBlock, n,
                   staged[r].data());
      at[r] = staged[r].data();
    } else {
      at[r] = static_cast<char*>(arrays[r]) + offset * element_size<Types>(part);
    }
  }
  return at;
}

// The rows whose loops may prefetch (Ahead) where a call outgrows the L2: those whose arithmetic
// leaves the hardware prefetchers behind, int8 states' pipeline and the rows on vector lanes.
template <typename Types, bool quantized>
constexpr bool prefetching_row() {
  return FUSEDOPT_PREFETCH && (quantized || kVectorLanes<Types>);
}

// The rows whose every array is bfloat16. Of the rows on vector lanes, they prefetch only when
// they round stochastically: to nearest they took longer with the prefetches, not shorter
// (bench/results/low_precision.md, "Software prefetch in the loops"). The probe, given its row's
// arrays, takes the same request, so it prefetches where its row does.
template <typename Decl, typename Types>
constexpr bool all_bfloat16() {
  using bf16 = Eigen::bfloat16;
  return std::is_same_v<typename Types::Param, bf16> &&
         (!has_part<Decl>(Part::grad) || std::is_same_v<typename Types::Grad, bf16>) &&
         (!has_part<Decl>(Part::state) || std::is_same_v<typename Types::State, bf16>);
}

// The bytes in memory of one element of role r of tensor t: an int8 state's code is 1 byte.
// `scales` as the update's, or nullptr where no state is quantized.
template <typename Decl, typename Types>
Index bytes_in_memory(void* const* scales, const TensorSet& set, std::size_t t, std::size_t r) {
  const bool codes = scales != nullptr && scales[t * set.roles + r] != nullptr;
  return codes ? 1 : element_size<Types>(Decl::arrays[r].part);
}

// Whether a thread's share of a call, elements `begin` to `end`, exceeds its core's L2: only
// then does a prefetching row's loop prefetch. Arrays that stay in cache from call to call would
// pay for the prefetches and gain nothing. Eigen's L2 size is per core; its L3 size, as CPUID
// reports it in a VM, may be the whole host's, so the L3 is no measure of what stays.
template <typename Decl, typename Types>
bool outgrows_l2(const TensorSet& set, void* const* scales, Index begin, Index end,
                 bool param_copy) {
  // the arrays present: those of a nonempty tensor (an empty one may hold null pointers)
  std::size_t t = 0;
  while (t < set.tensors && set.starts[t + 1] == set.starts[t]) ++t;
  if (t == set.tensors) return false;
  Index bytes = param_copy ? 2 : 0;  // an element's, over every array
  for (std::size_t r = 0; r < Decl::arrays.size(); ++r) {
    if (set.arrays(t)[r] != nullptr) bytes += bytes_in_memory<Decl, Types>(scales, set, t, r);
  }
  static const auto l2 = static_cast<Index>(Eigen::l2CacheSize());
  return (end - begin) * bytes > l2;
}

// What chunk (t, offset, n)'s loop prefetches: every array's (and the param copy's) lines from
// element `offset` on, up to the tensor's end, in memory (an int8 state's codes, not its staged
// values).
template <typename Decl, typename Types>
void prefetch_plan(const TensorSet& set, void* const* scales, std::size_t t, Index offset,
                   bool param_copy, Ahead& ahead) {
  static_assert(Decl::arrays.size() + 1 <= kMaxPrefetched, "Ahead holds every array");
  ahead.count = 0;
  ahead.available = set.starts[t + 1] - set.starts[t] - offset;
  void* const* arrays = set.arrays(t);
  const auto add = [&](const void* array, Index size, bool written) {
    ahead.arrays[ahead.count] = static_cast<const char*>(array) + offset * size;
    ahead.sizes[ahead.count] = size;
    ahead.written[ahead.count] = written;
    ++ahead.count;
  };
  for (std::size_t r = 0; r < Decl::arrays.size(); ++r) {
    if (arrays[r] == nullptr) continue;
    add(arrays[r], bytes_in_memory<Decl, Types>(scales, set, t, r), Decl::arrays[r].written);
  }
  if (param_copy) add(arrays[Decl::arrays.size()], 2, true);
}

// Runs the kernel chunk by chunk (with quantized state, kCodePiece elements at a time: decode,
// step and encode, see StagedCode). Some arrays are staged: a float32 copy of the chunk (or
// piece) on the stack, which the float32 kernel updates and which is written back after. Each
// quantized state is decoded into one and encoded back (the rows' types say float32 state); float16
// params and grads are converted in blocks. With masters the rounded copy is written while the
// chunk is still in cache. All only for the rows where they can occur.
template <typename Decl, typename Types, bool quantized>
void update(const Value* hyper, const RoundingRequest& request, const TensorSet& set,
            void* const* scales, Index begin, Index end, const double* tensor_sums) {
  using P = typename Types::Param;
  using G = typename Types::Grad;
  using S = typename Types::State;
  constexpr bool halves = kStagesHalf<P> || kStagesHalf<G>;
  constexpr bool staging = quantized || halves;
  // The kernel writes each quantized state's random bits beside its value (StagedCode), on
  // vector lanes too: they are drawn beside the formula's divider, not in a loop of their own.
  using Staged = Storage<typename Types::Compute, StagedAs<P>, StagedAs<G>,
                         std::conditional_t<quantized, StagedCode, S>>;
  const typename Decl::template Kernel<Staged> kernel{Values<Decl>(hyper)};
  constexpr bool masters = std::is_same_v<P, float>;
  constexpr std::size_t roles = Decl::arrays.size();
  constexpr Index kPiece = quantized ? kCodePiece : kChunk;
  constexpr auto kStaged = static_cast<std::size_t>(kPiece);
  // a StagedCode's value and, kCodePiece further, its random bits
  [[maybe_unused]] alignas(64)
      std::array<std::array<float, staging ? (quantized ? 2 : 1) * kStaged : 1>, roles> staged;
  const auto run_kernel = [&](void* const* at, Index at_offset, Index n, const Rounding& rounding,
                              std::size_t t) {
    if constexpr (kSums<Decl> > 0) {
      kernel(at, at_offset, n, rounding, tensor_sums + t * kSums<Decl>);
    } else {
      (void)t;
      (void)tensor_sums;
      kernel(at, at_offset, n, rounding);
    }
  };
  void* const* const code_scales = quantized ? scales : nullptr;
  // the bfloat16 or float16 param copy that a call with masters writes (2 bytes an element)
  const bool param_copy = request.param_copy != DType::float32;
  [[maybe_unused]] const bool prefetch =
      prefetching_row<Types, quantized>() && (!all_bfloat16<Decl, Types>() || request.stochastic) &&
      outgrows_l2<Decl, Types>(set, code_scales, begin, end, param_copy);
  [[maybe_unused]] Ahead ahead;
  const auto update_piece = [&](std::size_t t, Index offset, Index n) {
    Rounding rounding{request.stochastic,
                      tensor_key(request.seed, request.step, static_cast<std::uint64_t>(t)),
                      offset};
    // the kernel's: its loop also prefetches, where the call does (the param copy is the
    // kernel's to prefetch, not its own loop's)
    Rounding kernel_rounding = rounding;
    if (prefetch) {
      prefetch_plan<Decl, Types>(set, code_scales, t, offset, param_copy, ahead);
      kernel_rounding.ahead = &ahead;
    }
    void* const* arrays = set.arrays(t);
    if constexpr (staging) {
      const auto quantized_role = [&](std::size_t r) {
        return quantized && scales[t * set.roles + r] != nullptr;
      };
      const auto at = stage<Decl, Types, quantized>(request, set, scales, t, offset, n, staged);
      run_kernel(at.data(), 0, n, kernel_rounding, t);  // prefetching the next piece's lines
      if constexpr (kStagesHalf<P>) {
        store_param_copy(rounding, n, staged[0].data(), false,
                         static_cast<Eigen::half*>(arrays[0]) + offset);
      }
      if constexpr (quantized) {
        for (std::size_t r = 0; r < roles; ++r) {
          if (arrays[r] == nullptr || !quantized_role(r)) continue;
          encode_chunk((request.unsigned_codes >> r & 1U) == 0, staged[r].data(), n,
                       static_cast<std::uint8_t*>(arrays[r]) + offset,
                       static_cast<float*>(scales[t * set.roles + r]) + offset / kBlock,
                       staged[r].data() + kPiece, false);
        }
      }
    } else {
      run_kernel(arrays, offset, n, kernel_rounding, t);
    }
    if constexpr (masters) {
      if (param_copy) {
        const bool to_bfloat16 = request.param_copy == DType::bfloat16;
        store_param_copy(rounding, n, static_cast<const float*>(arrays[0]) + offset, to_bfloat16,
                         static_cast<char*>(arrays[roles]) + offset * 2);  // 2 bytes either way
      }
    }
  };
  walk(set, begin, end, [&](std::size_t t, Index offset, Index n) {
    for (Index piece = 0; piece < n; piece += kPiece) {
      update_piece(t, offset + piece, std::min(kPiece, n - piece));
    }
    return true;
  });
}

// The first pass of a two-pass kernel: its sums of every chunk from `begin` to `end`, the chunk
// staged as the update stages it. Reads only.
template <typename Decl, typename Types, bool quantized>
void reduce(const Value* hyper, const RoundingRequest& request, const TensorSet& set,
            void* const* scales, const Index* first_chunk, Index begin, Index end,
            double* partial) {
  using P = typename Types::Param;
  using G = typename Types::Grad;
  constexpr bool staging = quantized || kStagesHalf<P> || kStagesHalf<G>;
  using Staged = Storage<typename Types::Compute, StagedAs<P>, StagedAs<G>, typename Types::State>;
  const typename Decl::template Kernel<Staged> kernel{Values<Decl>(hyper)};
  [[maybe_unused]] std::array<std::array<float, staging ? kChunk : 1>, Decl::arrays.size()> staged;
  walk(set, begin, end, [&](std::size_t t, Index offset, Index n) {
    double* sums = partial + (first_chunk[t] + offset / kChunk) * static_cast<Index>(kSums<Decl>);
    if constexpr (staging) {
      const auto at = stage<Decl, Types, quantized>(request, set, scales, t, offset, n, staged);
      kernel.reduce(at.data(), 0, n, sums);
    } else {
      kernel.reduce(set.arrays(t), offset, n, sums);
    }
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

// Row `row`'s types as a declaration sees them: a part it has no array for takes the compute
// type, so rows that differ only there share one instantiation (plain SGD and Scale would
// compile the same loops for every row).
template <typename Decl, std::size_t row>
struct DeclRow {
  using Row = typename RowTypes<row>::type;
  using C = typename Row::Compute;
  using type = Storage<C, typename Row::Param,
                       std::conditional_t<has_part<Decl>(Part::grad), typename Row::Grad, C>,
                       std::conditional_t<has_part<Decl>(Part::state), typename Row::State, C>>;
  static constexpr bool quantized =
      has_part<Decl>(Part::state) && kStorageRows[row].state == DType::int8;
};

// Every storage row's update of one kernel.
template <typename Decl, std::size_t... Rows>
std::array<UpdateFn, kStorageCount> rows_of(std::index_sequence<Rows...>) {
  return {&update<Decl, typename DeclRow<Decl, Rows>::type, DeclRow<Decl, Rows>::quantized>...};
}

// Every storage row's first pass of a two-pass kernel; nullptr for the others.
template <typename Decl, std::size_t... Rows>
std::array<ReduceFn, kStorageCount> reduce_rows_of(std::index_sequence<Rows...>) {
  if constexpr (kSums<Decl> > 0) {
    return {&reduce<Decl, typename DeclRow<Decl, Rows>::type, DeclRow<Decl, Rows>::quantized>...};
  } else {
    return {};
  }
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
      {reduce_rows_of<Decls>(AllRows{})...},
      {&nonfinite<float>, &nonfinite<double>, &nonfinite<Eigen::bfloat16>, &nonfinite<Eigen::half>},
      {&sums_of_squares<float>, &sums_of_squares<double>, &sums_of_squares<Eigen::bfloat16>,
       &sums_of_squares<Eigen::half>},
      &parallel::observe_regions};
}

}  // namespace
}  // namespace fusedopt

extern "C" FUSEDOPT_EXPORT const fusedopt::KernelTable* fusedopt_kernel_table() {
  static const fusedopt::KernelTable table = fusedopt::make_table(fusedopt::Kernels{});
  return &table;
}
