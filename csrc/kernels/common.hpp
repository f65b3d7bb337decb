// Shared pieces of every kernel: array roles, Eigen views of a chunk, the gradient transform that
// all optimizers share, and the parallel loop over (tensor, chunk) pieces. Pure C++, no Python.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fusedopt {

using Index = std::ptrdiff_t;

// One array argument of an optimizer: its name (as in the Python signature), whether the kernel
// writes it, and whether it may be absent (a buffer that only some options use). With
// `used_when`, the buffer belongs to the option of that hyperparameter: it is used, and then
// required, exactly when that hyperparameter is true or nonzero, and ignored otherwise.
struct Role {
  const char* name;
  bool written;
  bool optional;
  const char* used_when = nullptr;
};

template <typename T>
using Vec = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using ConstVec = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

// Elements per chunk: the unit in which threads split the work and reductions combine partial
// results. Small enough to balance many small tensors, large enough that the per-chunk
// overhead vanishes (2048 measured best of 512 ... 16384).
inline constexpr Index kChunk = 2048;

// Calls fn(std::bool_constant<flag>...) with each runtime flag as a compile-time constant, so
// that every kernel loop is branch-free: GCC vectorizes no loop with control flow in it.
template <typename Fn>
void with_flags(const Fn& fn) {
  fn();
}
template <typename Fn, typename... Flags>
void with_flags(const Fn& fn, bool first, Flags... rest) {
  if (first) {
    with_flags([&](auto... flags) { fn(std::true_type{}, flags...); }, rest...);
  } else {
    with_flags([&](auto... flags) { fn(std::false_type{}, flags...); }, rest...);
  }
}

// The gradient every formula starts from: g = -grad if maximize else grad; g = g + l2 * param
// only with an L2 term, as the reference (0 * inf would be NaN).
template <bool maximize, bool has_l2, typename T>
inline T effective_grad(T grad, T param, T l2) {
  const T g = maximize ? -grad : grad;
  if constexpr (has_l2) return g + l2 * param;
  return g;
}

// One tensor of a call: a pointer per role (nullptr for an absent optional role) and its length.
template <typename T, std::size_t N>
struct Tensor {
  std::array<T*, N> data;
  Index size;
};

namespace detail {

// starts[t] is tensor t's first element in the concatenation of all tensors; the last entry is
// the total. Positions are 64-bit throughout: a call may hold more than 2^31 elements.
template <typename T, std::size_t N>
std::vector<Index> tensor_starts(const std::vector<Tensor<T, N>>& tensors) {
  std::vector<Index> starts(tensors.size() + 1, 0);
  for (std::size_t t = 0; t < tensors.size(); ++t) starts[t + 1] = starts[t] + tensors[t].size;
  return starts;
}

// `pos` rounded down to the start of its chunk. Chunks start at multiples of kChunk within
// each tensor, so where threads split the work never changes how elements are grouped:
// results do not depend on the thread count.
inline Index chunk_start(const std::vector<Index>& starts, Index pos) {
  const auto next = std::upper_bound(starts.begin(), starts.end(), pos);
  const Index tensor_start = *(next - 1);
  return tensor_start + (pos - tensor_start) / kChunk * kChunk;
}

// Where thread `me` of `team` starts: its even share of all elements, floor(total * me / team)
// computed without overflow, moved back to the start of its chunk. Thread `team` "starts" at
// the total.
inline Index thread_begin(const std::vector<Index>& starts, Index me, Index team) {
  const Index total = starts.back();
  return chunk_start(starts, total / team * me + total % team * me / team);
}

// Calls fn(tensor, offset, n) for every chunk from global position `begin` to `end` (both chunk
// starts) until fn returns false.
template <typename Fn>
void walk(const std::vector<Index>& starts, Index begin, Index end, const Fn& fn) {
  if (begin >= end) return;
  auto t = static_cast<std::size_t>(std::upper_bound(starts.begin(), starts.end(), begin) -
                                    starts.begin() - 1);
  for (Index pos = begin; pos < end;) {
    while (pos >= starts[t + 1]) ++t;  // skips finished and empty tensors
    const Index offset = pos - starts[t];
    const Index n = std::min(kChunk, starts[t + 1] - pos);
    if (!fn(t, offset, n)) return;
    pos += n;
  }
}

// Runs body(begin, end) on each of `threads` OpenMP threads, in one parallel region, for its
// share of the positions; threads <= 1 runs everything on the caller.
template <typename Body>
void split_across_threads(const std::vector<Index>& starts, int threads, const Body& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const Index team = omp_get_num_threads();
      const Index me = omp_get_thread_num();
      body(thread_begin(starts, me, team), thread_begin(starts, me + 1, team));
    }
    return;
  }
#else
  (void)threads;
#endif
  body(Index{0}, starts.back());
}

template <typename T, std::size_t N>
std::array<T*, N> at_offset(const Tensor<T, N>& tensor, Index offset) {
  std::array<T*, N> chunk;
  for (std::size_t r = 0; r < N; ++r) {
    chunk[r] = tensor.data[r] == nullptr ? nullptr : tensor.data[r] + offset;
  }
  return chunk;
}

}  // namespace detail

// Calls fn(n, pointers) for every chunk of every tensor, where pointers point at the chunk's
// first element and n <= kChunk. The elements are split evenly across `threads` OpenMP threads
// in one parallel region for the whole call (all tensors); threads <= 1 runs on the caller.
template <typename T, std::size_t N, typename ChunkFn>
void for_each_chunk(const std::vector<Tensor<T, N>>& tensors, int threads, const ChunkFn& fn) {
  const std::vector<Index> starts = detail::tensor_starts(tensors);
  detail::split_across_threads(starts, threads, [&](Index begin, Index end) {
    detail::walk(starts, begin, end, [&](std::size_t t, Index offset, Index n) {
      fn(n, detail::at_offset(tensors[t], offset));
      return true;
    });
  });
}

// Calls fn(index, n, pointers) like for_each_chunk, where index numbers the chunks of all tensors
// in order (see chunk_count): for reductions that combine per-chunk results in a fixed order.
template <typename T, std::size_t N, typename Fn>
void for_each_chunk_indexed(const std::vector<Tensor<T, N>>& tensors, int threads, const Fn& fn) {
  const std::vector<Index> starts = detail::tensor_starts(tensors);
  std::vector<Index> first_chunk(tensors.size() + 1, 0);
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    first_chunk[t + 1] = first_chunk[t] + (tensors[t].size + kChunk - 1) / kChunk;
  }
  detail::split_across_threads(starts, threads, [&](Index begin, Index end) {
    detail::walk(starts, begin, end, [&](std::size_t t, Index offset, Index n) {
      fn(first_chunk[t] + offset / kChunk, n, detail::at_offset(tensors[t], offset));
      return true;
    });
  });
}

template <typename T, std::size_t N>
Index chunk_count(const std::vector<Tensor<T, N>>& tensors) {
  Index count = 0;
  for (const auto& tensor : tensors) count += (tensor.size + kChunk - 1) / kChunk;
  return count;
}

// Whether pred(n, pointers) holds for some chunk, split like for_each_chunk; every thread stops
// at its next chunk once one has found it.
template <typename T, std::size_t N, typename Pred>
bool any_chunk(const std::vector<Tensor<T, N>>& tensors, int threads, const Pred& pred) {
  const std::vector<Index> starts = detail::tensor_starts(tensors);
  std::atomic<bool> found{false};
  detail::split_across_threads(starts, threads, [&](Index begin, Index end) {
    detail::walk(starts, begin, end, [&](std::size_t t, Index offset, Index n) {
      if (found.load(std::memory_order_relaxed)) return false;
      if (pred(n, detail::at_offset(tensors[t], offset))) {
        found.store(true, std::memory_order_relaxed);
        return false;
      }
      return true;
    });
  });
  return found.load();
}

}  // namespace fusedopt
