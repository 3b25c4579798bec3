#!/usr/bin/env bash
# Downloads the Debian packages a bare GPU machine (nvcc, CMake, ninja and Python present, but
# none of our system libraries) needs to build the no-services tree and run its tests: glog,
# gflags, Abseil, GoogleTest, Google Benchmark, OpenBLAS (pthread variant), nlohmann-json, Gloo
# and the shared libraries those load. With --services it adds what the cluster services
# (-DGEMMA_BUILD_SERVICES=ON: proto/, coordinator/, worker/service/, client/) need as well:
# gRPC C++, protobuf (runtime, headers, protoc, grpc_cpp_plugin) and what gRPC's CMake config
# finds (c-ares, RE2 through pkg-config, OpenSSL, zlib headers). Run it here, on a Debian 12
# machine like the build image, with apt working; the folder then travels with the working tree
# (git ignores /gpu-deps/).
#
#   scripts/gpu_deps.sh [--services] [DIR]     # default DIR: <repo root>/gpu-deps
#
# On the GPU machine nothing is installed system-wide: scripts/gpu_check.sh (no services) and
# scripts/gpu_cluster_check.sh (services, needs --services here) unpack each .deb into a private
# prefix (build-gpu-prefix), fix the few absolute paths in their CMake and pkg-config files,
# and point CMake and LD_LIBRARY_PATH at it. A --services bundle serves gpu_check.sh too.
#
# The list is chosen by hand, not by `apt-cache depends --recurse`: that follows every
# alternative (all three OpenBLAS variants) and the maintainer-script tools (adduser, passwd,
# PAM, ...), which a dpkg -x unpack never runs. The check below fails if a package gains a
# dependency that is neither bundled, assumed present, nor known to be unneeded.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SERVICES=0
if [[ "${1:-}" == --services ]]; then
  SERVICES=1
  shift
fi
case "${1:-}" in
  -*) echo "usage: scripts/gpu_deps.sh [--services] [DIR]" >&2; exit 2 ;;
esac
DIR="${1:-${ROOT}/gpu-deps}"

PKGS=(
  # Abseil: headers, CMake config, shared libraries.
  libabsl-dev libabsl20220623
  # glog; its headers include gflags and its CMake config find_dependency()s gflags and Unwind
  # (FindUnwind needs libunwind.h and libunwind.so); libglog.so.1 loads libgflags and libunwind.
  libgoogle-glog-dev libgoogle-glog0v6 libgflags-dev libgflags2.2 libunwind-dev libunwind8
  # GoogleTest and GoogleMock (static libraries and the GTest CMake config).
  libgtest-dev libgmock-dev
  # Google Benchmark.
  libbenchmark-dev libbenchmark1debian
  # OpenBLAS, pthread variant only: cblas.h and libopenblas.so (-dev), libopenblas.so.0, and
  # the Fortran runtime that libopenblas.so.0 loads.
  libopenblas-pthread-dev libopenblas0-pthread libgfortran5 libquadmath0
  # nlohmann-json (headers and CMake config).
  nlohmann-json3-dev
  # Gloo, and what libgloo.so.0 loads (hiredis, ibverbs and its netlink libraries).
  libgloo-dev libgloo0 libhiredis0.14 libibverbs1 libnl-3-200 libnl-route-3-200
)
# The cluster services (find_package(Protobuf) and find_package(gRPC CONFIG) in proto/, and the
# coordinator's prometheus-cpp and cpp-httplib).
SERVICES_PKGS=(
  # The coordinator's /metrics: prometheus-cpp (headers and the core library; its CMake config
  # is not used) and cpp-httplib (its header and the library Debian builds with OpenSSL, zlib
  # and Brotli).
  prometheus-cpp-dev libprometheus-cpp-core1.0 libcpp-httplib-dev libcpp-httplib0.11
  libbrotli-dev libbrotli1
  # gRPC C++: headers, the gRPC CMake config and the shared libraries (libgrpc++.so.1.51,
  # libgrpc.so.29 with libgpr, libupb, libaddress_sorting).
  libgrpc++-dev libgrpc-dev libgrpc++1.51 libgrpc29
  # protoc, and grpc_cpp_plugin (its package also holds the php/python/ruby plugins, whose
  # files gRPCTargets.cmake checks exist).
  protobuf-compiler libprotoc32 protobuf-compiler-grpc
  # protobuf: headers and libprotobuf.so for FindProtobuf, and the runtime.
  libprotobuf-dev libprotobuf32 libprotobuf-lite32
  # What gRPCConfig.cmake finds (ZLIB, OpenSSL, c-ares, re2) and libgrpc.so.29 loads: zlib
  # headers (the runtime is assumed below), OpenSSL, c-ares, RE2.
  zlib1g-dev libssl-dev libssl3 libc-ares-dev libc-ares2 libre2-dev libre2-9
  # pkg-config: gRPC's Findre2 module finds RE2 (no CMake config in Debian 12) through it.
  pkgconf pkgconf-bin libpkgconf3
  # yaml-cpp: the coordinator reads YAML model specs.
  libyaml-cpp-dev libyaml-cpp0.7
)
(( SERVICES )) && PKGS+=("${SERVICES_PKGS[@]}")

# Present on any Debian or Ubuntu machine that has a C++ compiler (or, for adduser, needed only
# by a maintainer script that dpkg -x does not run).
ASSUMED='^(libc6|libc6-dev|libgcc-s1|libstdc\+\+6|gcc-[0-9]+-base|liblzma5|zlib1g|adduser)$'
# Declared dependencies that neither the build nor the test binaries need:
#   googletest        the GoogleTest sources (/usr/src); libgtest-dev ships the built libraries
#   libhiredis-dev, libibverbs-dev   headers of Gloo's redis store and ibverbs transport; we use
#                     the TCP transport only, and GlooConfig.cmake does not look for them
#   liblzma-dev       only for libunwind-coredump's pkg-config file
#   libopenblas-dev, libopenblas0    empty metapackages that select a variant via alternatives
#   libopenblas-openmp-dev, libopenblas-serial-dev, libopenblas0-openmp, libopenblas0-serial
#                     the other variants
#   civetweb, libcivetweb-dev, libcurl4-openssl-dev, libprometheus-cpp-pull1.0,
#   libprometheus-cpp-push1.0   prometheus-cpp's pull (civetweb) and push (curl) libraries: the
#                     coordinator serves /metrics itself and links prometheus-cpp's core only
NOT_NEEDED='^(googletest|libhiredis-dev|libibverbs-dev|liblzma-dev|libopenblas-dev|libopenblas0|libopenblas-(openmp|serial)-dev|libopenblas0-(openmp|serial)|civetweb|libcivetweb-dev|libcurl4-openssl-dev|libprometheus-cpp-(pull|push)1\.0)$'

in_list() { local x; for x in "${PKGS[@]}"; do [[ "$x" == "$1" ]] && return 0; done; return 1; }

# Every Depends/Pre-Depends group of every bundled package must be met by the bundle, by the
# base system or be known to be unneeded; else the list needs a look.
missing=()
for pkg in "${PKGS[@]}"; do
  deps="$(apt-cache show --no-all-versions "${pkg}" | sed -n 's/^\(Pre-\)\?Depends: //p' | tr '\n' ',')"
  IFS=',' read -r -a groups <<< "${deps}"
  for group in "${groups[@]}"; do
    [[ -z "${group// /}" ]] && continue
    ok=0
    IFS='|' read -r -a alts <<< "${group}"
    for alt in "${alts[@]}"; do
      name="$(sed -E 's/^ *([^ :(]+).*/\1/' <<< "${alt}")"
      if in_list "${name}" || [[ "${name}" =~ ${ASSUMED} || "${name}" =~ ${NOT_NEEDED} ]]; then
        ok=1
        break
      fi
    done
    [[ ${ok} == 1 ]] || missing+=("${pkg}: ${group# }")
  done
done
if (( ${#missing[@]} )); then
  printf 'gpu_deps.sh: unlisted dependency: %s\n' "${missing[@]}" >&2
  echo "gpu_deps.sh: add it to PKGS (or to ASSUMED / NOT_NEEDED, saying why)" >&2
  exit 1
fi

mkdir -p "${DIR}"
cd "${DIR}"
rm -f ./*.deb MANIFEST
echo "gpu_deps.sh: downloading ${#PKGS[@]} packages into ${PWD}"
# As root, apt would drop to the _apt user, who may not write here.
SANDBOX=()
[[ ${EUID} == 0 ]] && SANDBOX=(-o APT::Sandbox::User=root)
apt-get "${SANDBOX[@]}" download "${PKGS[@]}"
printf '%s\n' ./*.deb | sed 's|^\./||' > MANIFEST
echo "gpu_deps.sh: $(wc -l < MANIFEST) packages, $(du -ch ./*.deb | tail -1 | cut -f1) in ${PWD}"
if (( SERVICES )); then
  echo "gpu_deps.sh: carry it to the GPU machine and run scripts/gpu_check.sh OUTDIR or"
  echo "            scripts/gpu_cluster_check.sh OUTDIR there"
else
  echo "gpu_deps.sh: carry it to the GPU machine and run scripts/gpu_check.sh OUTDIR there"
fi
