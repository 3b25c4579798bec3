#!/usr/bin/env bash
# Downloads the Debian packages a bare GPU machine (nvcc, CMake and Python present, but none of
# our system libraries) needs to build and test this project: glog, gflags, Abseil, GoogleTest,
# Google Benchmark, OpenBLAS, nlohmann-json, Gloo and their runtime dependencies. Run it here,
# on a Debian machine like the build image, with network access; copy the folder over.
#
#   scripts/gpu_deps.sh [DIR]          # default DIR: gpu-deps
#
# On the GPU machine nothing is installed system-wide: each .deb is unpacked into a private
# prefix, which scripts/gpu_check.sh does for you:
#
#   mkdir -p prefix && for d in DIR/*.deb; do dpkg -x "$d" prefix; done
#   cmake -S . -B build -DCMAKE_PREFIX_PATH="$PWD/prefix/usr" \
#         -DCMAKE_LIBRARY_PATH="$PWD/prefix/usr/lib/x86_64-linux-gnu"
#   export LD_LIBRARY_PATH="$PWD/prefix/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH"
set -euo pipefail

DIR="${1:-gpu-deps}"
mkdir -p "${DIR}"
cd "${DIR}"

# What the build finds with find_package / find_path, and what the test binaries load.
ROOTS=(
  libgoogle-glog-dev libgflags-dev libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev
  libopenblas-dev libopenblas0-pthread libopenblas-pthread-dev nlohmann-json3-dev libgloo-dev
  libunwind-dev
)

# The roots plus their dependencies (Depends and PreDepends, recursively), minus what every
# Debian system already has (libc6, libgcc, libstdc++ come with the compiler).
mapfile -t ALL < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances "${ROOTS[@]}" | grep -E '^[a-z0-9]' | sort -u)
SKIP='^(libc6|libc6-dev|libgcc-s1|libstdc\+\+6|libstdc\+\+-[0-9]+-dev|gcc-[0-9]+-base|libc-dev-bin|linux-libc-dev|libcrypt1|libcrypt-dev|debconf|dpkg|perl-base|tar|install-info)$'
WANTED=()
for pkg in "${ALL[@]}"; do
  [[ "${pkg}" =~ ${SKIP} ]] && continue
  # Virtual packages have no candidate: skip them.
  apt-cache show "${pkg}" >/dev/null 2>&1 || continue
  WANTED+=("${pkg}")
done

echo "gpu_deps.sh: downloading ${#WANTED[@]} packages into ${PWD}"
apt-get download "${WANTED[@]}"
ls -1 *.deb > MANIFEST
echo "gpu_deps.sh: done; copy ${PWD} to the GPU machine and run scripts/gpu_check.sh"
