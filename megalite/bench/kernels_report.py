"""The kernel benchmark's reports: speedups and peak fractions, the markdown tables and the plot, the resources of
the kernels the run compiled, and every autotune candidate's time (megalite/bench/kernels.py runs the measurements).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

OURS = "megalite"
OPS = ("attention", "layer_norm", "rms_norm", "attention_docs")
TUNED = ("flash_attention", "fused_layer_norm", "fused_rms_norm")  # modules whose `_tuned` holds their autotuners


def _key(row: dict) -> tuple:
    return (row["op"], json.dumps(row["shape"], sort_keys=True), row["mode"])


def _constexpr_blocks(compiled, spec) -> dict[str, int]:
    """BLOCK_* constexpr values of one compiled kernel (from its source record, else from its cache key)."""
    src = getattr(compiled, "src", None)
    consts = getattr(src, "constants", None) or getattr(src, "constexprs", None) or {}
    names = getattr(getattr(src, "fn", None), "arg_names", [])
    blocks = {}
    for k, v in dict(consts).items():
        index = k[0] if isinstance(k, tuple) else k
        name = names[index] if isinstance(index, int) and index < len(names) else str(index)
        if name.startswith("BLOCK_"):
            blocks[name] = int(v)
    return blocks or {k: int(v) for k, v in re.findall(r"(BLOCK_[A-Z]+)\W{1,6}(\d+)", str(spec))}


def compiled_kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every Triton kernel this process compiled (empty under the
    interpreter). Read from Triton's per-device kernel caches; best effort, since that layout is internal."""
    import importlib

    rows = []
    for module_name in ("_attention_kernels", "fused_layer_norm", "fused_rms_norm"):
        module = importlib.import_module(f"megalite.kernels.{module_name}")
        for name, fn in vars(module).items():
            caches = getattr(fn, "device_caches", None)
            if not name.endswith("_kernel") or not caches:
                continue
            for entry in list(caches.values()):
                kernel_cache = entry[0] if isinstance(entry, tuple) else entry
                for spec, compiled in list(kernel_cache.items()):
                    try:
                        if getattr(compiled, "n_regs", None) is None:
                            compiled._init_handles()
                        md = compiled.metadata
                        blocks = _constexpr_blocks(compiled, spec)
                        rows.append({
                            "kernel": name, "blocks": blocks,
                            "num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared,
                            "registers": compiled.n_regs, "spills": compiled.n_spills,
                        })
                    except Exception as e:  # noqa: BLE001 - a report, never a crash
                        rows.append({"kernel": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
    return rows


def add_ratios(rows: list[dict], peaks: dict[str, float]) -> None:
    """Ratio of ours to each alternative (time_alt / time_ours: >1 means ours is faster) and peak fractions."""
    ours = {_key(r): r for r in rows if r["impl"] == OURS and r.get("ms")}
    for r in rows:
        if r.get("tflops") is not None:
            r["frac_peak"] = r["tflops"] / peaks["matmul_tflops"]
        if r.get("gbps") is not None:
            r["frac_peak"] = r["gbps"] / peaks["copy_gbps"]
        mine = ours.get(_key(r))
        if mine is not None and r["impl"] != OURS and r.get("ms"):
            r["ours_speedup"] = r["ms"] / mine["ms"]


def write_markdown(path: Path, meta: dict, rows: list[dict], events: list[dict] | None = None) -> None:
    """One table per op: each implementation's throughput (fraction of peak) and ours vs it; then every autotune
    candidate's time (`events`, from `autotune_events`)."""
    lines = [
        f"# Kernel benchmark: {meta['device']}",
        "",
        f"commit `{meta['commit']}`, torch {meta['torch']}, triton {meta['triton']}, dtype {meta['dtype']}, "
        f"{meta['date']}{' (smoke: tiny sizes, CPU interpreter; timings meaningless)' if meta['smoke'] else ''}",
        "",
        f"Measured peaks: matmul {meta['peaks']['matmul_tflops']:.1f} TFLOP/s "
        f"({meta['peaks']['matmul_dtype']} {meta['peaks']['matmul_shape']}^3), "
        f"copy {meta['peaks']['copy_gbps']:.1f} GB/s.",
        "",
        "Cells: throughput (fraction of the measured peak) [ours / this: speedup of megalite, >1 = ours faster]; "
        "**wrong** marks an output that disagreed with megalite's (excluded from the measured table).",
        "",
    ]
    for op in OPS:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        impls = list(dict.fromkeys(r["impl"] for r in op_rows))
        unit = "TFLOP/s" if op.startswith("attention") else "GB/s"
        lines += [f"## {op} ({unit})", ""]
        lines.append("| shape | mode | " + " | ".join(impls) + " |")
        lines.append("|---|---|" + "---|" * len(impls))
        cases = list(dict.fromkeys((json.dumps(r["shape"], sort_keys=True), r["mode"]) for r in op_rows if r["mode"]))
        for shape_json, mode in cases:
            shape = json.loads(shape_json)
            label = ", ".join(f"{k}={v}" for k, v in shape.items())
            cells = []
            for impl in impls:
                same = [r for r in op_rows if r["impl"] == impl and r["shape"] == shape]
                r = next((r for r in same if r["mode"] == mode), None)
                if r is None:
                    cells.append("n/a" if any(x.get("error") for x in same) else "-")
                    continue
                value = r.get("tflops", r.get("gbps"))
                cell = f"{value:.4g} ({r['frac_peak']:.1%})"
                if "ours_speedup" in r:
                    cell += f" [{r['ours_speedup']:.2f}x]"
                if r.get("mismatch") is not None:
                    cell += f" **wrong** ({r['mismatch']:.2g})"
                cells.append(cell)
            lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
        errors = sorted({f"{r['impl']}: {r['error']}" for r in op_rows if r.get("error")})
        if errors:
            lines += ["", "Not run (n/a):", *[f"- {e}" for e in errors]]
        lines.append("")
    lines += autotune_markdown(events or [])
    path.write_text("\n".join(lines))


def write_plot(path: Path, meta: dict, rows: list[dict]) -> None:
    """Attention fwd+bwd TFLOP/s against seq (one panel per head dim and causality) and norm GB/s against width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = [r for r in rows if r["op"] == "attention" and r["mode"] == "fwd+bwd" and r.get("tflops")]
    panels = sorted({(r["shape"]["head_dim"], r["shape"]["causal"]) for r in att})
    norms = [r for r in rows if r["op"] in ("layer_norm", "rms_norm") and r["mode"] == "fwd+bwd" and r.get("gbps")]
    norm_ops = sorted({r["op"] for r in norms})
    n = max(1, len(panels) + len(norm_ops))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False)
    axes = axes[0]
    for ax, (d, causal) in zip(axes, panels):
        for impl in dict.fromkeys(r["impl"] for r in att):
            pts = sorted(
                (r["shape"]["seq"], r["tflops"])
                for r in att
                if r["impl"] == impl and r["shape"]["head_dim"] == d and r["shape"]["causal"] == causal
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.axhline(meta["peaks"]["matmul_tflops"], color="grey", linestyle=":", label="matmul peak")
        ax.set_xscale("log", base=2)
        ax.set_title(f"attention fwd+bwd d={d}{' causal' if causal else ''}")
        ax.set_xlabel("seq")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    for ax, op in zip(axes[len(panels) :], norm_ops):
        for impl in dict.fromkeys(r["impl"] for r in norms if r["op"] == op):
            pts = sorted((r["shape"]["width"], r["gbps"]) for r in norms if r["op"] == op and r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.axhline(meta["peaks"]["copy_gbps"], color="grey", linestyle=":", label="copy peak")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} fwd+bwd")
        ax.set_xlabel("width")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device']} {meta['dtype']} @ {meta['commit'][:12]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




def autotune_events(seen: list) -> list[dict[str, Any]]:
    """Every autotuning megalite's kernels did since the last call (`seen`: the timing dicts already reported): the
    kernel, its tuning key, each candidate's median time (ms; inf: it failed to compile or run) and the best. So one
    benchmark run yields the whole tuning table of this GPU."""
    import importlib

    events = []
    for module_name in TUNED:
        module = importlib.import_module(f"megalite.kernels.{module_name}")
        for tuner in list(module._tuned.values()):
            timings = getattr(tuner, "configs_timings", None)
            if not timings or any(t is timings for t in seen):
                continue
            seen.append(timings)
            best = min(timings, key=lambda c: _median(timings[c]))
            events.append({
                "kernel": tuner.base_fn.__name__, "key": repr(list(tuner.cache)[-1]) if tuner.cache else None,
                "bench_s": round(getattr(tuner, "bench_time", 0.0) or 0.0, 3), "best": _config(best),
                "candidates": [{**_config(c), "ms": _median(t)} for c, t in timings.items()],
            })
    return events


def _median(timing: Any) -> float:
    return float(timing[0] if isinstance(timing, (list, tuple)) else timing)


def _config(config: Any) -> dict[str, Any]:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def autotune_markdown(events: list[dict[str, Any]]) -> list[str]:
    """A section of results.md: per tuning, the candidates fastest first (ms) and the chosen one."""
    if not events:
        return []
    lines = ["## Autotune candidates (ms, fastest first; the first is what autotuning chose)", ""]
    for e in events:
        ranked = sorted(e["candidates"], key=lambda c: c["ms"])
        cells = "; ".join(f"{_label(c)}: {c['ms']:.3f}" for c in ranked)
        lines.append(f"- `{e['kernel']}` {e['key']}: {cells}")
    return lines + [""]


def _label(c: dict[str, Any]) -> str:
    flags = [k.lower() for k in ("TMA", "WS", "PREFETCH", "SPLIT") if c.get(k)]
    size = f"{c['BLOCK_M']}x{c['BLOCK_N']}" if "BLOCK_M" in c else f"{c.get('ROWS')}x{c.get('BLOCK_N')}"
    extra = f" {c['PER_SM']}/SM" if c.get("PER_SM") else ""
    return f"{size}/{c['num_warps']}w/{c['num_stages']}s{extra}" + ("+" + "+".join(flags) if flags else "")
