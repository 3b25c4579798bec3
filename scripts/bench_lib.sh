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

# bench_start_cleanup: makes ${work} (a temporary directory) and an EXIT trap that stops every
# pid appended to the array `pids` and removes ${work}. Call once, at the top level.
bench_start_cleanup() {
  work="$(mktemp -d)"
  pids=()
  trap bench_cleanup EXIT INT TERM
}
bench_cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "${pid}" 2>/dev/null || true; done
  rm -rf "${work}"
}

# bench_free_port: a free TCP port on 127.0.0.1.
bench_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
