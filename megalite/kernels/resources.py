"""What the shipped Triton kernels cost in registers, local memory and shared memory, without a GPU.

Triton compiles for an explicit target without a driver, and its wheel ships `cuobjdump`. This module
runs the real host launchers on small CPU tensors with launches recorded instead of run
(`_common.recording_launches`), so it sees exactly the kernels, constexprs, autotune configs and argument
specialisations (pointer alignment, unit strides) a GPU run would compile; it then compiles each one for
sm_80 / sm_90 and reads the cubin: registers and stack bytes per thread, local memory, dynamic shared
memory, and the counts of HGMMA (Hopper warpgroup MMA), HMMA (Ampere MMA) and LDL/STL (local memory
loads/stores, i.e. spills) in the SASS. A kernel is spill-free when it has no stack, no local memory
and no LDL/STL.

Used by `kernels/compile_check.py` (table and JSON) and `tests/test_kernels_resources.py` (CI gate).
Must run without TRITON_INTERPRET (the kernel modules fix the interpreter choice at import).
Compiled kernels land in Triton's own cache (TRITON_CACHE_DIR, default ~/.triton/cache), keyed by
source, dependencies, options and Triton version, so a second run recompiles only what changed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import create_function_from_signature

from megalite.dtypes import torch_dtype
from megalite.kernels import _attention_kernels as ak
from megalite.kernels import _common
from megalite.kernels import flash_attention as fa
from megalite.kernels import fused_layer_norm as ln
from megalite.kernels import fused_rms_norm as rn

DTYPES = {name: torch_dtype(name) for name in ("bf16", "fp16", "fp32")}
KIND = {
    "_attn_fwd_kernel": "attn fwd",
    "_attn_bwd_delta_kernel": "attn delta",
    "_attn_bwd_dkdv_kernel": "attn dk/dv",
    "_attn_bwd_dq_kernel": "attn dq",
    "_layer_norm_fwd_kernel": "layernorm fwd",
    "_layer_norm_bwd_kernel": "layernorm bwd",
    "_rms_norm_fwd_kernel": "rmsnorm fwd",
    "_rms_norm_bwd_kernel": "rmsnorm bwd",
}
# Tensor-core MMA (Hopper warpgroup, Ampere), local memory loads/stores (spills), TMA tile loads, and the register
# reallocation of warp-specialised kernels (their producer warps give registers to the consumers).
SASS_OPS = ("HGMMA", "HMMA", "LDL", "STL", "UTMALDG", "USETMAXREG")
VARIANT_FLAGS = ("TMA", "WS")  # constexprs of the attention kernels' variants, reported with the tile
NORM_FLAGS = ("ROWS", "PER_SM", "PREFETCH", "SPLIT")  # constexprs of the norm kernels' candidates


@dataclass(frozen=True)
class Case:
    """One call of a public op on tensors of this shape; its launches are what gets compiled."""

    op: str  # "attention", "layer_norm" or "rms_norm"
    dtype: str
    size: int  # head dim (attention) or row width (norms)
    causal: bool = False
    docs: bool = False

    @property
    def variant(self) -> str:
        if self.op != "attention":
            return ""
        return ("causal" if self.causal else "full") + (" docs" if self.docs else "")


@dataclass
class Job:
    """One compilation: a kernel specialised as its launcher would specialise it, for one architecture."""

    case: Case
    module: str
    name: str
    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: dict[str, Any]
    arch: int
    config: dict[str, int] = field(default_factory=dict)

    def key(self) -> str:
        return repr((self.arch, self.module, self.name, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), self.options["num_warps"], self.options["num_stages"]))


def attention_cases(dtypes: Iterable[str], head_dims: Iterable[int]) -> list[Case]:
    """Every attention variant: dtype x head dim x causal or not x packed documents or not."""
    return [
        Case("attention", dt, d, causal, docs)
        for dt, d, causal, docs in itertools.product(dtypes, head_dims, (False, True), (False, True))
    ]


def norm_cases(dtypes: Iterable[str], widths: Iterable[int]) -> list[Case]:
    return [Case(op, dt, n) for op, dt, n in itertools.product(("layer_norm", "rms_norm"), dtypes, widths)]


def _record(case: Case, arch: int) -> list[_common.Launch]:
    """The launches of one forward and backward of `case` on a GPU of compute capability `arch`, made on
    small CPU tensors, nothing run."""
    dtype = DTYPES[case.dtype]
    with _common.recording_launches(arch) as launches:
        if case.op == "attention":
            b, h, kvh, t, d = 2, 4, 2, 256, case.size
            # The model's layout: (B, T, H, D) storage seen as (B, H, T, D).
            q = torch.zeros(b, t, h, d, dtype=dtype).transpose(1, 2)
            k = torch.zeros(b, t, kvh, d, dtype=dtype).transpose(1, 2)
            v = torch.zeros(b, t, kvh, d, dtype=dtype).transpose(1, 2)
            docs = None
            if case.docs:
                ids = torch.arange(t).div(100, rounding_mode="floor").expand(b, t)
                docs = _common.document_bounds(ids)
            o, lse = fa.attention_fwd(q, k, v, case.causal, d**-0.5, docs)
            fa.attention_bwd(torch.zeros_like(o), q, k, v, o, lse, case.causal, d**-0.5, docs)
        else:
            x = torch.zeros(64, case.size, dtype=dtype)
            w = torch.zeros(case.size, dtype=dtype)
            if case.op == "layer_norm":
                y, mean, rstd = ln.layer_norm_fwd(x, w, w, 1e-5)
                ln.layer_norm_bwd(y, x, w, True, mean, rstd)
            else:
                y, rstd = rn.rms_norm_fwd(x, w, 1e-6)
                rn.rms_norm_bwd(y, x, w, rstd)
    return launches


def _generic(fn: Any, signature: dict, constexprs: dict, attrs: dict) -> tuple[dict, dict, dict]:
    """The same kernel without argument specialisation (no alignment, no unit strides): what a launch with
    odd strides or offsets compiles."""
    signature = dict(signature)
    declared = {p.name for p in fn.params if p.is_constexpr}
    for i, name in enumerate(fn.arg_names):
        if signature[name] == "constexpr" and name not in declared:
            signature[name] = "i32"
            constexprs = {k: v for k, v in constexprs.items() if k != (i,)}
    return signature, constexprs, {}


def jobs_for(case: Case, archs: Iterable[int], generic: bool = False) -> list[Job]:
    """The compilations `case` needs on each architecture: one per launch and autotune config."""
    jobs = []
    for arch in archs:
        for launch in _record(case, arch):
            jobs += _launch_jobs(case, arch, launch, generic)
    return jobs


def _launch_jobs(case: Case, arch: int, launch: _common.Launch, generic: bool) -> list[Job]:
    """One job per autotune config of a recorded launch, specialised by Triton's own launch-time rules."""
    autotuned = isinstance(launch.kernel, Autotuner)
    configs = launch.kernel.configs if autotuned else [None]
    fn = launch.kernel.fn if autotuned else launch.kernel
    jobs = []
    for config in configs:
        kwargs = dict(launch.kwargs)
        if config is not None:
            kwargs.update(config.all_kwargs())
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        if generic:
            signature, constexprs, attrs = _generic(fn, signature, constexprs, attrs)
        blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k in VARIANT_FLAGS}
        blocks.update(config.kwargs if config is not None else {})  # the candidate's own constexprs (norms: ROWS...)
        jobs.append(Job(
            case, fn.fn.__module__, fn.fn.__name__, signature, constexprs, attrs, dict(options.__dict__), arch,
            {**blocks, "num_warps": options.num_warps, "num_stages": options.num_stages},
        ))  # fmt: skip
    return jobs


def cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}: this Triton wheel does not ship it")
    return path


def analyse_cubin(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local bytes per thread and the SASS counts of SASS_OPS, from cuobjdump; kept in
    Triton's cache under the cubin's hash (disassembly takes about 0.5 s a kernel)."""
    key = hashlib.sha256(cubin + f"megalite-resources-2 triton-{triton.__version__}".encode()).hexdigest()
    cache = get_cache_manager(key)
    cached = cache.get_file("resources.json")
    if cached is not None:
        with open(cached) as f:
            return json.load(f)
    out = _disassemble(cubin)
    cache.put(json.dumps(out), "resources.json", binary=False)
    return out


def _disassemble(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage.stdout))
    out = {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}
    opcodes = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, flags=re.M)
    for op in SASS_OPS:
        out[op.lower()] = sum(1 for o in opcodes if o == op)
    return out


def compile_job(job: Job) -> dict[str, Any]:
    """Compile one job (in a worker process) and measure its resources."""
    fn = getattr(importlib.import_module(job.module), job.name)
    t0 = time.perf_counter()
    src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    seconds = time.perf_counter() - t0
    row = {
        "arch": f"sm_{job.arch}", "kernel": KIND.get(job.name, job.name), "function": job.name,
        "dtype": job.case.dtype, "size": job.case.size, "variant": job.case.variant, **job.config,
        **analyse_cubin(kernel.asm["cubin"]), "shared": kernel.metadata.shared, "compile_s": round(seconds, 2),
    }
    row["spill_free"] = row["stack"] == 0 and row["local"] == 0 and row["ldl"] == 0 and row["stl"] == 0
    return row


def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def run_jobs(jobs: list[Job], workers: int | None = None) -> list[dict[str, Any]]:
    """Compile every distinct job (in parallel processes) and return one row per job, in order."""
    unique: dict[str, Job] = {}
    for job in jobs:
        unique.setdefault(job.key(), job)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        results = {k: compile_job(j) for k, j in unique.items()}
    else:
        ctx = multiprocessing.get_context("spawn")  # torch is imported here; never fork it
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures = {k: pool.submit(compile_job, j) for k, j in unique.items()}
            results = {k: f.result() for k, f in futures.items()}
    rows = []
    for job in jobs:
        row = dict(results[job.key()])
        row.update(dtype=job.case.dtype, size=job.case.size, variant=job.case.variant)
        rows.append(row)
    return rows


def sample_variants(jobs: list[Job]) -> list[Job]:
    """For a quick check: each attention (architecture, kernel, dtype, size, tile) once, taking its variants (causal
    or not, documents or not) in turn, so every variant and every tile is compiled, not every pair; of the norms,
    each width's first candidate and each other candidate once, at the widths in turn (see `_sample_norms`)."""
    groups: dict[tuple, list[Job]] = {}
    norms = []
    for job in jobs:
        if job.case.op != "attention":
            norms.append(job)
            continue
        groups.setdefault((job.arch, job.name, job.case.dtype, job.case.size, repr(job.config)), []).append(job)
    turn: dict[tuple, int] = {}
    chosen = []
    for key, group in groups.items():
        kernel = key[:2]  # (arch, name): rotate through the variants across its tiles and sizes
        turn[kernel] = turn.get(kernel, -1) + 1
        chosen.append(group[turn[kernel] % len(group)])
    return chosen + _sample_norms(norms)


def _sample_norms(jobs: list[Job]) -> list[Job]:
    """Per (architecture, kernel, dtype): candidate 0 at every width, candidate i > 0 once, at the i-th width that
    has one (the candidates are `_common.norm_configs`, in order, per width)."""
    by_kernel: dict[tuple, dict[int, list[Job]]] = {}
    for job in jobs:
        widths = by_kernel.setdefault((job.arch, job.name, job.case.dtype), {})
        same = widths.setdefault(job.case.size, [])
        if all(j.config != job.config for j in same):
            same.append(job)
    chosen = []
    for widths in by_kernel.values():
        order = sorted(widths)
        chosen += [widths[w][0] for w in order]
        for i in range(1, max(len(c) for c in widths.values())):
            having = [w for w in order if len(widths[w]) > i]
            chosen.append(widths[having[(i - 1) % len(having)]][i])
    return chosen


def fingerprint() -> str:
    """A hash of everything that decides what the resource report compiles: every `@triton.jit` function's source
    in the kernel modules, the tile tables, and the launchers and config functions that specialise the launches.
    A committed report whose fingerprint differs is out of date."""
    parts = []
    for module in (fa, ak, ln, rn):
        for name, value in sorted(vars(module).items()):
            fn = getattr(value, "fn", None)  # a JITFunction, or the interpreter's InterpretedFunction, wraps it
            if inspect.isfunction(fn) and getattr(fn, "__module__", None) == module.__name__:
                parts.append(f"{module.__name__}.{name}\n{inspect.getsource(fn)}")
    for table in ("TILES", "TILES_WITHOUT_DOCS", "TILES_FP32", "TILES_TMA"):
        parts.append(f"{table}={sorted(getattr(fa, table).items())!r}")
    functions = (fa.autotune_configs, fa.config, fa.tma_eligible, fa._kernel, fa.attention_fwd, fa.attention_bwd,
                 ln.layer_norm_fwd, ln.layer_norm_bwd, rn.rms_norm_fwd, rn.rms_norm_bwd, _common.norm_configs,
                 _common.norm_autotuner, _common.norm_grid, _common.NormConfig, _record)
    parts += [inspect.getsource(f) for f in functions]
    parts.append(f"{_common.NORM_SPLIT_WIDTH} {_common.MAX_NORM_WIDTH}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    return {"triton": triton.__version__, "torch": torch.__version__}


def tile_label(r: dict[str, Any]) -> str:
    """A row's tile: attention "M x N, warps, stages" (+ TMA, WS), norms "rows x width, warps" (+ persistent
    programs per SM, prefetch, split)."""
    if "ROWS" in r:
        flags = [f"{r['PER_SM']}/SM" if r.get("PER_SM") else "", "prefetch" if r.get("PREFETCH") else "",
                 "split" if r.get("SPLIT") else ""]
        return ", ".join([f"{r['ROWS']} x {r['BLOCK_N']}, {r['num_warps']}w", *[f for f in flags if f]])
    tile = f"{r.get('BLOCK_M', '')} x {r.get('BLOCK_N', '')}, {r['num_warps']}, {r['num_stages']}".replace(" x ,", ",")
    flags = [name for name in VARIANT_FLAGS if r.get(name)]
    return tile + (" " + "+".join(flags) if flags else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table row per compilation."""
    head = "| arch | kernel | dtype | head dim / width | variant | tile | registers | stack B | " \
           "shared KB | HGMMA | HMMA | LDL | STL | UTMALDG | USETMAXREG |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mark = "" if r["spill_free"] else " **spills**"
        lines.append(
            f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['size']} | {r['variant']} | {tile_label(r)} | "
            f"{r['registers']} | {r['stack']}{mark} | {r['shared'] / 1024:.0f} | {r['hgmma']} | {r['hmma']} | "
            f"{r['ldl']} | {r['stl']} | {r['utmaldg']} | {r['usetmaxreg']} |"
        )
    return "\n".join(lines)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """One row per (architecture, kernel, dtype, size, tile): the worst of its attention variants (most
    registers, stack, LDL/STL; fewest tensor-core instructions)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["kernel"], r["dtype"], r["size"], tile_label(r)), []).append(r)
    head = "| arch | kernel | dtype | head dim / width | tile | variants | registers | " \
           "stack B | LDL / STL | HGMMA / HMMA | UTMALDG / USETMAXREG |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (arch, kernel, dtype, size, tile), group in groups.items():
        stack = max(r["stack"] for r in group)
        mma = f"{min(r['hgmma'] for r in group)} / {min(r['hmma'] for r in group)}"
        tma = f"{min(r['utmaldg'] for r in group)} / {min(r['usetmaxreg'] for r in group)}"
        lines.append(
            f"| {arch} | {kernel} | {dtype} | {size} | {tile} | {len(group)} | {max(r['registers'] for r in group)} | "
            f"{'**' + str(stack) + '**' if stack else 0} | {max(r['ldl'] for r in group)} / "
            f"{max(r['stl'] for r in group)} | {mma} | {tma} |"
        )
    return "\n".join(lines)


__all__ = ["Case", "Job", "analyse_cubin", "attention_cases", "compile_job", "fingerprint", "jobs_for", "markdown",
           "norm_cases", "run_jobs", "sample_variants", "summary_markdown", "tile_label", "versions"]
