# shellcheck shell=bash
# Shared by scripts/gpu_check.sh and scripts/gpu_cluster_check.sh (sourced, never run): the
# private prefix of the bundle from scripts/gpu_deps.sh, the environment that points the build
# and the binaries at it, configure and ldd checks, and the steps under a time budget with
# summary.md and logs.tar.gz rewritten after each.
#
# The caller sets, before gpu_setup:
#   GPU_TAG        prefix of the progress lines ("gpu_check")
#   GPU_TITLE      heading of summary.md ("GPU check")
#   GPU_LOGNAME    folder of the logs inside logs.tar.gz ("gpu-check-logs")
#   BUILD          the build folder
#   GPU_SERVICES   ON to configure with the gRPC services (default OFF)
#   GPU_NEED_PKGS  package names the bundle must hold (space-separated; default none)
#   LDD_SHOW       executables whose whole ldd output goes to the ldd log (space-separated)
#   RESERVE        seconds kept back at the end of the budget (default 15)
# and may define summary_sections (printed into summary.md after the table of steps).
# Environment: GPU_CHECK_BUDGET (seconds, default 540), GPU_CHECK_WERROR (default OFF),
# GPU_CHECK_JOBS (default nproc).
# shellcheck disable=SC2317  # the functions below run through `bash -c` (export -f)
# shellcheck disable=SC2034  # NCCL_ARGS, FAILED, ...: read by the scripts that source this

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# gpu_setup OUTDIR [DEPS_DIR]: the variables, the log folder, PATH, LD_LIBRARY_PATH and NCCL.
gpu_setup() {
  START=${SECONDS}
  BUDGET="${GPU_CHECK_BUDGET:-540}"
  RESERVE="${RESERVE:-15}"  # seconds kept back for the summary and the log archive
  OUT="$1"
  DEPS="${2:-${ROOT}/gpu-deps}"
  [[ -d "${DEPS}" ]] && DEPS="$(cd "${DEPS}" && pwd)"
  mkdir -p "${OUT}"
  OUT="$(cd "${OUT}" && pwd)"
  PREFIX="${ROOT}/build-gpu-prefix"
  LIBDIR="${PREFIX}/usr/lib/x86_64-linux-gnu"
  JOBS="${GPU_CHECK_JOBS:-$(nproc)}"
  SUMMARY="${OUT}/summary.md"
  GPU_SERVICES="${GPU_SERVICES:-OFF}"
  GPU_NEED_PKGS="${GPU_NEED_PKGS:-}"
  LDD_SHOW="${LDD_SHOW:-}"

  # Logs are written outside OUTDIR and archived into OUTDIR/logs.tar.gz after each step, so
  # that OUTDIR holds a few plain files only.
  LOGROOT="$(mktemp -d "${TMPDIR:-/tmp}/${GPU_LOGNAME}.XXXXXX")"
  LOGS="${LOGROOT}/${GPU_LOGNAME}"
  mkdir -p "${LOGS}"
  trap 'rm -rf "${LOGROOT}"' EXIT

  export PATH="/usr/local/cuda/bin:${PATH}"
  # ninja may come from Python's ninja package only.
  if ! command -v ninja >/dev/null; then
    NINJA_DIR="$(python3 -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null)" &&
      [[ -x "${NINJA_DIR}/ninja" ]] && export PATH="${PATH}:${NINJA_DIR}"
  fi
  GENERATOR="$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')"

  # The bundle's libraries first; the OpenBLAS variant lives in its own folder.
  export LD_LIBRARY_PATH="${LIBDIR}:${LIBDIR}/openblas-pthread:${PREFIX}/usr/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"

  # NCCL: the toolkit's copy when it has one (the top-level CMakeLists finds it); else the one
  # in Python's nvidia-nccl wheel, which has libnccl.so.2 but no libnccl.so, so pass both paths.
  NCCL_ARGS=()
  NCCL_NOTE="CUDA toolkit"
  if ! nccl_in_toolkit; then
    NCCL_DIR="$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null)"
    if [[ -n "${NCCL_DIR}" && -e "${NCCL_DIR}/include/nccl.h" && -e "${NCCL_DIR}/lib/libnccl.so.2" ]]; then
      NCCL_ARGS=(-DGEMMA_NCCL_INCLUDE_DIR="${NCCL_DIR}/include"
                 -DGEMMA_NCCL_LIBRARY="${NCCL_DIR}/lib/libnccl.so.2")
      export LD_LIBRARY_PATH="${LD_LIBRARY_PATH}:${NCCL_DIR}/lib"
      NCCL_NOTE="${NCCL_DIR} (Python wheel)"
    else
      NCCL_NOTE="not found"
    fi
  fi

  export ROOT DEPS PREFIX BUILD LIBDIR GENERATOR GPU_SERVICES GPU_NEED_PKGS LDD_SHOW
  ROWS=()
  FAILED_LOGS=()
  FAILED=0
  CURRENT_STEP=""  # the step running now, for a run cut short
}

nccl_in_toolkit() {
  local inc lib
  for inc in /usr/local/cuda/include /usr/local/cuda/targets/x86_64-linux/include /usr/include; do
    [[ -e "${inc}/nccl.h" ]] || continue
    for lib in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
               /usr/lib/x86_64-linux-gnu; do
      [[ -e "${lib}/libnccl.so" ]] && return 0
    done
  done
  return 1
}

unpack() {
  [[ -d "${DEPS}" ]] || { echo "no dependency bundle at ${DEPS} (run scripts/gpu_deps.sh)"; return 1; }
  shopt -s nullglob
  local debs=("${DEPS}"/*.deb)
  (( ${#debs[@]} )) || { echo "no .deb files in ${DEPS}"; return 1; }
  local need found
  for need in ${GPU_NEED_PKGS}; do
    found=("${DEPS}/${need}"_*.deb)
    (( ${#found[@]} )) ||
      { echo "${need} is not in ${DEPS}: run scripts/gpu_deps.sh --services"; return 1; }
  done
  # The same bundle already unpacked (an earlier script of this session on this machine): keep
  # it, so that its files keep their times and a build folder made against it stays up to date.
  local stamp
  stamp="$(find "${DEPS}" -maxdepth 1 -name '*.deb' -printf '%f %s\n' | sort | md5sum)"
  if [[ -f "${PREFIX}/.bundle" && "$(cat "${PREFIX}/.bundle")" == "${stamp}" ]]; then
    echo "${PREFIX} already holds this bundle"
    return 0
  fi
  rm -rf "${PREFIX:?}"
  mkdir -p "${PREFIX}"
  local deb
  for deb in "${debs[@]}"; do
    echo "dpkg -x ${deb##*/}"
    dpkg -x "${deb}" "${PREFIX}" || return 1
  done
  # Some Debian 12 packages (libnl-3-200) still install into /lib: merge it into /usr/lib, as
  # a merged-/usr system has it, so that one library folder holds everything.
  if [[ -d "${PREFIX}/lib" ]]; then
    cp -a "${PREFIX}/lib/." "${PREFIX}/usr/lib/" && rm -rf "${PREFIX:?}/lib" || return 1
  fi
  # A few CMake files name absolute /usr paths that the relative import prefix does not cover
  # (Gloo's IMPORTED_LOCATION "/usr/lib/libgloo.so.0.5.0", glog's module path
  # "/usr/share/glog/cmake" for FindUnwind), and pkg-config files say prefix=/usr: point every
  # such /usr at the prefix.
  find "${PREFIX}" \( -name '*.cmake' -o -name '*.pc' \) -type f -print0 |
    xargs -0 -r sed -i -E "s#([\"( ;=])/usr([/\"); ]|\$)#\\1${PREFIX}/usr\\2#g" || return 1
  # Absolute symlinks name a system file of the Debian 12 version (zlib1g-dev's libz.so ->
  # /lib/x86_64-linux-gnu/libz.so.1.2.13; Ubuntu 24.04 has libz.so.1.3): point each into the
  # prefix when the file is there, else at the system's library of the same soname (libz.so.1;
  # zlib1g is assumed present).
  local link target t
  while IFS= read -r -d '' link; do
    target="$(readlink "${link}")"
    t="${target/#\/lib\//\/usr\/lib\/}"
    if [[ -e "${PREFIX}${t}" ]]; then
      ln -sfn "${PREFIX}${t}" "${link}"
      continue
    fi
    while [[ ! -e "${t}" && "${t}" =~ \.so\.[0-9]+\. ]]; do t="${t%.*}"; done
    if [[ -e "${t}" ]]; then
      ln -sfn "${t}" "${link}"
      echo "symlink ${link#"${PREFIX}"/} -> ${t} (was ${target})"
    else
      echo "warning: ${link#"${PREFIX}"/} -> ${target}: no such file here"
    fi
  done < <(find "${PREFIX}" -type l -lname '/*' -print0)
  echo "${stamp}" > "${PREFIX}/.bundle"
  echo "unpacked ${#debs[@]} packages into ${PREFIX} ($(du -sh "${PREFIX}" | cut -f1))"
}

configure() {
  # A build folder from another generator cannot be reused.
  if [[ -f "${BUILD}/CMakeCache.txt" ]] &&
     ! grep -qx "CMAKE_GENERATOR:INTERNAL=${GENERATOR}" "${BUILD}/CMakeCache.txt"; then
    rm -rf "${BUILD}"
  fi
  local env_args=() services_args=()
  if [[ "${GPU_SERVICES}" == ON ]]; then
    # protoc and grpc_cpp_plugin from the bundle, never one on PATH; RE2 (gRPC's Findre2) through
    # the bundle's pkg-config, which sees only the bundle's .pc files.
    env_args=(-u PKG_CONFIG_PATH "PKG_CONFIG_LIBDIR=${LIBDIR}/pkgconfig:${PREFIX}/usr/share/pkgconfig")
    services_args=(-DPKG_CONFIG_EXECUTABLE="${PREFIX}/usr/bin/pkgconf"
                   -DProtobuf_PROTOC_EXECUTABLE="${PREFIX}/usr/bin/protoc")
  fi
  env "${env_args[@]}" cmake -S "${ROOT}" -B "${BUILD}" -G "${GENERATOR}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGEMMA_ENABLE_CUDA=ON -DGEMMA_BUILD_SERVICES="${GPU_SERVICES}" \
    -DGEMMA_WERROR="${GPU_CHECK_WERROR:-OFF}" \
    -DCMAKE_PREFIX_PATH="${PREFIX}/usr" \
    -DCMAKE_LIBRARY_PATH="${LIBDIR};${LIBDIR}/openblas-pthread" \
    -DCMAKE_INCLUDE_PATH="${PREFIX}/usr/include;${PREFIX}/usr/include/x86_64-linux-gnu/openblas-pthread" \
    "${services_args[@]}" "$@"
}

# Every executable starts its dynamic loader's search without "not found", and prints where
# the bundle's libraries came from (the whole ldd of the LDD_SHOW executables).
check_libs() {
  local bad=0 bin
  for bin in "${BUILD}"/bin/*; do
    [[ -x "${bin}" && -f "${bin}" ]] || continue
    if ldd "${bin}" | grep -q 'not found'; then
      echo "${bin##*/}: missing libraries:"; ldd "${bin}" | grep 'not found'; bad=1
    fi
  done
  for bin in ${LDD_SHOW}; do
    [[ -x "${BUILD}/bin/${bin}" ]] && { echo "== ldd ${bin}"; ldd "${BUILD}/bin/${bin}"; }
  done
  return "${bad}"
}

export -f unpack configure check_libs nccl_in_toolkit

remaining() { echo $(( BUDGET - (SECONDS - START) )); }

write_summary() {
  local log
  {
    echo "# ${GPU_TITLE} $(date -u +%FT%TZ)"
    echo
    echo "- device: ${DEVICE}"
    echo "- compilers: $(c++ --version 2>/dev/null | head -1); $(nvcc --version 2>/dev/null | tail -1)"
    echo "- cmake: $(cmake --version 2>/dev/null | head -1), generator ${GENERATOR}, -j ${JOBS}"
    echo "- NCCL: ${NCCL_NOTE}"
    echo "- elapsed: $((SECONDS - START)) s of a ${BUDGET} s budget"
    echo
    echo "| step | result | time | log (in logs.tar.gz) |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    declare -F summary_sections >/dev/null && summary_sections
    for log in "${FAILED_LOGS[@]}"; do
      echo
      echo "## tail of ${log}"
      echo '```'
      tail -n 30 "${LOGS}/${log}"
      echo '```'
    done
  } > "${SUMMARY}.tmp" && mv "${SUMMARY}.tmp" "${SUMMARY}"
  tar -C "${LOGROOT}" -czf "${OUT}/logs.tar.gz.tmp" "${GPU_LOGNAME}" &&
    mv "${OUT}/logs.tar.gz.tmp" "${OUT}/logs.tar.gz"
}

# step NAME LOG LIMIT COMMAND...: runs COMMAND under timeout (LIMIT seconds, or what is left of
# the budget), records the result, and rewrites the summary.
step() {
  local name="$1" log="$2" limit="$3"
  shift 3
  local left=$(( $(remaining) - RESERVE ))
  if (( left < 10 )); then
    ROWS+=("| ${name} | skipped (time budget spent) | 0 s | |")
    FAILED=1
    write_summary
    return 125
  fi
  (( limit > left )) && limit=${left}
  local start=${SECONDS}
  CURRENT_STEP="${name}"
  echo "${GPU_TAG}: ${name} (limit ${limit} s)"
  timeout -k 10 "${limit}" "$@" > "${LOGS}/${log}" 2>&1
  local rc=$? result
  case ${rc} in
    0) result=pass ;;
    124|137) result="TIMEOUT (${limit} s)" ;;
    *) result="FAIL (${rc})" ;;
  esac
  if (( rc != 0 )); then FAILED=1; FAILED_LOGS+=("${log}"); fi
  ROWS+=("| ${name} | ${result} | $((SECONDS - start)) s | ${log} |")
  CURRENT_STEP=""
  echo "${GPU_TAG}: ${name}: ${result}"
  write_summary
  return "${rc}"
}

# The device line of summary.md, and nvidia-smi's full output into the logs.
probe_device() {
  timeout 30 nvidia-smi > "${LOGS}/nvidia-smi.log" 2>&1
  DEVICE="$(timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
}
