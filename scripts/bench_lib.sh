# Shared steps of the benchmark scripts (sourced, not run): building a target and writing the
# benchmark checkpoint once. Each function logs to stderr through the caller's `log`.

# bench_build_target BUILD_DIR TARGET: configures BUILD_DIR if it has no cache, builds TARGET
# and prints the path of its executable.
bench_build_target() {
  local build="$1" target="$2" repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ ! -f "${build}/CMakeCache.txt" ]]; then
    local gen=()
    if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
    log "configuring ${build}"
    cmake -S "${repo}" -B "${build}" "${gen[@]}" >&2
  fi
  log "building ${target}"
  cmake --build "${build}" --target "${target}" >&2
  local bin
  bin="$(find "${build}" -type f -name "${target}" -perm -u+x | head -n 1)"
  if [[ -z "${bin}" ]]; then
    echo "${target} not found under ${build}" >&2
    return 1
  fi
  echo "${bin}"
}

# bench_ensure_model PYTHON MODEL_DIR: writes the random benchmark checkpoint to MODEL_DIR with
# scripts/bench_cpu.py unless it is already there (written under a temporary name, then moved).
bench_ensure_model() {
  local py="$1" model_dir="$2" repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ -f "${model_dir}/config.json" && -f "${model_dir}/model.safetensors" ]]; then
    return 0
  fi
  if [[ ! -x "${py}" ]]; then
    echo "no checkpoint in ${model_dir} and no interpreter ${py} to write it" \
      "(run scripts/bench_cpu.sh once, or set BENCH_PYTHON)" >&2
    return 1
  fi
  log "writing the random checkpoint to ${model_dir}"
  rm -rf "${model_dir}.tmp"
  "${py}" "${repo}/scripts/bench_cpu.py" make-model "${model_dir}.tmp" >&2
  rm -rf "${model_dir}"
  mv "${model_dir}.tmp" "${model_dir}"
}
