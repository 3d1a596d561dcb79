"""The compiled kernels do not spill registers and use the instructions their variants claim, on sm_80 and sm_90,
proven without a GPU (issues 20 and 24).

`kernels/compile_check.py` records the launchers' real launches (a contiguous launch: unit last-dim strides,
16-byte aligned pointers and strides, as the model's tensors are), compiles every kernel and autotune config for
both architectures with the venv's Triton and reads the cubins with the `cuobjdump` the Triton wheel ships.

Two proofs:
- A compile here (the `report` fixture): bf16 at head dims 64 and 128 and the norm widths 1024-16384 on sm_80 and
  sm_90, every attention tile (pointer, TMA, warp-specialised) once per architecture with its variants (causal or
  not, packed documents or not) taken in turn, and every norm candidate once (116 compiles); and fp32 (the
  `fp32` fixture), which must compile.
- The committed full reports (`kernels/results/resources/issue24-triton{3.9,3.6}.json`, the venv's Triton and the
  GPU machines'): every shipped tile with every variant, bf16 and fp16, both architectures. A report must carry
  the fingerprint of today's kernels (`resources.fingerprint()`: the `@triton.jit` sources, tile tables and
  launchers), so it cannot describe other kernels than these; regenerate with the command in REGENERATE.

Each checks: no stack, local memory or LDL/STL; every attention kernel multiplies on the tensor cores (HGMMA only on
sm_90, HMMA on sm_80); every TMA tile loads through the copy engine (UTMALDG); every warp-specialised tile is
specialised (USETMAXREG, the register hand-over between its producer and consumer warps: without it Triton
compiled the loop unspecialised); every shipped tile was compiled.

Cost with a cold Triton cache (TRITON_CACHE_DIR, default ~/.triton/cache), measured on the shared 2-core machine
(2026-12-06): the bf16 compile (116 kernels in 2 processes) about 100 s of CPU, 102 s wall; the fp32 check 54 s of
CPU (171 s wall, the machine loaded by others); before issue 24 about 110 s of CPU for both. With a warm cache the
whole file takes about 12 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIMS = (64, 128)
WIDTHS = (1024, 4096, 8192, 16384)
ARCHS = (80, 90)
VARIANTS = {"full", "causal", "full docs", "causal docs"}
REPORTS = {"3.9": ROOT / "kernels/results/resources/issue24-triton3.9.json",
           "3.6": ROOT / "kernels/results/resources/issue24-triton3.6.json"}
REGENERATE = ("python kernels/compile_check.py --dtype bf16,fp16 --head-dims 64,128 --widths 1024,2048,4096,8192,16384 "
              "--json kernels/results/resources/issue24-triton3.9.json (and with PYTHONPATH=DIR after "
              "`pip install --target DIR --no-deps triton==3.6.0` for issue24-triton3.6.json)")


def compile_report(tmp_path_factory, name: str, *args: str) -> dict:
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp(name) / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(ROOT / "kernels" / "compile_check.py"), "--arch", ",".join(map(str, ARCHS)), *args,
           "--sample", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode in (0, 1), f"compile_check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return compile_report(tmp_path_factory, "resources", "--dtype", "bf16", "--head-dims", ",".join(map(str, HEAD_DIMS)),
                          "--widths", ",".join(map(str, WIDTHS)))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> dict:
    """fp32 at head dim 128 and one norm width: every tile compiles for both architectures (issue 14; fp32's IEEE dots
    take large register tiles, so it is only required to compile). fp16 is in the committed full reports."""
    return compile_report(tmp_path_factory, "resources-fp32", "--dtype", "fp32", "--head-dims", "128", "--widths",
                          "4096")


def name(r: dict) -> str:
    from megalite.kernels.resources import tile_label

    return f"{r['arch']} {r['kernel']} {r['dtype']} {r['size']} {r['variant']} {tile_label(r)}"


def problems(rows: list[dict], dtypes: tuple[str, ...] = ("bf16", "fp16")) -> list[str]:
    """Every violation among the rows of the given dtypes at the tested head dims and widths."""
    found = []
    for r in rows:
        if r["dtype"] not in dtypes or r["size"] not in (*HEAD_DIMS, *WIDTHS):
            continue
        if not r["spill_free"]:
            found.append(f"{name(r)}: {r['registers']} registers, stack {r['stack']} B, LDL {r['ldl']}, STL {r['stl']}")
        if r["kernel"] in ("attn fwd", "attn dk/dv", "attn dq"):
            if r["arch"] == "sm_90" and not (r["hgmma"] > 0 and r["hmma"] == 0):
                found.append(f"{name(r)}: HGMMA {r['hgmma']}, HMMA {r['hmma']}")
            if r["arch"] == "sm_80" and not r["hmma"] > 0:
                found.append(f"{name(r)}: no HMMA")
            if r.get("TMA") and not r["utmaldg"] > 0:
                found.append(f"{name(r)}: a TMA tile without UTMALDG")
            if r.get("WS") and not r["usetmaxreg"] > 0:
                found.append(f"{name(r)}: a warp-specialised tile compiled unspecialised (no USETMAXREG)")
            if not r.get("TMA") and r["utmaldg"] > 0:
                found.append(f"{name(r)}: a pointer tile with UTMALDG")
    return found


def shipped(kind: str, d: int, arch: int, docs: bool) -> set[tuple]:
    """(BLOCK_M, BLOCK_N, warps, stages, TMA, WS) of every bf16/fp16 config autotuning offers for TMA-eligible
    tensors (the launcher's and the tests' layouts are)."""
    import torch

    from megalite.kernels import flash_attention as fa

    saved, fa.INTERPRET = fa.INTERPRET, False  # the GPU's lists (the test process may run the interpreter)
    try:
        configs = fa.autotune_configs(kind, d, torch.bfloat16, arch, docs, tma=True)
    finally:
        fa.INTERPRET = saved
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["TMA"], c.kwargs["WS"])
            for c in configs}


KINDS = {"fwd": "attn fwd", "dkdv": "attn dk/dv", "dq": "attn dq"}


def compiled(rows: list[dict], dtype: str) -> set[tuple]:
    return {(r["arch"], r["kernel"], r["size"], r["variant"], r.get("BLOCK_M"), r.get("BLOCK_N"), r["num_warps"],
             r["num_stages"], bool(r.get("TMA")), bool(r.get("WS"))) for r in rows if r["dtype"] == dtype}


def missing_configs(rows: list[dict], dtype: str, every_variant: bool) -> list[str]:
    """Shipped attention configs the rows lack: each with every variant it is offered for (every_variant), or with
    at least one of them."""
    seen = compiled(rows, dtype)
    missing = []
    for arch in ARCHS:
        for d in HEAD_DIMS:
            for kind, kernel in KINDS.items():
                for variant in sorted(VARIANTS):
                    for tile in shipped(kind, d, arch, docs="docs" in variant):
                        offered = [v for v in VARIANTS if tile in shipped(kind, d, arch, "docs" in v)]
                        wanted = [variant] if every_variant else offered
                        if not any((f"sm_{arch}", kernel, d, v, *tile) in seen for v in wanted):
                            missing.append(f"sm_{arch} {kernel} d={d} {variant if every_variant else ''} {tile}")
    return sorted(set(missing))


def test_no_kernel_spills_and_instructions_match_the_variants(report):
    found = problems(report["rows"])
    assert not found, f"{len(found)} problems (triton {report['triton']}):\n" + "\n".join(found)


def test_every_shipped_tile_compiled(report):
    """The sample covers every autotune tile (TILES, TILES_TMA) on both architectures, every attention variant, every
    norm candidate at some width and every norm kernel at every width."""
    from megalite.kernels import _common

    assert not missing_configs(report["rows"], "bf16", every_variant=False)
    for kernel in KINDS.values():
        variants = {r["variant"] for r in report["rows"] if r["kernel"] == kernel}
        assert variants == VARIANTS, (kernel, variants)
    for width in WIDTHS:
        kernels = {r["kernel"] for r in report["rows"] if r["size"] == width}
        assert kernels == {"layernorm fwd", "layernorm bwd", "rmsnorm fwd", "rmsnorm bwd"}, (width, kernels)
    for arch in ARCHS:
        for kernel in ("layernorm fwd", "layernorm bwd", "rmsnorm fwd", "rmsnorm bwd"):
            got = {(r["ROWS"], r["BLOCK_N"], r["num_warps"], r["PER_SM"], r["PREFETCH"], r["SPLIT"])
                   for r in report["rows"] if r["kernel"] == kernel and r["arch"] == f"sm_{arch}"}
            for width in WIDTHS:
                first = _common.norm_configs(width, False, kernel.endswith("bwd"))[0]
                assert (first.rows, first.block_n, first.num_warps, first.per_sm, first.prefetch, first.split) in got


def test_fp32_compiles_for_both_architectures(fp32):
    for arch in ARCHS:
        kernels = {r["kernel"] for r in fp32["rows"] if r["arch"] == f"sm_{arch}"}
        assert {"attn fwd", "attn dk/dv", "attn dq", "layernorm bwd", "rmsnorm bwd"} <= kernels, (arch, kernels)


@pytest.mark.parametrize("version", sorted(REPORTS))
def test_committed_full_report_is_current_and_clean(version):
    """Every shipped attention tile with every variant it is offered for (bf16 and fp16, head dims 64 and 128), every
    norm candidate at widths 1024-16384, sm_80 and sm_90, compiled by Triton `version`: no spill, the instructions
    each variant claims, and the fingerprint of today's kernels."""
    from megalite.kernels import _common, resources

    path = REPORTS[version]
    data = json.loads(path.read_text())
    assert data["triton"] == f"{version}.0", data["triton"]
    assert data["fingerprint"] == resources.fingerprint(), (
        f"{path.name} was compiled from other kernels (fingerprint {data['fingerprint']}, today's "
        f"{resources.fingerprint()}): regenerate it with {REGENERATE}")
    found = problems(data["rows"])
    assert not found, f"{len(found)} problems in {path.name}:\n" + "\n".join(found)
    for dtype in ("bf16", "fp16"):
        missing = missing_configs(data["rows"], dtype, every_variant=True)
        assert not missing, f"{path.name} lacks {dtype}:\n" + "\n".join(missing)
        for width in WIDTHS:
            for kernel in ("layernorm fwd", "layernorm bwd", "rmsnorm fwd", "rmsnorm bwd"):
                got = {(r["ROWS"], r["BLOCK_N"], r["num_warps"], r["PER_SM"], r["PREFETCH"], r["SPLIT"], r["arch"])
                       for r in data["rows"] if r["kernel"] == kernel and r["size"] == width and r["dtype"] == dtype}
                for c in _common.norm_configs(width, False, kernel.endswith("bwd")):
                    for arch in ARCHS:
                        key = (c.rows, c.block_n, c.num_warps, c.per_sm, c.prefetch, c.split, f"sm_{arch}")
                        assert key in got, (path.name, dtype, kernel, width, key)
