"""The Mixture-of-Experts layer against a dense MLP of the same active parameters, and grouped against looped experts.

    megalite bench moe [--tokens N] [--hidden H] [--experts E] [--top-k K] [--ffn F] [--dtype D] [--reps R]
                       [--smoke] [--out out/bench-moe]

Times one forward and backward (the input's and every weight's gradient) of, side by side, on this machine's device:
- `moe grouped`: megalite's MoE block (megalite.model.moe: softmax top-k router, dropless, SwiGLU experts) with its
  experts in one grouped matrix multiply per projection (`torch._grouped_mm`; on a GPU in bf16, compute capability
  9.0 or newer; on the CPU in bf16 and fp32);
- `moe loop`: the same block, one matmul per expert;
- `dense`: a SwiGLU MLP of top_k x F units, the parameters one token uses in the MoE block's experts (the router's
  E x H more are the MoE block's own).
The router is set so that every expert gets the same number of tokens (the input and the router weights are drawn
from a seed; the loads are printed), so the experts do the work of the dense MLP. Reported per row: median
milliseconds of `--reps` runs after warm-up, the matmul FLOPs (forward and backward: 3 x 2 x tokens x the weights a
token multiplies) and TFLOP/s, and the ratios: MoE / dense and loop / grouped. The grouped and looped blocks' outputs,
input gradients and a slice of the experts' weight gradient are compared (largest difference, reported). Defaults: a Mixtral-8x7B layer (H 4096, F 14336, 8
experts, top-2) at 8192 tokens in bf16 on a GPU; H 512, F 1024, 8 experts, top-2, 2048 tokens in fp32 on the CPU.
Writes DIR/moe-bench.json and DIR/moe-bench.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from megalite.bench import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=None, help="tokens per call (default 8192 on a GPU, 2048 CPU)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 4096 GPU, 512 CPU)")
    parser.add_argument("--experts", type=int, default=8, help="routed experts (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--ffn", type=int, default=None, help="each expert's FFN width (default 14336 GPU, 1024 CPU)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 GPU, 3 CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, two repetitions: proves the harness")
    parser.add_argument("--out", default="out/bench-moe", help="results folder (default out/bench-moe)")


def shapes(args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    """The measured sizes: the options, else the smoke, GPU or CPU defaults."""
    if args.smoke:
        default = {"tokens": 96, "hidden": 32, "ffn": 16, "dtype": "float32", "reps": 2}
    elif gpu:
        default = {"tokens": 8192, "hidden": 4096, "ffn": 14336, "dtype": "bfloat16", "reps": 10}
    else:
        default = {"tokens": 2048, "hidden": 512, "ffn": 1024, "dtype": "float32", "reps": 3}
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in default.items()}
    return {**chosen, "experts": args.experts, "top_k": args.top_k}


def matmul_flops(tokens: int, hidden: int, ffn: int, experts: int, top_k: int) -> dict[str, float]:
    """Forward + backward matmul FLOPs (3 x 2 x tokens x weights multiplied) of the MoE block and the dense MLP."""
    expert = 3 * hidden * ffn  # SwiGLU: gate and up (H -> F each), down (F -> H)
    return {"moe": 6.0 * tokens * (experts * hidden + top_k * expert), "dense": 6.0 * tokens * top_k * expert}


def _time_ms(fn: Any, device: Any, reps: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def balanced_router(weight: Any, experts: int, top_k: int, generator: Any) -> None:
    """Router weights that give every expert the same load on the benchmark's input: the input's first `experts`
    features are one-hot blocks (set by `balanced_input`), and expert e scores highest on the tokens of blocks
    e, e-1, ..., e-k+1, so each token's top-k are k consecutive experts."""
    import torch

    with torch.no_grad():
        weight.normal_(0.0, 1e-3, generator=generator)
        for e in range(experts):
            for j in range(top_k):
                weight[(e + j) % experts, e] += float(top_k + 1 - j)  # block e's tokens: experts e, e+1, ... in order


def balanced_input(tokens: int, hidden: int, experts: int, dtype: Any, device: Any, generator: Any) -> Any:
    """(1, tokens, hidden) inputs whose first `experts` features say which block a token is in (round robin)."""
    import torch

    x = torch.randn(1, tokens, hidden, generator=generator) * 0.1
    x[0, :, :experts] = 0.0
    x[0, torch.arange(tokens), torch.arange(tokens) % experts] = 1.0
    return x.to(device=device, dtype=dtype)


def measure(s: dict[str, Any], device: Any) -> dict[str, Any]:
    """Every row on `device` at sizes `s`, and the grouped-vs-loop difference."""
    import torch

    from megalite.config import ModelConfig, MoEConfig
    from megalite.kernels import grouped_mm, grouped_mm_runs
    from megalite.model.moe import MoE
    from megalite.model.transformer import MLP
    from megalite.model.weights import initialize_parameters

    dtype = getattr(torch, s["dtype"])
    n, h, f, e, k = s["tokens"], s["hidden"], s["ffn"], s["experts"], s["top_k"]
    cfg = ModelConfig(vocab_size=128, hidden_size=h, num_layers=1, num_heads=1, mlp="swiglu", bias=False,
                      ffn_hidden_size=k * f, moe=MoEConfig(num_experts=e, top_k=k, ffn_hidden_size=f))
    gen = torch.Generator().manual_seed(0)
    x = balanced_input(n, h, e, dtype, device, gen)
    dy = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    flops = matmul_flops(n, h, f, e, k)

    def block(backend: str) -> Any:
        layer = MoE(cfg, device=device, dtype=dtype, matmul=lambda a, w, c, b=backend: grouped_mm(a, w, c, backend=b))
        initialize_parameters(layer, 1, None)
        router = torch.empty(layer.router.weight.shape)
        balanced_router(router, e, k, torch.Generator().manual_seed(1))
        with torch.no_grad():
            layer.router.weight.copy_(router)
        layer.aux_loss_scale = 0.0
        return layer.train()

    def step(module: Any) -> Any:
        xi = x.detach().requires_grad_()
        y = module(xi)
        y.backward(dy)
        return y, xi.grad

    rows: list[dict[str, Any]] = []
    outputs: dict[str, Any] = {}
    grouped_ok = grouped_mm_runs(x.reshape(n, h), torch.empty(e, h, 2 * f, device=device, dtype=dtype))
    loads = None
    for name, backend in (("moe grouped", "grouped"), ("moe loop", "loop")):
        if backend == "grouped" and not grouped_ok:
            rows.append({"name": name, "skipped": f"torch._grouped_mm does not run {s['dtype']} on this device"})
            continue
        layer = block(backend)
        y, dx = step(layer)
        loads = layer.take_statistics()["tokens_per_expert"].tolist()
        outputs[name] = (y.detach().float(), dx.float(), layer.experts.w_in.grad[:, :64].float())  # a slice of the weights'
        del y, dx
        ms = _time_ms(lambda m=layer: step(m), device, s["reps"])
        rows.append({"name": name, "ms": ms, "flops": flops["moe"], "tflops": flops["moe"] / ms / 1e9})
    dense = MLP(cfg, None, False, device, dtype)
    initialize_parameters(dense, 1, None)
    dense.train()
    ms = _time_ms(lambda: step(dense), device, s["reps"])
    rows.append({"name": "dense", "ms": ms, "flops": flops["dense"], "tflops": flops["dense"] / ms / 1e9})
    times = {r["name"]: r["ms"] for r in rows if "ms" in r}
    ratios = {"moe grouped / dense": times["moe grouped"] / times["dense"] if "moe grouped" in times else None,
              "moe loop / dense": times["moe loop"] / times["dense"],
              "loop / grouped": times["moe loop"] / times["moe grouped"] if "moe grouped" in times else None}
    difference = None
    if len(outputs) == 2:
        difference = max(float((a - b).abs().max()) for a, b in zip(*outputs.values()))
    return {"rows": rows, "ratios": ratios, "tokens_per_expert": loads, "grouped_vs_loop_max_diff": difference}


def markdown(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"MoE layer (H {s['hidden']}, {s['experts']} experts of F {s['ffn']}, top-{s['top_k']}, dropless) "
             f"against a dense SwiGLU MLP of top_k x F = {s['top_k'] * s['ffn']} units: {s['tokens']} tokens, "
             f"{s['dtype']}, forward + backward, {result['device']}", "",
             "| layer | ms | matmul TFLOP/s | time vs dense |", "|---|---|---|---|"]
    dense = next(r["ms"] for r in result["rows"] if r["name"] == "dense")
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | - | - | {r['skipped']} |")
        else:
            lines.append(f"| {r['name']} | {r['ms']:.2f} | {r['tflops']:.3f} | {r['ms'] / dense:.2f}x |")
    ratio = result["ratios"]["loop / grouped"]
    lines += ["", f"loop / grouped: {ratio:.2f}x" if ratio is not None else "loop / grouped: grouped not available",
              f"tokens per expert: {result['tokens_per_expert']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`megalite bench moe [options]`."""
    parser = argparse.ArgumentParser(prog="megalite bench moe", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    s = shapes(args, gpu)
    result = {"shape": s, "device": torch.cuda.get_device_name() if gpu else "cpu", **measure(s, device)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "moe-bench.json", result)
    (out / "moe-bench.md").write_text(markdown(result))
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
