#!/usr/bin/env python3
"""Side-by-side kernel benchmarks: megalite's Triton kernels against the alternatives, in one run.

Attention (fwd, bwd, fwd+bwd; causal and not; head dims 64 and 128; seq 512 to 16k at a constant
16k tokens per batch, hidden 2048) against every torch SDPA backend this machine has (flash,
memory-efficient, cuDNN, math) and flash-attn when installed. LayerNorm and RMSNorm against
F.layer_norm / F.rms_norm and NVIDIA apex when present. The machine's peaks are measured in the
same run (a large bf16 matmul, a device-to-device copy) and every figure is also given as a
fraction of them. Attention over packed documents (`attention_docs`, last) runs against torch's
FlexAttention with a document BlockMask (torchtitan's choice; the mask is built per call, as per batch
in training) and SDPA with a dense boolean mask; FLOPs count only the visible query-key pairs.

    megalite bench [kernels] [--out DIR] [--smoke] [--ops attention,layer_norm,rms_norm]
    python kernels/bench.py [same options]

Writes DIR/results.json (with the git commit and device name), DIR/results.md and DIR/results.png.
`--smoke` runs tiny sizes (on the CPU through Triton's interpreter) to prove the harness works.
Heavy imports happen inside functions so that `megalite --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from megalite.bench import git_commit, run_info
from megalite.bench.kernels_report import (
    OPS,
    OURS,
    add_ratios,
    autotune_events,
    compiled_kernel_resources,
    write_markdown,
    write_plot,
)

MODES = ("fwd", "bwd", "fwd+bwd")
# An output whose largest difference from megalite's exceeds this fraction of megalite's largest value is wrong
# (the attention and norm tests bound megalite's own error against float64; bf16 rounding is 2^-8 = 0.4 %).
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by `kernels/bench.py` and `megalite bench`)."""
    parser.add_argument("--out", default="out/bench", help="results folder (default: out/bench)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on the CPU via TRITON_INTERPRET=1")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--seqs", default=None, help="attention sequence lengths (default 512..16384)")
    parser.add_argument("--head-dims", default=None, help="attention head dims (default 64,128)")
    parser.add_argument("--widths", default=None, help="norm widths (default 1024..16384)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--tokens", type=int, default=None, help="batch*seq for attention, rows for norms")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds; stop starting new measurements after this"
    )
    parser.add_argument("--table", default=None, help="also write this device's measured table (the fastest correct "
                        "implementation per op and shape) into DIR/<device>.json, merged with the one there")


# --- timing --------------------------------------------------------------------------------------


def _time_ms(fn, device, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_peaks(device, smoke: bool) -> dict[str, float]:
    """The machine's bf16 matmul TFLOP/s and device copy GB/s, measured now."""
    import torch

    n = 512 if smoke else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _time_ms(lambda: a @ b, device, reps=2 if smoke else 20)
    src = torch.empty((16 if smoke else 2048) * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms_copy = _time_ms(lambda: dst.copy_(src), device, reps=2 if smoke else 30)
    return {
        "matmul_tflops": 2 * n**3 / ms / 1e9,
        "matmul_shape": n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "copy_gbps": 2 * src.numel() / ms_copy / 1e6,  # read + write
        "copy_bytes": src.numel(),
    }


# --- implementations -----------------------------------------------------------------------------


def attention_impls(device, smoke: bool) -> dict[str, Any]:
    """name -> fn(q, k, v, causal) for every attention implementation this machine has."""
    import torch.nn.functional as F

    from megalite.kernels import flash_attention

    impls: dict[str, Any] = {OURS: lambda q, k, v, causal: flash_attention.attention(q, k, v, causal)}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch too old for sdpa_kernel: plain SDPA only
        impls["sdpa"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return impls
    backends = {"sdpa-math": SDPBackend.MATH}
    if device.type == "cuda":
        backends = {
            "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            **backends,
        }

    def sdpa(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    for name, backend in backends.items():
        impls[name] = sdpa(backend)
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_func

            # flash-attn wants (B, T, H, D); the transposes are views.
            impls["flash-attn"] = lambda q, k, v, causal: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
            ).transpose(1, 2)
        except ImportError:
            pass
    return impls


def doc_attention_impls(device) -> dict[str, Any]:
    """name -> fn(q, k, v, causal, document_ids) for attention over packed documents."""
    import megalite.kernels as K
    from megalite.kernels import flash_attention

    impls: dict[str, Any] = {
        OURS: lambda q, k, v, causal, docs: flash_attention.attention(q, k, v, causal, document_ids=docs),
        "sdpa-dense-mask": lambda q, k, v, causal, docs: K.attention_torch(q, k, v, causal, document_ids=docs),
    }
    if device.type == "cuda":
        try:
            import torch
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            compiled = torch.compile(flex_attention, dynamic=False)

            def flex(q, k, v, causal, docs):
                def same_document(b, h, q_idx, kv_idx):
                    visible = docs[b, q_idx] == docs[b, kv_idx]
                    return visible & (q_idx >= kv_idx) if causal else visible

                t = q.shape[2]
                mask = create_block_mask(same_document, q.shape[0], None, t, t, device=q.device)
                return compiled(q, k, v, block_mask=mask)

            impls["flex-attention"] = flex
        except ImportError:
            pass
    return impls


def document_lengths(t: int, smoke: bool) -> list[int]:
    """A fixed packing of one row: documents of 1/16 to 1/2 of the row (seeded), the last one cut to fit."""
    import random

    rng = random.Random(t)
    lengths: list[int] = []
    while sum(lengths) < t:
        lengths.append(rng.randint(max(1, t // 16), max(1, t // 2)) if not smoke else rng.randint(1, t))
    lengths[-1] -= sum(lengths) - t
    return lengths


def norm_impls(op: str, device) -> dict[str, Any]:
    """name -> fn(x, w, b) for every LayerNorm/RMSNorm implementation this machine has."""
    import torch.nn.functional as F

    from megalite.kernels import fused_layer_norm, fused_rms_norm

    if op == "layer_norm":
        impls = {
            OURS: lambda x, w, b: fused_layer_norm.layer_norm(x, w, b, 1e-5),
            "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
        }
    else:
        impls = {
            OURS: lambda x, w, b: fused_rms_norm.rms_norm(x, w, 1e-6),
            "torch": lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
        }
    if device.type == "cuda":
        try:
            from apex.normalization import fused_layer_norm as apex_ln

            if op == "layer_norm":
                impls["apex"] = lambda x, w, b: apex_ln.fused_layer_norm_affine(x, w, b, (x.shape[-1],), 1e-5)
            else:
                impls["apex"] = lambda x, w, b: apex_ln.fused_rms_norm_affine(x, w, (x.shape[-1],), 1e-6)
        except ImportError:
            pass
        if op == "rms_norm" and os.environ.get("MEGALITE_BENCH_NO_QUACK") != "1":  # gpu_check.sh's probe failed
            try:  # QuACK's RMSNorm (CuTe DSL); torch >= 2.13 routes F.rms_norm to it itself (see torch_rms_norm)
                import quack

                impls["quack"] = lambda x, w, b: quack.rmsnorm(x, w, eps=1e-6)
            except Exception:  # noqa: BLE001 - missing, or its CUTLASS DSL libraries fail to load: not measured
                pass
    return impls


def torch_rms_norm() -> str:
    """What F.rms_norm runs on this machine's GPU: "quack" where torch routes it to QuACK's CuTe DSL kernel (torch
    >= 2.13 on sm_90/sm_100 with nvidia-cutlass-dsl and apache-tvm-ffi installed), else "aten"."""
    try:
        from torch._native import cutedsl_utils

        return "quack" if cutedsl_utils.runtime_available() else "aten"
    except Exception:  # noqa: BLE001 - torch < 2.13 has no torch._native
        return "aten"


def mismatch(out, reference, dtype_name: str) -> float | None:
    """The largest difference of `out` from megalite's output relative to its largest value, when above the
    dtype's TOLERANCE (the implementation computed something else), else None."""
    out = out[0] if isinstance(out, tuple) else out
    if reference is None or out is None:
        return None
    diff = (out.float() - reference.float()).abs().max().item()
    scale = max(reference.float().abs().max().item(), 1e-6)
    if diff != diff:  # NaN
        return float("inf")
    return diff / scale if diff / scale > TOLERANCE[dtype_name] else None


# --- one measurement -----------------------------------------------------------------------------


def _modes_timed(make_out, inputs, device, reps: int, modes: list[str]) -> dict[str, float]:
    """Milliseconds for each mode of the differentiable function make_out()."""
    import torch

    result = {}
    if "fwd" in modes:
        with torch.no_grad():
            result["fwd"] = _time_ms(make_out, device, reps)
    if "bwd" in modes or "fwd+bwd" in modes:
        for t in inputs:
            t.requires_grad_(True)
        out = make_out()
        grad = torch.randn_like(out)
        if "bwd" in modes:
            result["bwd"] = _time_ms(lambda: out.backward(grad, retain_graph=True), device, reps)
        del out
        if "fwd+bwd" in modes:
            result["fwd+bwd"] = _time_ms(lambda: make_out().backward(grad), device, reps)
        for t in inputs:
            t.requires_grad_(False)
            t.grad = None
    return result


def _time_attention(op: str, name: str, run, qkv, shape: dict, fwd_flops: float, device, reps: int, args,
                    record, reference: dict) -> None:
    """Time one attention implementation in every mode; TFLOP/s with the backward at 2.5x the forward. Its output
    is first compared with megalite's (`reference["out"]`, set when megalite runs, first)."""
    import torch

    try:
        with torch.no_grad():
            out = run()
        if name == OURS:
            reference["out"] = out
        wrong = mismatch(out, reference.get("out"), args.dtype_name) if name != OURS else None
        del out
        ms = _modes_timed(run, qkv, device, reps, args.modes_list)
    except Exception as e:  # noqa: BLE001 - an unsupported backend is a result, not a crash
        record(op, name, shape, None, error=f"{type(e).__name__}: {str(e)[:200]}")
        return
    for mode, value in ms.items():
        flops = fwd_flops * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
        record(op, name, shape, mode, ms=value, tflops=flops / value / 1e9,
               **({"mismatch": wrong} if wrong is not None else {}))


def bench_attention(args, device, dtype, record) -> None:
    """Every (head dim, seq, causal) case for every implementation."""
    import torch

    smoke = args.smoke
    seqs = _ints(args.seqs) or ([40] if smoke else [512, 1024, 2048, 4096, 8192, 16384])
    head_dims = _ints(args.head_dims) or ([32] if smoke else [128, 64])  # 128 first: the target, if time runs out
    tokens = args.tokens or (64 if smoke else 16384)
    reps = args.reps or (1 if smoke else 10)
    impls = attention_impls(device, smoke)
    for d in head_dims:
        heads = 2 if smoke else 2048 // d
        for t in seqs:
            batch = max(1, tokens // t)
            for causal in (False, True):
                q, k, v = (torch.randn(batch, heads, t, d, device=device, dtype=dtype) for _ in range(3))
                fwd_flops = 4 * batch * heads * t * t * d / (2 if causal else 1)
                shape = {"batch": batch, "heads": heads, "seq": t, "head_dim": d, "causal": causal}
                reference: dict = {}
                for name, fn in impls.items():
                    if name == "sdpa-math" and device.type == "cuda" and t > 4096:
                        continue  # materialises batch*heads*t*t scores: minutes and tens of GB
                    if _out_of_time(args):
                        return
                    run = lambda fn=fn, q=q, k=k, v=v, c=causal: fn(q, k, v, c)
                    _time_attention("attention", name, run, [q, k, v], shape, fwd_flops, device, reps, args, record,
                                    reference)
                q = k = v = reference = None  # free before the next shape
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def bench_attention_docs(args, device, dtype, record) -> None:
    """Packed documents at head dim 128 (smoke: 32), causal and not, for every implementation."""
    import torch

    smoke = args.smoke
    seqs = _ints(args.seqs) or ([40] if smoke else [4096, 16384])
    d = (_ints(args.head_dims) or [32 if smoke else 128])[0]
    tokens = args.tokens or (64 if smoke else 16384)
    reps = args.reps or (1 if smoke else 10)
    impls = doc_attention_impls(device)
    heads = 2 if smoke else 2048 // d
    for t in seqs:
        batch = max(1, tokens // t)
        lengths = document_lengths(t, smoke)
        row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        docs = row.expand(batch, t).contiguous().to(device)
        for causal in (True, False):
            q, k, v = (torch.randn(batch, heads, t, d, device=device, dtype=dtype) for _ in range(3))
            pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)  # visible (query, key) pairs
            fwd_flops = 4 * batch * heads * pairs * d
            shape = {"batch": batch, "heads": heads, "seq": t, "head_dim": d, "causal": causal, "documents": len(lengths)}
            reference: dict = {}
            for name, fn in impls.items():
                if _out_of_time(args):
                    return
                run = lambda fn=fn, q=q, k=k, v=v, c=causal, docs=docs: fn(q, k, v, c, docs)
                _time_attention("attention_docs", name, run, [q, k, v], shape, fwd_flops, device, reps, args, record,
                                reference)
            q = k = v = reference = None
            if device.type == "cuda":
                torch.cuda.empty_cache()


def bench_norm(op: str, args, device, dtype, record) -> None:
    """Every width for every implementation; bytes: each input read once, each output written once."""
    import torch

    smoke = args.smoke
    widths = _ints(args.widths) or ([1000] if smoke else [1024, 2048, 4096, 8192, 16384])
    tokens = args.tokens or (16 if smoke else 32768)
    reps = args.reps or (1 if smoke else 20)
    impls = norm_impls(op, device)
    es = torch.empty((), dtype=dtype).element_size()
    for n in widths:
        rows = max(1, tokens * 4096 // n) if not smoke else tokens
        x = torch.randn(rows, n, device=device, dtype=dtype)
        w = torch.randn(n, device=device, dtype=dtype)
        b = torch.randn(n, device=device, dtype=dtype) if op == "layer_norm" else None
        params = 2 if op == "layer_norm" else 1
        stats = rows * 4 * (2 if op == "layer_norm" else 1)  # fp32 mean/rstd saved for the backward
        moved = {
            "fwd": 2 * rows * n * es + params * n * es + stats,  # x in, y out, weights in, stats out
            "bwd": 3 * rows * n * es + 2 * params * n * es + stats,  # x, dy in, dx out, weights in, grads out
        }
        moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]
        shape = {"rows": rows, "width": n}
        reference = None
        for name, fn in impls.items():
            if _out_of_time(args):
                return
            inputs = [t for t in (x, w, b) if t is not None]
            try:
                run = lambda fn=fn, x=x, w=w, b=b: fn(x, w, b)
                with torch.no_grad():
                    out = run()
                reference = out if name == OURS else reference
                wrong = mismatch(out, reference, args.dtype_name) if name != OURS else None
                del out
                ms = _modes_timed(run, inputs, device, reps, args.modes_list)
            except Exception as e:  # noqa: BLE001
                record(op, name, shape, None, error=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            for mode, value in ms.items():
                record(op, name, shape, mode, ms=value, gbps=moved[mode] / value / 1e6,
                       **({"mismatch": wrong} if wrong is not None else {}))


# --- reporting -----------------------------------------------------------------------------------


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _ints(text: str | None) -> list[int]:
    return [int(s) for s in text.split(",") if s] if text else []


def _out_of_time(args) -> bool:
    return args._deadline is not None and time.monotonic() > args._deadline


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and write results.json, results.md and results.png under args.out."""
    ops = [o for o in args.ops.split(",") if o]
    modes = [m for m in args.modes.split(",") if m]
    bad = [o for o in ops if o not in OPS] + [m for m in modes if m not in MODES]
    if bad:
        print(f"bench: unknown op/mode {bad}; ops: {', '.join(OPS)}; modes: {', '.join(MODES)}", file=sys.stderr)
        return 2
    args.modes_list = modes
    args._t0 = time.monotonic()
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(device)
    elif args.smoke:
        from megalite.kernels import _common

        if not _common.interpreting():
            if "triton" in sys.modules:  # too late: triton.jit has already chosen compiled kernels
                print("bench --smoke on a CPU needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
                return 2
            os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules import triton
        device = torch.device("cpu")
        device_name = "cpu (Triton interpreter)"
    else:
        print("bench: no CUDA device; use --smoke to exercise the harness on the CPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.smoke and device.type == "cpu":
        dtype = torch.float32  # fp32 keeps the interpreter fast and exact
    args.dtype_name = str(dtype).replace("torch.", "")
    import triton

    torch.manual_seed(0)
    peaks = measure_peaks(device, args.smoke)
    rows: list[dict] = []
    events: list[dict] = []  # every autotuning of megalite's kernels, with each candidate's time
    seen: list = []

    def record(op, impl, shape, mode, **values):
        rows.append({"op": op, "impl": impl, "shape": shape, "mode": mode, **values})
        if impl == OURS:
            events.extend(autotune_events(seen))
        if mode is not None:
            value = values.get("tflops", values.get("gbps"))
            unit = "TFLOP/s" if "tflops" in values else "GB/s"
            print(f"{op:10s} {impl:15s} {mode:7s} {shape} {values['ms']:.3f} ms {value:.1f} {unit}", flush=True)
        else:
            print(f"{op:10s} {impl:15s} {shape} skipped: {values.get('error')}", flush=True)

    # With a time budget, attention gets 3/4 of it and the norms share the rest (they are quick).
    order = [o for o in OPS if o in ops]
    interrupted = False
    # A time limit's SIGINT/SIGTERM ends the run but keeps the results (SIGINT may arrive ignored when
    # started in the background, so install the handler explicitly).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        for i, op in enumerate(order):
            rest = len(order) - i - 1
            share = 1.0 if rest == 0 else 0.75 if op == "attention" else 1.0 / (rest + 1)
            args._deadline = None
            if args.time_budget is not None:
                left = args.time_budget - (time.monotonic() - args._t0)
                args._deadline = time.monotonic() + left * share
            if op == "attention":
                bench_attention(args, device, dtype, record)
            elif op == "attention_docs":
                bench_attention_docs(args, device, dtype, record)
            else:
                bench_norm(op, args, device, dtype, record)
    except KeyboardInterrupt:  # SIGINT from a time limit: keep and write what was measured
        interrupted = True
        print("bench: interrupted; writing the results so far", file=sys.stderr)
    add_ratios(rows, peaks)
    resources = compiled_kernel_resources() if device.type == "cuda" else []
    for r in resources:
        print("compiled", json.dumps(r), flush=True)
    meta = {
        "commit": git_commit(),
        "machine": run_info()["machine"],
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype_name,
        "torch_rms_norm": torch_rms_norm() if device.type == "cuda" else "aten",
        "smoke": bool(args.smoke),
        "interrupted": interrupted,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.monotonic() - args._t0, 1),
        "peaks": peaks,
        "flop_convention": "attention fwd 4*B*H*T^2*D, halved when causal (attention_docs: 4*B*H*D per visible "
                           "query-key pair); bwd 2.5x fwd; fwd+bwd 3.5x",
        "byte_convention": "norms: each input read once, each output (incl. fp32 stats) written once",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows, "compiled": resources, "autotune": events}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    write_markdown(out / "results.md", meta, rows, events)
    write_plot(out / "results.png", meta, rows)
    print(f"bench: wrote {out}/results.json, results.md, results.png in {meta['seconds']} s")
    if args.table:
        from megalite.kernels import measured

        table = measured.build(rows, meta)
        path = measured.write(table, Path(args.table))
        print(f"bench: measured table ({len(table.entries)} shapes) merged into {path}")
        for line in table.describe():
            print(f"bench:   {line}")
    return 1 if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    """`megalite bench kernels [options]`."""
    parser = argparse.ArgumentParser(prog="megalite bench kernels", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
