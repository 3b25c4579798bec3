#!/usr/bin/env bash
# Offline checks of deploy/ (run by the test suite; no cluster, no Docker):
#   1. the runtime image's package list (deploy/docker/runtime-packages.txt) provides every
#      shared library the shipped binaries load (ldd, each library's Debian package by dpkg -S;
#      the CUDA toolkit's libraries, outside dpkg here, by their NVIDIA package names);
#   2. every kustomize overlay renders (kubectl kustomize);
#   3. every rendered object validates, and every flag, port and variable the manifests give a
#      binary is one it accepts (scripts/check_manifests.py, with the binaries' own flag lists).
#   scripts/check_deploy.sh [BUILD_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-${ROOT}/build}"
BIN="${BUILD}/bin"
PY="${ROOT}/.venv-test/bin/python"
SHIPPED=(gemma-coordinator gemma-worker gemmactl gemma-generate gemma-forward gemma-tokenize)
work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
fail=0

# --- 1. the runtime image's packages ---------------------------------------------------------
sed -e 's/#.*//' -e '/^\s*$/d' -e 's/\s//g' "${ROOT}/deploy/docker/runtime-packages.txt" |
  sort -u >"${work}/listed"
nvidia_package() {  # a CUDA toolkit library's package in NVIDIA's repository
  case "$1" in
    libcudart.so.13*) echo cuda-cudart-13-0 ;;
    libcublas.so.13* | libcublasLt.so.13*) echo libcublas-13-0 ;;
    libnccl.so.2*) echo libnccl2 ;;
    *) echo "" ;;
  esac
}
# Each library once (soname, path, the binaries that load it), then its package.
for tool in "${SHIPPED[@]}"; do
  [[ -x "${BIN}/${tool}" ]] || { echo "check_deploy: ${BIN}/${tool} is missing" >&2; exit 1; }
  ldd "${BIN}/${tool}" | awk -v tool="${tool}" '$2 == "=>" { print $1, $3, tool }'
done | sort -k1,1 -k2,2 -u >"${work}/libraries"
touch "${work}/needed"
while read -r soname path tool; do
  if [[ "${path}" == "not" ]]; then
    echo "FAIL ${tool}: ${soname} is not found here" && fail=1 && continue
  fi
  package="$(dpkg -S "$(readlink -f "${path}")" 2>/dev/null | head -n 1 | cut -d: -f1 || true)"
  [[ -n "${package}" ]] || package="$(dpkg -S "${path}" 2>/dev/null | head -n 1 | cut -d: -f1 || true)"
  [[ -n "${package}" ]] || package="$(nvidia_package "${soname}")"
  if [[ -z "${package}" ]]; then
    echo "FAIL ${tool}: no package is known to provide ${soname} (${path})"
    fail=1
  elif ! grep -qx "${package}" "${work}/listed"; then
    echo "FAIL ${tool}: ${soname} comes from ${package}, which runtime-packages.txt lacks"
    fail=1
  fi
  echo "${package}" >>"${work}/needed"
done <"${work}/libraries"
sort -u "${work}/needed" -o "${work}/needed"
echo "runtime image: ${#SHIPPED[@]} binaries load libraries of $(wc -l <"${work}/needed") packages"
# Packages listed that nothing needs (ca-certificates aside) are dead weight in the image.
# ibverbs-providers' drivers are loaded by libibverbs at run time, never linked.
unused="$(comm -23 "${work}/listed" "${work}/needed" | grep -vx -e ca-certificates -e ibverbs-providers || true)"
if [[ -n "${unused}" ]]; then
  echo "FAIL runtime-packages.txt lists packages no binary loads: ${unused//$'\n'/ }"
  fail=1
fi

# --- 2. every overlay renders -------------------------------------------------------------------
overlays=()
for dir in "${ROOT}"/deploy/k8s/overlays/*/; do
  name="$(basename "${dir}")"
  if ! kubectl kustomize "${dir}" >"${work}/${name}.yaml" 2>"${work}/${name}.err"; then
    echo "FAIL overlay ${name} does not render:"; grep -v '^# Warning' "${work}/${name}.err"
    fail=1
    continue
  fi
  overlays+=("${work}/${name}.yaml")
done
echo "kustomize: ${#overlays[@]} overlays rendered"

# --- 3. schemas, flags, ports -------------------------------------------------------------------
# Each binary's flags as it lists them itself.
"${PY}" - "${BIN}" gemma-coordinator gemma-worker >"${work}/flags.json" <<'PYEOF'
import json, re, subprocess, sys
bin_dir, tools = sys.argv[1], sys.argv[2:]
out = {}
for tool in tools:
    text = subprocess.run([f"{bin_dir}/{tool}", "--helpfull"], capture_output=True,
                          text=True).stdout
    out[tool] = sorted(set(re.findall(r"^\s+--([A-Za-z0-9_]+)", text, re.M)))
print(json.dumps(out))
PYEOF
"${PY}" "${ROOT}/scripts/check_manifests.py" --flags "${work}/flags.json" "${overlays[@]}" || fail=1
# ... and the checker catches drift (broken copies of an overlay are refused, each for its reason).
"${PY}" "${ROOT}/tests/deploy/check_manifests_test.py" "${overlays[0]}" "${work}/flags.json" ||
  fail=1
exit "${fail}"
