#!/usr/bin/env bash
# Encoding throughput on the 1 MB golden document, single thread: our tokenizer
# (bench/tokenizer_bench.cc, Google Benchmark) beside the Hugging Face `tokenizers` library
# on the same file and vocabulary. Prints MB/s for both.
#   scripts/bench_tokenizer.sh [BUILD_DIR]    (PYTHON=... to pick an interpreter with
#                                              tokenizers installed; default .venv-tools)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-${repo}/build}"
python="${PYTHON:-${repo}/.venv-tools/bin/python}"
data="${repo}/tests/golden/data/tokenizer"

cmake -S "${repo}" -B "${build}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "${build}" --target tokenizer_bench >/dev/null
ours="$("${build}/bin/tokenizer_bench" --benchmark_filter=BM_EncodeDocument \
  --benchmark_format=json | "${python}" -c '
import json, sys
run = json.load(sys.stdin)["benchmarks"][0]
print("%.1f" % (run["bytes_per_second"] / 1e6))')"

hf="$(RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false "${python}" - "${data}" <<'PY'
import sys, time
from tokenizers import Tokenizer
data = sys.argv[1]
tok = Tokenizer.from_file(f"{data}/gemma4_test_tokenizer.json")
text = open(f"{data}/corpus/doc_1mb.txt", "rb").read().decode("utf-8")
size = len(text.encode("utf-8"))
tok.encode(text, add_special_tokens=False)  # warm-up
best = float("inf")
for _ in range(5):
    start = time.perf_counter()
    tok.encode(text, add_special_tokens=False)
    best = min(best, time.perf_counter() - start)
print(f"{size / best / 1e6:.1f}")
PY
)"
echo "document: tests/golden/data/tokenizer/corpus/doc_1mb.txt (1 MiB), single thread"
printf "%-28s %10s\n" "implementation" "MB/s"
printf "%-28s %10s\n" "gemma_tokenizer (ours)" "${ours}"
printf "%-28s %10s\n" "HF tokenizers 0.23.3" "${hf}"
