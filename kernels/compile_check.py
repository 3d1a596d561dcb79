#!/usr/bin/env python3
"""Compile every Triton kernel for a GPU target without a GPU (catches what the interpreter hides).

The interpreter accepts code that the compiler rejects (dot shapes, dtype mixes, constexpr misuse) and
says nothing about shared memory. `triton.compile` for an explicit target needs no driver, so this runs
on the CPU machine:

    python kernels/compile_check.py [--dtype bf16|fp16|fp32] [--all-configs] [--arch 90]

Prints each kernel's compile time and shared memory; exits non-zero at the first failure. Takes minutes
on 2 cores (each config compiles in 2-10 s); not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megalite.kernels import flash_attention as fa  # noqa: E402
from megalite.kernels import fused_layer_norm as ln  # noqa: E402
from megalite.kernels import fused_rms_norm as rn  # noqa: E402


def compile_one(fn, target, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int) -> None:
    """Compile one specialisation; integer arguments not named in `types` are i32."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    t0 = time.time()
    kernel = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    print(
        f"ok {fn.__name__:24s} {constexprs} warps={num_warps} stages={num_stages} "
        f"{time.time() - t0:.1f}s shared={kernel.metadata.shared}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not only the first")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    ptr, fp32 = f"*{args.dtype}", args.dtype == "fp32"
    types = {n: ptr for n in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ", "X", "W", "B", "Y", "DY", "DX")}
    types.update({n: "*fp32" for n in ("LSE", "DELTA", "MEAN", "RSTD", "DW_PART", "DB_PART")})
    types.update(DOC_START="*i32", DOC_END="*i32")
    types.update(qk_scale="fp32", sm_scale="fp32", eps="fp32")
    kernels = {"fwd": fa._attn_fwd_kernel, "dkdv": fa._attn_bwd_dkdv_kernel, "dq": fa._attn_bwd_dq_kernel}
    for block_d in (64, 128, 256):
        for causal, docs in ((False, False), (True, False), (False, True), (True, True)):
            for kind, fn in kernels.items():
                configs = fa._configs(kind, block_d, fp32)
                for cfg in configs if args.all_configs else configs[:1]:
                    constexprs = dict(
                        CAUSAL=causal, UPCAST=False, PRECISION="ieee" if fp32 else "tf32", HAS_DOCS=docs,
                        BLOCK_D=block_d, **cfg.kwargs,
                    )
                    compile_one(fn, target, types, constexprs, cfg.num_warps, cfg.num_stages)
        compile_one(fa._attn_bwd_delta_kernel, target, types, dict(BLOCK_M=64, BLOCK_D=block_d), 4, 3)
    for width in (1000, 4096, 16384, 65536):
        block_m, block_n, warps = ln._blocks(width, None)
        for fn, extra in (
            (ln._layer_norm_fwd_kernel, {"HAS_BIAS": True}),
            (ln._layer_norm_bwd_kernel, {"HAS_BIAS": True}),
            (rn._rms_norm_fwd_kernel, {}),
            (rn._rms_norm_bwd_kernel, {}),
        ):
            compile_one(fn, target, types, dict(BLOCK_M=block_m, BLOCK_N=block_n, **extra), warps, 3)
    print("all kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
