// Shared pieces of every kernel: how arrays are stored and loaded, the gradient transform that all
// optimizers share, and the walk over (tensor, chunk) pieces. Pure C++, no Python.
#pragma once

#include <Eigen/Core>  // Eigen::bfloat16, Eigen::half: conversions that round to nearest even
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "declaration.hpp"

namespace fusedopt {

using Index = std::ptrdiff_t;

// Elements per chunk: the unit in which threads split the work and reductions combine partial
// results. Small enough to balance many small tensors, large enough that the per-chunk
// overhead vanishes (2048 measured best of 512 ... 16384).
inline constexpr Index kChunk = 2048;

// How a kernel's arrays are stored and what its arithmetic runs in. A kernel loads each element
// with load<Compute>, runs its formula in Compute and rounds once with store: so a low-precision
// array gives exactly the compute type's result, rounded. Conversions to bfloat16 and float16
// are Eigen's, which round to nearest even (ties to even, NaN stays NaN), as ml_dtypes and
// NumPy round.
template <typename C, typename P, typename G, typename S>
struct Storage {
  using Compute = C;
  using Param = P;
  using Grad = G;
  using State = S;
};
template <typename T>
using Uniform = Storage<T, T, T, T>;

template <typename Compute, typename Stored>
inline Compute load(Stored x) {
  return static_cast<Compute>(x);
}
template <typename Stored, typename Compute>
inline void store(Stored& to, Compute x) {
  to = static_cast<Stored>(x);
}

// Role r of a chunk that starts at `offset`, typed; nullptr for an absent optional array.
template <typename Stored>
inline Stored* role(void* const* arrays, std::size_t r, Index offset) {
  return arrays[r] == nullptr ? nullptr : static_cast<Stored*>(arrays[r]) + offset;
}

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

// The arrays of one call: tensor t's array of role r at data[t * roles + r] (nullptr for an
// absent optional array); starts[t] is tensor t's first element in the concatenation of all
// tensors, starts[tensors] the total. Positions are 64-bit: a call may hold more than 2^31
// elements.
struct TensorSet {
  void* const* data;
  const Index* starts;
  std::size_t tensors;
  std::size_t roles;

  Index total() const { return starts[tensors]; }
  void* const* arrays(std::size_t t) const { return data + t * roles; }
};

// `pos` rounded down to the start of its chunk. Chunks start at multiples of kChunk within each
// tensor, so where threads split the work never changes how elements are grouped: results do
// not depend on the thread count.
inline Index chunk_start(const TensorSet& set, Index pos) {
  const Index* next = std::upper_bound(set.starts, set.starts + set.tensors + 1, pos);
  const Index tensor_start = *(next - 1);
  return tensor_start + (pos - tensor_start) / kChunk * kChunk;
}

// Where thread `me` of `team` starts: its even share of all elements, floor(total * me / team)
// computed without overflow, moved back to the start of its chunk. Thread `team` "starts" at
// the total.
inline Index thread_begin(const TensorSet& set, Index me, Index team) {
  const Index total = set.total();
  return chunk_start(set, total / team * me + total % team * me / team);
}

// Calls fn(tensor, offset, n) for every chunk from global position `begin` to `end` (both chunk
// starts) until fn returns false.
template <typename Fn>
void walk(const TensorSet& set, Index begin, Index end, const Fn& fn) {
  if (begin >= end) return;
  auto t = static_cast<std::size_t>(
      std::upper_bound(set.starts, set.starts + set.tensors + 1, begin) - set.starts - 1);
  for (Index pos = begin; pos < end;) {
    while (pos >= set.starts[t + 1]) ++t;  // skips finished and empty tensors
    const Index offset = pos - set.starts[t];
    const Index n = std::min(kChunk, set.starts[t + 1] - pos);
    if (!fn(t, offset, n)) return;
    pos += n;
  }
}

}  // namespace fusedopt
