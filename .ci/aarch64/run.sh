#!/usr/bin/env bash
# The kernels on aarch64, under qemu-user: cross-compiles csrc/level.cpp with golden_driver.cpp
# (baseline: NEON; and with SVE), and runs them on make_golden.py's cases from
# fusedopt.reference. Needs g++-aarch64-linux-gnu and qemu-user (Debian/Ubuntu apt), a Python
# with fusedopt installed (for the golden outputs) and Eigen's headers.
#
#     .ci/aarch64/run.sh PYTHON EIGEN_INCLUDE_DIR [WORKDIR]
set -euo pipefail
python=$1
eigen=$2
work=${3:-$(mktemp -d)}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cxx=${CXX_AARCH64:-aarch64-linux-gnu-g++}
sysroot=${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}

# The list of optimizers, as CMakeLists.txt generates it: every header in csrc/kernels/optimizers.
mkdir -p "$work/generated"
{
  echo "#pragma once"
  lists=()
  for header in "$repo"/csrc/kernels/optimizers/*.hpp; do
    echo "#include \"$header\""
    lists+=("header::$(basename "$header" .hpp)::declares")
  done
  echo "namespace fusedopt {"
  echo "using Optimizers = Concat<$(IFS=,; echo "${lists[*]}" | sed 's/,/, /g')>::type;"
  echo "}"
} > "$work/generated/optimizers.hpp"

(cd "$work" && "$python" "$here/make_golden.py" "$work/golden")

# The flags of CMakeLists.txt's kernel libraries (numerics, `omp simd`), per level; the two
# levels compile at once, on two cores.
declare -A level_flags=([baseline]="" [sve]="-march=armv8.2-a+sve")
pids=()
for level in baseline sve; do
  # shellcheck disable=SC2086
  "$cxx" -std=c++17 -O3 -fno-math-errno -ffp-contract=off -fopenmp-simd ${level_flags[$level]} \
    -Wall -Wextra -Werror -DEIGEN_FAST_MATH=0 -DFUSEDOPT_SIMD_LEVEL="\"$level\"" \
    -I "$repo/csrc" -I "$work/generated" -isystem "$eigen" \
    "$repo/csrc/level.cpp" "$here/golden_driver.cpp" -o "$work/driver-$level" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
file "$work/driver-baseline" | grep -q "ARM aarch64" || { echo "!! not an aarch64 binary"; exit 1; }
sve_ops=$(aarch64-linux-gnu-objdump -d "$work/driver-sve" | grep -cE "\bz[0-9]+\.[bhsd]\b" || true)
echo "-- aarch64 level sve: $sve_ops instructions on SVE registers"
[ "$sve_ops" -gt 0 ] || { echo "!! the sve level has no SVE instructions"; exit 1; }

echo "-- aarch64 level baseline (NEON), under qemu-aarch64"
qemu-aarch64 -L "$sysroot" "$work/driver-baseline" "$work/golden"
# SVE code runs at any vector length: two of them (bytes), the shortest and a long one
for bytes in 16 64; do
  echo "-- aarch64 level sve, $((8 * bytes))-bit vectors, under qemu-aarch64"
  qemu-aarch64 -cpu "max,sve-default-vector-length=$bytes" -L "$sysroot" "$work/driver-sve" \
    "$work/golden"
done
