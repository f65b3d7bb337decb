// Detecting NaN and infinity, for all_finite and skip_if_nonfinite.
#pragma once

#include <cmath>

#include "common.hpp"

namespace fusedopt {

// Whether x[0..n) holds a NaN or an infinity. x * 0 is 0 for every finite x and NaN otherwise,
// and a sum with a NaN in it is NaN: this vectorizes, unlike a loop of std::isfinite.
template <typename T>
bool has_nonfinite(Index n, const T* x) {
  return std::isnan((ConstVec<T>(x, n) * T(0)).sum());
}

}  // namespace fusedopt
