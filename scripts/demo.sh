#!/usr/bin/env bash
# The end-to-end CPU demo: prepare the built-in corpus (the Python standard library's sources),
# train a small GPT on two processes through the deepspeed launcher (ZeRO-1 data parallel),
# evaluate it against a unigram baseline, and generate text.
#
# Tensor parallel instead of data parallel is one override:  --set parallel.tensor=2
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
DEMO=out/demo
CONFIG=configs/runs/demo-cpu.json
EXTRA=("$@")

if [[ ! -f $DEMO/data/stdlib.idx ]]; then
  echo "== 1/4 prepare: stdlib corpus -> byte-level BPE (8192) -> $DEMO/data/stdlib.{bin,idx}"
  megalite prepare --input stdlib --output-prefix $DEMO/data/stdlib --vocab-size 8192 --workers 2
else
  echo "== 1/4 prepare: $DEMO/data/stdlib.{bin,idx} already there"
fi

echo "== 2/4 train: 2 processes, deepspeed launcher"
megalite config check $CONFIG --world-size 2 "${EXTRA[@]}"
rm -rf $DEMO/run
deepspeed --num_gpus 2 --no_local_rank "$(command -v megalite)" train $CONFIG --set train.resume=never "${EXTRA[@]}"

echo "== 3/4 eval: validation split, against a unigram model of the training split"
megalite eval --checkpoint $DEMO/run --split valid --unigram | tee $DEMO/eval.json
python - "$DEMO/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"validation perplexity {r['perplexity']:.1f}  unigram {r['unigram_perplexity']:.1f}  "
      f"ratio {r['perplexity_ratio_to_unigram']:.2f} (target <= 0.5)")
sys.exit(0 if r["perplexity_ratio_to_unigram"] <= 0.5 else 1)
PY

echo "== 4/4 generate (KV cache, top-k sampling)"
megalite generate --checkpoint $DEMO/run --prompt "def read_config(path):" --max-new-tokens 80 \
  --temperature 0.7 --top-k 40 --seed 0
echo "== demo done: metrics in $DEMO/run/metrics.jsonl, loss curve in $DEMO/run/loss.png"
