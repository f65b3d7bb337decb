// Roofline probe: the memory traffic of an optimizer step without its arithmetic. Reads grad
// and reads and writes param and up to four buffers, chunk by chunk like every kernel, adding
// 0 * grad to each: no load or store can be elided (0 * grad is not foldable in IEEE
// arithmetic), and the values stay as they are, so the benchmark's implementations can share
// arrays with it. An optimizer step can at best match its time at the same bytes per element.
#pragma once

#include "common.hpp"

namespace fusedopt {

template <typename T>
struct Roofline {
  static constexpr std::array<Role, 6> roles{{
      {"param", true, false},
      {"grad", false, false},
      {"buffer1", true, true},
      {"buffer2", true, true},
      {"buffer3", true, true},
      {"buffer4", true, true},
  }};

  template <typename Hyper>
  explicit Roofline(const Hyper&) {}

  void operator()(Index n, const std::array<T*, 6>& a) const {
    const ConstVec<T> grad(a[1], n);
    for (const std::size_t r : {0U, 2U, 3U, 4U, 5U}) {
      if (a[r] != nullptr) Vec<T>(a[r], n) += T(0) * grad;
    }
  }
};

}  // namespace fusedopt
