"""Loglikelihood requests per second: megalite's harness model on a checkpoint against the lm-evaluation-harness's
own Hugging Face backend on the same checkpoint exported with `megalite convert --to-hf`, side by side in one process.

    megalite bench eval-harness [--out out/bench-eval-harness] [--questions 100] [--batch-sizes 1,8]
                                [--repeats 3] [--slice 40] [--families gpt,llama]

Builds everything it needs offline: the built-in corpus (the Python standard library's sources) prepared with
an 8192-token BPE, a GPT and a Llama of the demo's size (4 layers, width 256, context 256) trained for two steps
(throughput does not depend on the weights), and a multiple-choice task (a context of 32-200 tokens from held-out
documents, its true 16-token continuation and three from other documents: 4 loglikelihood requests per question).
Both backends score the same `Instance`s through `lm.loglikelihood`, after an untimed warm-up, in alternating
slices of --slice requests (the order flipping each slice) so that both see the same machine load; requests/s are
the totals over all slices and repeats. Needs the `eval` extra (lm-eval) and transformers + accelerate (dev).
Writes DIR/eval_harness.json (the figures with the machine and commit) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from megalite.bench import PACKAGE, write_json

LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "num_kv_heads": 2,
         "tied_embeddings": False}


def prepare_data(out: Path) -> str:
    from megalite.data.prepare import prepare

    prefix = out / "data" / "stdlib"
    if not Path(f"{prefix}.idx").is_file():
        prepare(["stdlib"], str(prefix), vocab_size=8192, max_documents=400, progress=False)
    return str(prefix)


def train(out: Path, prefix: str, family: str) -> Path:
    """Two steps of the demo-size model through megalite's own Trainer (one process): a real checkpoint."""
    from megalite import config as C
    from megalite.engine.trainer import Trainer

    run_dir = out / family
    overrides = [f"data.prefixes={json.dumps([prefix])}", f"data.cache_dir={out / 'cache'}", "train.steps=2",
                 f"train.output_dir={run_dir}", "train.eval_interval=0", "train.eval_steps=1", "train.resume=never",
                 "train.logging.progress_bar=false", "train.logging.plot=false"]
    if family == "llama":
        overrides += [f"model.{k}={json.dumps(v)}" for k, v in LLAMA.items()]
    cfg = C.load(PACKAGE / "configs" / "runs" / "demo-cpu.json", overrides)
    if Trainer(cfg).train() != 0:
        raise SystemExit(f"training the {family} model failed")
    return run_dir


def write_task(out: Path, prefix: str, questions: int) -> Path:
    """A multiple-choice task over held-out documents of the prepared corpus."""
    from megalite.data import IndexedDataset
    from megalite.data.prepare import tokenizer_path
    from megalite.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path(prefix))
    ds = IndexedDataset(prefix)
    docs = [ds[i] for i in range(len(ds)) if len(ds[i]) > 260][-200:]
    rng = random.Random(0)
    rows = []
    for _ in range(questions):
        doc = docs[rng.randrange(len(docs))]
        n = rng.randint(32, 200)
        start = rng.randrange(len(doc) - n - 16)
        context = tok.decode(doc[start: start + n].tolist())
        choices = [tok.decode(doc[start + n: start + n + 16].tolist())]
        for _ in range(3):
            other = docs[rng.randrange(len(docs))]
            at = rng.randrange(len(other) - 16)
            choices.append(tok.decode(other[at: at + 16].tolist()))
        answer = rng.randrange(4)
        choices[0], choices[answer] = choices[answer], choices[0]
        rows.append({"context": context, "choices": choices, "answer": answer})
    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'bench_mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    return folder


def requests_of(task_dir: Path) -> list:
    from megalite import eval_harness as H

    manager, names = H.find_tasks(["bench_mc"], str(task_dir))
    (task,) = H.load_tasks(manager, names)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [inst for inst in task.instances if inst.request_type == "loglikelihood"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megalite bench eval-harness", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench-eval-harness", help="results folder")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slice", type=int, default=40, help="requests per alternating timed call")
    parser.add_argument("--families", default="gpt,llama")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import setup_logging

    from megalite import eval_harness as H
    from megalite.generate import load_for_inference
    from megalite.interop.export import export_hf

    setup_logging("WARNING")
    load_at_start = os.getloadavg()
    out = Path(args.out)
    prefix = prepare_data(out)
    task_dir = write_task(out, prefix, args.questions)
    instances = requests_of(task_dir)
    rows = []
    for family in args.families.split(","):
        run_dir = train(out, prefix, family)
        hf_dir = export_hf(run_dir, out / f"{family}-hf")
        loaded = load_for_inference(run_dir)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            ours = H.model_class().for_model(loaded.model, loaded.tokenizer, loaded.eod_token_id,
                                             loaded.bos_token_id, batch_size=batch, step_dir=loaded.step_dir)
            theirs = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=batch)
            for lm in (ours, theirs):  # untimed warm-up: first-call costs of either backend are not measured
                lm.loglikelihood(instances[: 2 * batch], disable_tqdm=True)
            # Short alternating slices (the order flipping each time), so that both backends see the same machine
            # load even when other jobs come and go; the figures are the totals over every slice and repeat.
            seconds = {"megalite": 0.0, "hf": 0.0}
            answers: dict[str, list] = {"megalite": [], "hf": []}
            slices = [instances[i: i + args.slice] for i in range(0, len(instances), args.slice)]
            for repeat in range(args.repeats):
                for k, part in enumerate(slices):
                    order = [("megalite", ours), ("hf", theirs)]
                    for name, lm in order if (repeat + k) % 2 == 0 else order[::-1]:
                        start = time.perf_counter()
                        out_part = lm.loglikelihood(part, disable_tqdm=True)
                        seconds[name] += time.perf_counter() - start
                        if repeat == 0:
                            answers[name] += out_part
            diff = max(abs(a[0] - b[0]) for a, b in zip(answers["megalite"], answers["hf"]))
            total = len(instances) * args.repeats
            row = {"family": family, "batch_size": batch, "requests": len(instances), "repeats": args.repeats,
                   "megalite_requests_per_s": total / seconds["megalite"], "hf_requests_per_s": total / seconds["hf"],
                   "seconds": seconds, "max_abs_loglikelihood_diff": diff}
            row["ratio_megalite_over_hf"] = row["megalite_requests_per_s"] / row["hf_requests_per_s"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "seconds"}), file=sys.stderr, flush=True)
    meta = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_start_end": [load_at_start, os.getloadavg()], "lm_eval": lm_eval.__version__,
            "command": " ".join(["megalite bench eval-harness", *(argv if argv is not None else sys.argv[1:])]),
            "model": "demo-cpu shape: 4 layers, hidden 256, 4 heads, vocab 8192, context 256 (llama: rope, "
                     "swiglu, rmsnorm, 2 KV heads, untied)", "questions": args.questions}
    path = write_json(out / "eval_harness.json", {"meta": meta, "rows": rows})
    print("| model | batch | requests | megalite req/s | HF backend req/s | megalite / HF | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['batch_size']} | {r['requests']} | {r['megalite_requests_per_s']:.1f} | "
              f"{r['hf_requests_per_s']:.1f} | {r['ratio_megalite_over_hf']:.2f} | {r['max_abs_loglikelihood_diff']:.1e} |")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
