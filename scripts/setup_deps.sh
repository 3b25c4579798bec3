#!/usr/bin/env bash
# Installs the Debian packages the build and tests need (idempotent; quiet when all are there).
# Run as root or with sudo available.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libgoogle-glog-dev libgloo-dev nlohmann-json3-dev libsqlite3-dev libopenblas-dev
  prometheus-cpp-dev libcpp-httplib-dev libgtest-dev libgmock-dev libbenchmark-dev
  clang-14 libclang-rt-14-dev python3 python3-venv python3-prometheus-client chromium openssl
  openssh-server libssl-dev libyaml-cpp-dev
)

# kubectl renders the Kubernetes manifests in the tests (kubectl kustomize); any kubectl will do.
command -v kubectl >/dev/null || PACKAGES+=(kubernetes-client)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("${pkg}")
done
if (( ${#missing[@]} == 0 )); then
  exit 0
fi

SUDO=()
if (( EUID != 0 )); then
  command -v sudo >/dev/null || { echo "setup_deps.sh: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi
echo "setup_deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
