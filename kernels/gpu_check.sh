#!/usr/bin/env bash
# `make gpu-check`: correctness, then speed, of megalite's kernels on one GPU (issue 24), in about 8 minutes.
#
#   bash kernels/gpu_check.sh [--quick] [--budget SECONDS] [--out DIR] [--only STAGES]   on the GPU machine
#   bash kernels/gpu_check.sh --smoke [--out DIR]                        dry run on a CPU: every stage at toy size
#   bash kernels/gpu_check.sh --stage-wheels                             device call 1 of 2: only list .whl-quack/a
#   bash kernels/gpu_check.sh --import DIR                               here: file a returned $OUT under kernels/results
# STAGES: a comma-separated subset of precompile,tests,model,bench (default all). PYTHON=path picks the
# interpreter (default python3); GPU_CHECK_QUICK=1 and GPU_CHECK_BUDGET=SECONDS are --quick and --budget.
#
# Stages, in order, each with its own time limit; a stage that would start after the budget is skipped and says so:
#   1. the carried wheels (.whl; QuACK from .whl-quack/a + b when both are there), the environment;
#   2. precompile every shipped kernel config for this GPU in parallel (kernels/compile_check.py, all CPU cores):
#      Triton's cache then serves the autotuning below, and its JSON is the device Triton's resource report;
#   3. correctness, new variants first: every attention config forced in turn (pointer, TMA, warp-specialised) and
#      every norm candidate, bf16/fp16, against float64; then (not --quick) the bf16 accuracy tests (the rest,
#      fp32/TF32, 100-run determinism and seq 16k, run last, in what the budget leaves, not with --quick);
#   4. gpt3-1.3b training steps: kernels triton, then torch (cuDNN SDPA, torch norms), then (not --quick) triton
#      with FP8 linears, and the MoE layer benchmark (bench moe); at least 100 s of budget must be left;
#   5. the kernel benchmark in bf16 with every autotune candidate's time: attention against every SDPA backend
#      (cuDNN included), packed documents against flex attention, norms against torch, apex and QuACK; then fp16;
#      each writes this device's measured table (the `auto` backend's choices) merged into tables/;
#   6. summary.md (issue 24's before/after table from this run) and, under the device tool, the packing of $OUT.
# Results: out/gpu-check (or --out DIR). Under the device tool ($OUT set, 8 files at most come back) the work happens
# in /tmp/gpu-check and $OUT receives gpu-check.log, summary.md, results.json, results-fp16.json, model-bench.json,
# table.json, resources-device.json and extras.tar.gz (everything else). Exit status: 0 when every stage that ran
# passed, 1 otherwise, 2 for bad arguments or an unusable environment.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
QUICK="${GPU_CHECK_QUICK:-0}"
SMOKE=0
BUDGET="${GPU_CHECK_BUDGET:-}"
RESULTS=""
MODE=check
ONLY=precompile,tests,model,bench
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --smoke) SMOKE=1 ;;
    --budget) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || { echo "gpu-check: --budget needs whole seconds" >&2; usage; }
              BUDGET=$2; shift ;;
    --out) [[ $# -ge 2 && -n "$2" ]] || { echo "gpu-check: --out needs a folder" >&2; usage; }
           RESULTS=$2; shift ;;
    --only) [[ $# -ge 2 && "$2" =~ ^((precompile|tests|model|bench),?)+$ ]] || {
              echo "gpu-check: --only takes a comma-separated subset of precompile,tests,model,bench" >&2; usage; }
            ONLY=$2; shift ;;
    --stage-wheels) MODE=stage ;;
    --import) [[ $# -ge 2 && -d "$2" ]] || { echo "gpu-check: --import needs the folder a device call returned" >&2; usage; }
              MODE=import; IMPORT_DIR=$2; shift ;;
    -h|--help) usage ;;
    *) echo "gpu-check: unknown argument $1" >&2; usage ;;
  esac
  shift
done
[[ "$QUICK" =~ ^[01]$ ]] || { echo "gpu-check: GPU_CHECK_QUICK must be 0 or 1" >&2; exit 2; }
PY="${PYTHON:-python3}"  # the GPU machine's python3 (with its torch and triton); PYTHON=... elsewhere

if [[ $MODE == stage ]]; then  # call 1 of 2: the first half of the QuACK libraries travels; a warm machine keeps it
  ls -l .whl-quack/a 2>/dev/null || { echo "gpu-check: no .whl-quack/a (run make gpu-wheels, carry it)"; exit 1; }
  exit 0
fi
if [[ $MODE == import ]]; then  # on the development machine: file a returned $OUT as kernels/results/<device>-<date>
  summary="$IMPORT_DIR/summary.md"
  [[ -f "$summary" && -f "$IMPORT_DIR/table.json" ]] || { echo "gpu-check: $IMPORT_DIR lacks summary.md/table.json"; exit 2; }
  device=$($PY -c "import json,sys; from megalite.kernels.measured import device_slug; print(device_slug(json.load(open(sys.argv[1]))['device']))" "$IMPORT_DIR/table.json") || exit 2
  dest="kernels/results/$device-$(date -u +%F)"
  mkdir -p "$dest" megalite/kernels/tables
  cp "$IMPORT_DIR"/*.json "$IMPORT_DIR"/*.md "$IMPORT_DIR"/*.log "$dest"/ 2>/dev/null
  [[ -f "$IMPORT_DIR/extras.tar.gz" ]] && tar -xzf "$IMPORT_DIR/extras.tar.gz" -C "$dest"
  cp "$IMPORT_DIR/table.json" "megalite/kernels/tables/$device.json"
  echo "gpu-check: filed under $dest; megalite/kernels/tables/$device.json is the table auto follows (commit both)"
  exit 0
fi

if [[ -z "$RESULTS" ]]; then
  if [[ -n "${OUT:-}" ]]; then RESULTS=/tmp/gpu-check; else RESULTS=out/gpu-check; fi
fi
if [[ -z "$BUDGET" ]]; then BUDGET=$((QUICK == 1 ? 300 : 470)); fi
if [[ -d "$RESULTS" && -n "$(ls -A "$RESULTS")" && ! -f "$RESULTS/gpu-check.log" ]]; then
  echo "gpu-check: $RESULTS is not empty and not an earlier gpu-check's folder: choose another --out" >&2
  exit 2
fi
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-check.log"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(elapsed))); }
STATUS=0
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }
stage() {  # name, seconds it needs at least: says and returns 1 when the budget cannot give them
  if ! wanted "${1%%[: ]*}"; then
    echo "== $1: not asked for (--only $ONLY)"
    return 1
  fi
  if (($(left) < $2)); then
    echo "== $1: skipped, $(left)s of the ${BUDGET}s budget left (needs $2s)"
    return 1
  fi
  echo "== $1 (t=$(elapsed)s, $(left)s left)"
}
cap() { local want=$1 rest; rest=$(left); ((rest < want)) && want=$rest; ((want < 10)) && want=10; echo "$want"; }

echo "== gpu-check $(date -u +%FT%TZ) commit ${MEGALITE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" \
     "quick=$QUICK smoke=$SMOKE budget=${BUDGET}s"

# 1. Carried wheels: install only the distributions this python lacks (never shadow its torch/numpy).
if ((SMOKE == 0)) && compgen -G ".whl-quack/b/*.part-*" > /dev/null; then
  if compgen -G ".whl-quack/a/*.part-*" > /dev/null; then
    wheel=$(basename "$(ls .whl-quack/a/*.part-00)" .part-00)
    cat .whl-quack/a/*.part-* .whl-quack/b/*.part-* > ".whl-quack/b/$wheel"
    if (cd .whl-quack/b && sha256sum -c --quiet wheel.sha256); then echo "== QuACK: joined $wheel"
    else echo "== QuACK: the joined $wheel does not match its checksum: not installed"; rm -f ".whl-quack/b/$wheel"; fi
  else
    echo "== QuACK: .whl-quack/a is not here (the first device call did not run, or its machine was given back):" \
         "the norm benchmark runs without QuACK"
  fi
fi
mapfile -t MISSING < <($PY - <<'PYEOF'
import glob, importlib.metadata as md, os
for path in sorted(glob.glob(".whl/*.whl") + glob.glob(".whl-quack/b/*.whl")):
    name = os.path.basename(path).split("-")[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(path)
PYEOF
)
if ((SMOKE == 0 && ${#MISSING[@]})); then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${MISSING[@]}" \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # megalite from the tree, not installed
export MPLBACKEND=Agg
if ((SMOKE)); then
  export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
else
  export TRITON_INTERPRET=0 DS_ACCELERATOR=cuda  # tests/conftest.py defaults them to 1 and cpu for the CPU machine
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
fi
ARCH=$($PY - "$SMOKE" <<'PYEOF'
import sys
import torch, triton
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}, python {sys.version.split()[0]}",
      file=sys.stderr)
if sys.argv[1] == "1":
    print(90)
else:
    assert torch.cuda.is_available(), "no CUDA device visible"
    major, minor = torch.cuda.get_device_capability()
    print(f"device: {torch.cuda.get_device_name()}, sm_{major}{minor}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs",
          file=sys.stderr)
    print(10 * major + minor)
PYEOF
) || { echo "gpu-check: environment not usable"; exit 2; }
# QuACK in its own process: a library that fails to load (or crashes loading) must not take the benchmark with it.
if $PY -c "import quack" > "$RESULTS/quack-import.txt" 2>&1; then echo "== QuACK imports: the norm benchmark measures it"
else
  echo "== QuACK does not import here (the norm benchmark runs without it): $(tail -1 "$RESULTS/quack-import.txt")"
  export MEGALITE_BENCH_NO_QUACK=1
fi

# 2. Precompile in parallel (Triton's cache is keyed by what the launch specialises, so the autotuner finds these).
if stage "precompile for sm_$ARCH" 40; then
  if ((SMOKE)); then KARGS=(--dtype bf16 --head-dims "" --widths 1024 --sample --workers 2)
  else KARGS=(--dtype bf16,fp16 --head-dims 64,128 --widths 1024,2048,4096,8192,16384 --workers "$(nproc)"); fi
  timeout --signal=INT --kill-after=10 "$(cap $((QUICK == 1 ? 60 : 70)))" $PY kernels/compile_check.py --arch "$ARCH" \
    "${KARGS[@]}" --summary --json "$RESULTS/resources-device.json" > "$RESULTS/resources-device.md"
  rc=$?
  tail -1 "$RESULTS/resources-device.md"
  echo "== precompile rc=$rc (1: a kernel spills on this Triton, 124: cut short; the cache keeps what compiled)"
  ((rc == 2)) && STATUS=1
fi

# 3. Correctness. One kernel config per launch (MEGALITE_AUTOTUNE=0) except where a test forces each in turn.
run_tests() {  # name, seconds, pytest args...
  local name=$1 limit=$2 rc
  shift 2
  stage "tests: $name" 20 || return 0
  if ((SMOKE)); then set -- tests/test_kernels_attention_variants.py -k copy_engine  # the plumbing, on the CPU
  else set -- -m gpu "$@" tests/test_kernels_attention.py tests/test_kernels_norms.py; fi
  MEGALITE_AUTOTUNE=0 timeout --signal=INT --kill-after=20 "$(cap "$limit")" $PY -m pytest -q -p no:cacheprovider \
    -o addopts="" --durations=5 --junitxml="$RESULTS/tests-$name.xml" "$@"
  rc=$?
  [[ $rc -ne 0 && $rc -ne 5 ]] && STATUS=1  # 5: nothing selected
  echo "== tests: $name rc=$rc (t=$(elapsed)s)"
}
run_tests variants $((QUICK == 1 ? 70 : 80)) -k "(every_autotune_config or every_candidate) and not float32"
((SMOKE == 1 || QUICK == 1)) || run_tests bf16 40 -k "bfloat16 and not every"

# 4. Whole training steps of gpt3-1.3b on this GPU: megalite's kernels, torch's, then megalite's with FP8 linears.
if stage "model" 100; then
  # Each run gets a per-run limit and the whole a little more than their sum, so a slow run loses its own figure,
  # never the others' (model-bench.json is written at the end).
  if ((SMOKE)); then MARGS=(--smoke --timeout 200); runs=1
  elif ((QUICK)); then MARGS=(--steps 6 --warmup 2 --timeout 70); runs=2
  else MARGS=(--steps 6 --warmup 2 --timeout 70 --fp8 tensorwise); runs=3; fi
  timeout --signal=INT --kill-after=15 $((runs * 70 + 20)) $PY -m megalite.bench model \
    --out "$RESULTS/model" "${MARGS[@]}" || STATUS=1
  # The MoE layer (issue 25): a Mixtral-8x7B layer (H 4096, 8 experts of 14336, top-2) at 8192 tokens in bf16, torch's
  # grouped GEMM and one matmul per expert against a dense SwiGLU MLP of the same active parameters; its JSON and
  # table travel in extras.tar.gz.
  if ((SMOKE)); then MOE=(--smoke); else MOE=(); fi
  ((QUICK)) || timeout --signal=INT --kill-after=15 120 $PY -m megalite.bench moe --out "$RESULTS/moe" "${MOE[@]}" \
    || STATUS=1
fi

# 5. The kernel benchmark: bf16 (every op), then fp16; the measured table merged into the committed one.
mkdir -p "$RESULTS/tables"
TABLE=$($PY -c "import sys; from megalite.kernels.measured import device_slug; print(device_slug(sys.argv[1]))" \
  "$($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)")')")
[[ -f "megalite/kernels/tables/$TABLE.json" ]] && cp "megalite/kernels/tables/$TABLE.json" "$RESULTS/tables/"
bench() {  # name, seconds, args...
  local name=$1 want=$2 budget
  shift 2
  stage "bench: $name" 30 || return 0
  ((want < 30)) && want=30
  budget=$(cap "$want")
  if ((SMOKE)); then  # toy sizes on the CPU: keep the output folder, dtype and ops only
    local keep=() i
    for ((i = 1; i <= $#; i++)); do
      case "${!i}" in --out|--dtype|--ops) keep+=("${!i}"); i=$((i + 1)); keep+=("${!i}") ;; esac
    done
    set -- --smoke "${keep[@]}"
  fi
  timeout --signal=INT --kill-after=20 $((budget + 25)) $PY -m megalite.bench kernels --time-budget "$((budget - 10))" \
    --table "$RESULTS/tables" "$@" || STATUS=1
}
# bf16 gets three quarters of what is left, fp16 the rest; the issue's rows (d128 causal 4k, d128 16k, d64 causal
# 8k) come first in the bf16 sweep.
if ((QUICK)); then
  bench bf16 $(($(left) * 3 / 4)) --out "$RESULTS" --seqs 4096,16384,8192 --widths 1024,4096,16384
  bench fp16 $(left) --out "$RESULTS/fp16" --dtype float16 --ops attention --seqs 4096 --head-dims 128
else
  bench bf16 $(($(left) * 3 / 4)) --out "$RESULTS" --seqs 4096,16384,8192,2048,1024
  bench fp16 $(left) --out "$RESULTS/fp16" --dtype float16 --ops attention,rms_norm,layer_norm --seqs 4096,16384 \
    --head-dims 128 --widths 1024,4096,16384
fi

# What is left of the budget: fp16/fp32/TF32 accuracy, the 100-run determinism checks, seq 16k (not quick).
((QUICK == 1 || SMOKE == 1)) || run_tests rest 60 -k "not bfloat16 and not every"

# 6. The summary, and the files the device tool brings back.
$PY kernels/summarize.py "$RESULTS" --out "$RESULTS/summary.md" > /dev/null || STATUS=1
cat "$RESULTS/summary.md" 2>/dev/null
echo "== gpu-check done in $(elapsed)s, status $STATUS; results in $RESULTS"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$RESULTS/summary.md" "$RESULTS/results.json" "$RESULTS/resources-device.json" "$OUT"/ 2>/dev/null
  cp "$RESULTS/fp16/results.json" "$OUT/results-fp16.json" 2>/dev/null
  cp "$RESULTS/model/model-bench.json" "$OUT/" 2>/dev/null
  cp "$RESULTS/tables/$TABLE.json" "$OUT/table.json" 2>/dev/null
  tar -czf "$OUT/extras.tar.gz" -C "$RESULTS" --exclude='*.bin' --exclude='*.idx' --exclude='run-*' \
    --exclude='synthetic*' --exclude='gpu-check.log' --exclude='results.json' --exclude='summary.md' . 2>/dev/null
  cp "$LOG" "$OUT/gpu-check.log"
  ls -l "$OUT"
fi
exit $STATUS
