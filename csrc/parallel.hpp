// Threads for the matrix and reduction code of the level libraries (matrix.cpp, factored.cpp):
// the only code there that opens OpenMP parallel regions. The element-wise kernels get their
// threads from the binding.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif
#if !defined(_WIN32)
#include <pthread.h>
#endif

#include "kernels/common.hpp"

namespace fusedopt::parallel {

// GNU libgomp cannot open a parallel region in a child forked after the parent opened one: the
// child inherits the thread pool's bookkeeping but not its threads, and waits for them forever.
// Such a child runs these loops, and the binding's kernels, on its calling thread instead (same
// results, one core). The binding and each level library keep their own flags.
inline std::atomic<bool> opened_region{false};
inline std::atomic<bool> serial_after_fork{false};
inline void after_fork_in_child() {
  if (opened_region.load()) serial_after_fork.store(true);
}

inline int team_size(int requested, Index work_items) {
#if !defined(_WIN32)
  static const int registered = pthread_atfork(nullptr, nullptr, after_fork_in_child);
  (void)registered;
#endif
  if (requested <= 1 || work_items <= 1 || serial_after_fork.load()) return 1;
  opened_region.store(true);
  return static_cast<int>(std::min<Index>(requested, work_items));
}

inline std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// How late the last thread of a parallel region started: made as the region opens, told by each
// thread as it starts.
class RegionStart {
 public:
  void thread_started() {
    const std::int64_t started = now_ns();
    std::int64_t latest = latest_.load(std::memory_order_relaxed);
    while (started > latest &&
           !latest_.compare_exchange_weak(latest, started, std::memory_order_relaxed)) {
    }
  }
  std::int64_t latest_delay_ns() const { return latest_.load() - opened_; }

 private:
  std::int64_t opened_ = now_ns();
  std::atomic<std::int64_t> latest_{opened_};
};

// The binding's observer of this library's regions (set through the kernel table).
inline std::atomic<RegionObserver> region_observer{nullptr};
inline void observe_regions(RegionObserver observer) { region_observer.store(observer); }

// Runs body(i) for i in [0, count) on up to `threads` threads. Callers make every result
// independent of which thread runs which i.
template <typename Body>
void parallel_for(Index count, int threads, const Body& body) {
#ifdef _OPENMP
  const int team = team_size(threads, count);
  if (team > 1) {
    RegionStart start;
#pragma omp parallel num_threads(team)
    {
      start.thread_started();
#pragma omp for schedule(dynamic)
      for (Index i = 0; i < count; ++i) body(i);
    }
    if (const RegionObserver observe = region_observer.load()) observe(start.latest_delay_ns());
    return;
  }
#else
  (void)threads;  // a serial build: one thread
#endif
  for (Index i = 0; i < count; ++i) body(i);
}

}  // namespace fusedopt::parallel
