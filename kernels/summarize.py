#!/usr/bin/env python3
"""Issue 24's before/after table from one `make gpu-check` run (kernels/gpu_check.sh writes summary.md with it).

    python kernels/summarize.py RESULTS_DIR [--out summary.md]

RESULTS_DIR holds what the check wrote: results.json (the bf16 kernel benchmark), fp16/results.json, and
model/model-bench.json. The "before" column is the issue's table (one H200, Triton 3.6, torch 2.11, bf16, commit
dc05755 / 35c4f82, kernels/results/h200-2026-11-30*), unchanged; "after" is this run, with its device, commit and
versions in the heading. A figure the run did not measure says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BEFORE = [  # (row, megalite, best free alternative, ratio): the table, verbatim
    ("attention fwd+bwd, d128, causal, seq 4096", "273.7 TFLOP/s", "cuDNN SDPA 451.8", "0.61"),
    ("attention fwd+bwd, d128, non-causal, seq 16384", "358.6", "cuDNN SDPA 553.9", "0.65"),
    ("attention fwd+bwd, d64, causal, seq 8192", "244.8", "cuDNN SDPA 408.4", "0.60"),
    ("LayerNorm backward, width 4096", "1,265 GB/s = 30% of the measured 4.2 TB/s copy", "torch 934",
     "(1.36x torch, far from the limit)"),
    ("RMSNorm backward, widths 1024-16384", "23-33% of copy bandwidth", "torch 23-28%", ""),
    ("RMSNorm/LayerNorm forward", "44-72% of copy bandwidth", "torch 41-78%", "0.74-1.33"),
    ("gpt3-1.3b training step, 1 GPU", "MFU 38.4% (379 TFLOP/s)",
     "torch-kernel run failed on a preflight disk check, so no side-by-side figure", ""),
]
NOT_MEASURED = "not measured"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _row(rows: list[dict], op: str, impl: str, mode: str, /, **shape: Any) -> dict | None:
    for r in rows:
        if r["op"] == op and r["impl"] == impl and r.get("mode") == mode and r.get("ms") and r.get("mismatch") is None:
            if all(r["shape"].get(k) == v for k, v in shape.items()):
                return r
    return None


def _attention(rows: list[dict], d: int, causal: bool, seq: int) -> tuple[str, str, str]:
    ours = _row(rows, "attention", "megalite", "fwd+bwd", head_dim=d, causal=causal, seq=seq)
    cudnn = _row(rows, "attention", "sdpa-cudnn", "fwd+bwd", head_dim=d, causal=causal, seq=seq)
    if ours is None:
        return NOT_MEASURED, f"cuDNN SDPA {cudnn['tflops']:.1f}" if cudnn else NOT_MEASURED, ""
    if cudnn is None:
        return f"{ours['tflops']:.1f} TFLOP/s", "cuDNN SDPA " + NOT_MEASURED, ""
    return f"{ours['tflops']:.1f} TFLOP/s", f"cuDNN SDPA {cudnn['tflops']:.1f}", f"{ours['tflops'] / cudnn['tflops']:.2f}"


def _span(values: list[float], fmt: str = "{:.0%}") -> str:
    if not values:
        return NOT_MEASURED
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def _norm_fractions(rows: list[dict], ops: tuple[str, ...], impl: str, mode: str) -> list[float]:
    return [r["frac_peak"] for r in rows if r["op"] in ops and r["impl"] == impl and r.get("mode") == mode
            and r.get("gbps") and "frac_peak" in r and r.get("mismatch") is None]


def _norm_ratios(rows: list[dict], ops: tuple[str, ...], mode: str, other: str = "torch") -> list[float]:
    ratios = []
    for r in rows:
        if r["op"] in ops and r["impl"] == "megalite" and r.get("mode") == mode and r.get("ms"):
            them = _row(rows, r["op"], other, mode, width=r["shape"]["width"])
            if them:
                ratios.append(them["ms"] / r["ms"])
    return ratios


def after(bf16: dict | None, model: dict | None) -> list[tuple[str, str, str]]:
    """The "after" cells (megalite, alternative, ratio) of each BEFORE row."""
    rows = bf16["rows"] if bf16 else []
    out = [_attention(rows, 128, True, 4096), _attention(rows, 128, False, 16384), _attention(rows, 64, True, 8192)]
    ln = _row(rows, "layer_norm", "megalite", "bwd", width=4096)
    ln_torch = _row(rows, "layer_norm", "torch", "bwd", width=4096)
    if ln:
        copy = bf16["meta"]["peaks"]["copy_gbps"]
        ratio = f"{ln_torch['ms'] / ln['ms']:.2f}x torch" if ln_torch else ""
        out.append((f"{ln['gbps']:,.0f} GB/s = {ln['frac_peak']:.0%} of the measured {copy / 1000:.1f} TB/s copy",
                    f"torch {ln_torch['gbps']:,.0f}" if ln_torch else "torch " + NOT_MEASURED, ratio))
    else:
        out.append((NOT_MEASURED, NOT_MEASURED, ""))
    quack = _norm_fractions(rows, ("rms_norm",), "quack", "bwd")
    alt = f"torch {_span(_norm_fractions(rows, ('rms_norm',), 'torch', 'bwd'))}" + (
        f", QuACK {_span(quack)}" if quack else "")
    out.append((f"{_span(_norm_fractions(rows, ('rms_norm',), 'megalite', 'bwd'))} of copy bandwidth", alt,
                _span(_norm_ratios(rows, ("rms_norm",), "bwd"), "{:.2f}")))
    both = ("rms_norm", "layer_norm")
    out.append((f"{_span(_norm_fractions(rows, both, 'megalite', 'fwd'))} of copy bandwidth",
                f"torch {_span(_norm_fractions(rows, both, 'torch', 'fwd'))}", _span(_norm_ratios(rows, both, "fwd"),
                                                                                    "{:.2f}")))
    out.append(_model(model))
    return out


def _model(model: dict | None) -> tuple[str, str, str]:
    if not model:
        return NOT_MEASURED, NOT_MEASURED, ""
    runs = {(r.get("kernels"), r.get("fp8")): r for r in model["results"]}

    def fig(r: dict | None) -> str:
        if r is None:
            return NOT_MEASURED
        if "step_s" not in r:
            return f"failed: {r.get('error', '')[:60]}"
        mfu = f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "MFU n/a"
        return f"{mfu} ({r['tflops']:.0f} TFLOP/s)"

    ours, theirs, fp8 = runs.get(("triton", None)), runs.get(("torch", None)), runs.get(("triton", "tensorwise"))
    ratio = f"{theirs['step_s'] / ours['step_s']:.2f}x torch" if ours and theirs and "step_s" in ours and \
        "step_s" in theirs else ""
    return fig(ours) + (f"; FP8 {fig(fp8)}" if fp8 else ""), f"kernels: torch {fig(theirs)}", ratio


def goals(bf16: dict | None, fp16: dict | None) -> list[str]:
    """The issue's other goals, as measured: forward alone against cuDNN, packed documents against flex attention,
    fp16 against bf16, norms against the copy bandwidth."""
    rows = bf16["rows"] if bf16 else []
    lines = []
    for d in (128, 64):
        for mode in ("fwd", "fwd+bwd"):
            ratios = []
            for r in rows:
                if r["op"] == "attention" and r["impl"] == "megalite" and r.get("mode") == mode and \
                        r["shape"]["head_dim"] == d and r["shape"]["seq"] >= 2048 and r.get("ms"):
                    them = _row(rows, "attention", "sdpa-cudnn", mode, **r["shape"])
                    if them:
                        ratios.append(them["ms"] / r["ms"])
            lines.append(f"- attention {mode}, d{d}, seq >= 2k, megalite / cuDNN SDPA (goal >= 1.0): "
                         f"{_span(ratios, '{:.2f}')}")
    docs = [flex["ms"] / r["ms"] for r in rows if r["op"] == "attention_docs" and r["impl"] == "megalite" and r.get("ms")
            for flex in [_row(rows, "attention_docs", "flex-attention", r["mode"], **r["shape"])] if flex]
    lines.append(f"- packed documents, megalite / flex attention (goal >= 1.5): {_span(docs, '{:.2f}')}")
    if fp16:
        pairs = [(r, _row(rows, r["op"], "megalite", r["mode"], **r["shape"])) for r in fp16["rows"]
                 if r["impl"] == "megalite" and r.get("ms")]
        ratios = [b["ms"] / r["ms"] for r, b in pairs if b]
        lines.append(f"- megalite fp16 / bf16 speed, same shapes (goal >= 1.0): {_span(ratios, '{:.2f}')}")
    else:
        lines.append(f"- megalite fp16 / bf16 speed: {NOT_MEASURED}")
    for mode, goal in (("fwd", "85%"), ("bwd", "75%")):
        fracs = _norm_fractions(rows, ("rms_norm", "layer_norm"), "megalite", mode)
        lines.append(f"- norm {mode}, widths 1024-16384, fraction of copy bandwidth (goal >= {goal}): {_span(fracs)}")
    quack = _norm_ratios(rows, ("rms_norm",), "fwd+bwd", other="quack")
    lines.append(f"- RMSNorm fwd+bwd, megalite / QuACK (goal >= 1.0): {_span(quack, '{:.2f}')}")
    compiled = (bf16 or {}).get("compiled", [])
    spilling = [c for c in compiled if c.get("spills")]
    lines.append(f"- kernels this run compiled: {len(compiled)}, with spills (Triton's n_spills): {len(spilling)}")
    return lines


def summary(results: Path) -> str:
    bf16, fp16 = _load(results / "results.json"), _load(results / "fp16" / "results.json")
    model = _load(results / "model" / "model-bench.json")
    meta = (bf16 or {}).get("meta", {})
    where = (f"{meta.get('device', 'no device')}, commit `{meta.get('commit', '?')}`, torch {meta.get('torch', '?')}, "
             f"triton {meta.get('triton', '?')}, {meta.get('date', '?')}") if bf16 else "nothing measured"
    if meta.get("smoke"):
        where += " (smoke: CPU interpreter, toy sizes; no figure means anything)"
    lines = [f"# Issue 24: before and after ({where})", "",
             "| measured | before: megalite (H200) | before: best free alternative | before: ratio | "
             "after: megalite | after: alternative | after: ratio |", "|---|---|---|---|---|---|---|"]
    for (name, *was), now in zip(BEFORE, after(bf16, model)):
        lines.append(f"| {name} | " + " | ".join(was) + " | " + " | ".join(now) + " |")
    lines += ["", "Goals (issue 24):", *goals(bf16, fp16), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    text = summary(args.results)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
