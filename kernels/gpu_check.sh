#!/usr/bin/env bash
# One command for an offline GPU machine (python3, torch, triton; no deepspeed, datasets, pydantic):
#   1. install the carried wheels from .whl/ (made by `make gpu-wheels`) that this python lacks;
#   2. the GPU correctness tests, bf16 first, then fp16/fp32/TF32, determinism and seq 16k;
#   3. a whole training step of gpt3-1.3b, Triton kernels against torch, and Triton with FP8 (model.fp8 tensorwise)
#      against Triton in bf16 (megalite bench model --fp8; needs torchao from the carried wheels);
#   4. the MoE layer against a dense MLP of the same active parameters, grouped against looped experts (bench moe);
#   5. the kernel benchmark (attention and norms against every alternative this machine has).
# Everything goes to out/gpu-check. Under the device tool ($OUT set, at most 8 files come back) the work
# happens in /tmp/gpu-check and $OUT receives the log, the three result tables, the kernel and model JSON, the
# plot and one tarball of every other small file (test XML, per-backend logs, the MoE bench's JSON). Budget: GPU_CHECK_BUDGET seconds
# (default 440) for the whole check; the kernel benchmark gets what the tests and the model leave.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
BUDGET="${GPU_CHECK_BUDGET:-440}"
if [[ -n "${OUT:-}" ]]; then RESULTS=/tmp/gpu-check; else RESULTS=out/gpu-check; fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-check.log"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
PY=python3

echo "== gpu-check $(date -u +%FT%TZ) commit ${MEGALITE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# 1. Carried wheels: install only distributions this python does not have (never shadow its torch/numpy).
if compgen -G ".whl/*.whl" > /dev/null; then
  mapfile -t MISSING < <($PY - <<'PYEOF'
import glob, importlib.metadata as md, os
for path in sorted(glob.glob(".whl/*.whl")):
    name = os.path.basename(path).split("-")[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(path)
PYEOF
)
  if ((${#MISSING[@]})); then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${MISSING[@]}"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # megalite from the tree, not installed
export TRITON_INTERPRET=0  # tests/conftest.py defaults it to 1 for the CPU machine
export DS_ACCELERATOR=cuda  # and this one to cpu
export MPLBACKEND=Agg
$PY - <<'PYEOF' || { echo "gpu-check: environment not usable"; exit 2; }
import torch, triton
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible"
print("device:", torch.cuda.get_device_name())
PYEOF

STATUS=0
run_tests() {  # name, timeout seconds, pytest args...
  local name=$1 limit=$2
  shift 2
  echo "== tests: $name (t=$(elapsed)s)"
  # conftest.py provides the tests' fixtures (triton_backend); its CPU defaults are set only where unset, and
  # the exports above win. It imports nothing this machine lacks.
  timeout --signal=INT --kill-after=20 "$limit" $PY -m pytest -q -p no:cacheprovider -o addopts="" -m gpu --durations=10 \
    --junitxml="$RESULTS/tests-$name.xml" "$@" tests/test_kernels_attention.py tests/test_kernels_norms.py
  local rc=$?
  [[ $rc -ne 0 && $rc -ne 5 ]] && STATUS=1  # 5: nothing selected
  echo "== tests: $name rc=$rc (t=$(elapsed)s)"
}
# One kernel config per launch in the tests: each autotune config compiles once per specialisation, which
# would spend the budget on compilation; the benchmark below autotunes.
export MEGALITE_AUTOTUNE=0
# GPU_CHECK_QUICK=1 (a session with little device time left): shorter test limits, no model benchmark.
QUICK="${GPU_CHECK_QUICK:-0}"
run_tests bf16 140 -k "bfloat16"
run_tests rest $((QUICK == 1 ? 100 : 140)) -k "not bfloat16"
unset MEGALITE_AUTOTUNE

# 3. A whole training step: gpt3-1.3b in bf16 on this one GPU, Triton kernels against the torch backend (MFU), then
#    the Triton run again with FP8 linears (tensorwise recipe): tokens/s side by side, MFU against the bf16 and FP8 peaks.
if ((QUICK != 1)); then
  echo "== model bench (t=$(elapsed)s)"
  timeout --signal=INT --kill-after=15 260 $PY -m megalite.bench model --out "$RESULTS/model" --steps 8 --warmup 3 \
    --timeout 90 --fp8 tensorwise || STATUS=1
fi

# 4. The MoE layer: a Mixtral-8x7B layer (H 4096, 8 experts of 14336, top-2) at 8192 tokens in bf16, torch's
#    grouped GEMM and one matmul per expert against a dense SwiGLU MLP of 2 x 14336 units, forward + backward.
if ((QUICK != 1)); then
  echo "== moe bench (t=$(elapsed)s)"
  timeout --signal=INT --kill-after=15 120 $PY -m megalite.bench moe --out "$RESULTS/moe" || STATUS=1
fi

# 5. Kernel benchmark with whatever time is left (it stops starting measurements at the budget; 25 s to finish).
LEFT=$((BUDGET - $(elapsed)))
((LEFT < 60)) && LEFT=60
echo "== bench: budget ${LEFT}s (t=$(elapsed)s)"
TRITON_PRINT_AUTOTUNING=1 timeout --signal=INT --kill-after=15 $((LEFT + 25)) $PY -m megalite.bench kernels --out "$RESULTS" --time-budget "$LEFT" || STATUS=1
# Registers and spills of every kernel the benchmark compiled, as the device's Triton built them (issue 20:
# kernels/compile_check.py predicts none spill at head dims <= 128 and widths <= 16384).
$PY - "$RESULTS/results.json" <<'PYEOF' || true
import json, sys
rows = json.load(open(sys.argv[1])).get("compiled", [])
spilling = [r for r in rows if r.get("spills")]
print(f"== compiled kernels: {len(rows)}, with spills: {len(spilling)}")
for r in spilling:
    print("   spills:", r)
PYEOF
echo "== gpu-check done in $(elapsed)s, status $STATUS; results in $RESULTS"
ls -l "$RESULTS"
if [[ -n "${OUT:-}" ]]; then
  cp "$RESULTS"/results.{md,json,png} "$RESULTS"/model/model-bench.{md,json} "$RESULTS"/moe/moe-bench.md "$OUT"/ 2>/dev/null
  tar -czf "$OUT/extras.tar.gz" -C "$RESULTS" --exclude='*.bin' --exclude='*.idx' --exclude='run-*' \
    --exclude='results.*' --exclude='gpu-check.log' . 2>/dev/null
  cp "$LOG" "$OUT/gpu-check.log"
fi
exit $STATUS
