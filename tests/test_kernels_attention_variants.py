"""The attention kernels' variants on the CPU (Triton's interpreter): the sm_90 TMA and warp-specialised bodies and
every tile autotuning can choose on a GPU, forced one at a time, against float64 (issue 24).

What the interpreter covers: each variant's arithmetic, addressing and masking, the tensor descriptors' zero padding
past each head's rows and past the head dim (the interpreter emulates descriptor loads with the copy engine's rules
and checks their 16-byte alignment), and the one masked loop the warp-specialised variant runs. What it cannot: the
copy engine itself, the warp partitions and their synchronisation, TF32 rounding, races (`make gpu-check` runs the
same checks on a GPU, tests/test_kernels_attention.py's GPU tests).
"""

from __future__ import annotations

import pytest
import torch

import megalite.kernels as K
from tests.test_kernels_attention import FIXED_SEED, RUN_SEED, check, qkv, random_documents, seed  # noqa: F401

KINDS = ("fwd", "dkdv", "dq")


def shipped_tiles(kind: str) -> list[tuple[int, int, bool, bool]]:
    """Every distinct (BLOCK_M, BLOCK_N, TMA, WS) the GPU configs of `kind` use, bf16/fp16 and fp32, sm_80 and
    sm_90, every head-dim bucket (warps and stages do not change what the interpreter computes)."""
    from megalite.kernels import flash_attention as fa

    tiles = {(m, n, False, False) for (k, _, _), shapes in fa.TILES.items() if k == kind for m, n, _, _ in shapes}
    tiles |= {(m, n, False, False) for (k, _), shapes in fa.TILES_FP32.items() if k == kind for m, n, _, _ in shapes}
    tiles |= {(m, n, True, ws) for (k, _), shapes in fa.TILES_TMA.items() if k == kind for m, n, _, _, ws in shapes}
    return sorted(tiles)


@pytest.fixture
def descriptor_loads(monkeypatch):
    """Counts the interpreter's tensor-descriptor loads, so a test can prove the TMA body ran."""
    from triton.runtime import interpreter

    calls = {"n": 0}
    original = interpreter.InterpreterBuilder.create_descriptor_load

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_load", counted)
    return calls


def force(monkeypatch, tiles: dict[str, tuple[int, int, bool, bool]]) -> None:
    """Make every later launch of kernel kind k use exactly tiles[k] (a fresh autotuner per kind)."""
    from megalite.kernels import flash_attention as fa

    def only(kind, *args, **kwargs):  # noqa: ANN001, ANN202
        m, n, tma, ws = tiles[kind]
        return [fa.config(m, n, 4, 1, tma, ws)]

    monkeypatch.setattr(fa, "autotune_configs", only)
    monkeypatch.setattr(fa, "_tuned", {})


@pytest.mark.parametrize("ws", [False, True], ids=["tma", "tma-ws"])
def test_tma_variants_match_float64(triton_backend, monkeypatch, descriptor_loads, ws):
    """The sm_90 variants' bodies: GQA, causal and not, Tq != Tk both ways (descriptor rows past a head's end read
    as zeros), a head dim below its power of two (columns past D read as zeros), packed documents (not offered
    with warp specialisation on a GPU, where it fails to compile, so checked without), fp32 and bf16."""
    for blocks in ((64, 32), (32, 64)):
        force(monkeypatch, {kind: (*blocks, True, ws) for kind in KINDS})
        seed("tma", ws, blocks)
        check(*qkv(1, 4, 2, 77, 77, 48), True)
        check(*qkv(1, 2, 1, 40, 70, 32), True)
        check(*qkv(1, 2, 1, 70, 40, 32), False)
        if not ws:
            check(*qkv(2, 4, 2, 77, 77, 32), True, document_ids=random_documents(2, 77))
            check(*qkv(1, 2, 2, 77, 77, 32), False, document_ids=random_documents(1, 77))
    seed("tma bf16", ws)
    check(*qkv(1, 2, 1, 64, 64, 64, dtype=torch.bfloat16), True)
    assert descriptor_loads["n"] > 0, "the TMA bodies did not run"
    assert K.kernel_calls().get("attention_bwd", 0) >= 1


def test_tma_variant_fixed_seed(triton_backend, monkeypatch, descriptor_loads):
    """The same inputs every run: the warp-specialised TMA body, odd length, grouped-query heads, causal."""
    force(monkeypatch, {kind: (64, 64, True, True) for kind in KINDS})
    seed("fixed tma", base=FIXED_SEED)
    check(*qkv(1, 4, 2, 129, 129, 48), True)
    assert descriptor_loads["n"] > 0


def test_every_shipped_tile_matches_float64(triton_backend, monkeypatch):
    """Every tile autotuning can pick on a GPU (every architecture, head-dim bucket and dtype class, pointer, TMA
    and warp-specialised), forced in turn: pass i runs the i-th distinct tile of each kernel kind on an odd-length
    causal GQA problem with a head dim below its power of two, and (pointer and plain TMA tiles) packed documents."""
    tiles = {kind: shipped_tiles(kind) for kind in KINDS}
    passes = max(len(t) for t in tiles.values())
    for i in range(passes):
        chosen = {kind: tiles[kind][i % len(tiles[kind])] for kind in KINDS}
        force(monkeypatch, chosen)
        seed("tiles", i)
        check(*qkv(1, 4, 2, 100, 100, 48), True)
        if not any(ws for *_, ws in chosen.values()):
            check(*qkv(1, 2, 1, 70, 70, 32), False, document_ids=random_documents(1, 70))


def test_tma_only_where_the_copy_engine_can_read(monkeypatch):
    """TMA configs are offered on sm_90 (not sm_80), for bf16/fp16 (not fp32), only for eligible tensors, and never
    warp-specialised with packed documents; eligibility: unit last stride, 16-byte aligned base and strides."""
    from megalite.kernels import flash_attention as fa

    monkeypatch.setattr(fa, "INTERPRET", False)  # the GPU's config lists (nothing is launched)
    monkeypatch.delenv("MEGALITE_AUTOTUNE", raising=False)  # every candidate, not only the first
    bf16 = torch.bfloat16

    def flags(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return [(c.kwargs["TMA"], c.kwargs["WS"]) for c in fa.autotune_configs(*args, **kwargs)]

    for kind in KINDS:
        assert not any(t for t, _ in flags(kind, 128, bf16, 90, tma=False))
        assert not any(t for t, _ in flags(kind, 128, bf16, 80, tma=True))
        assert not any(t for t, _ in flags(kind, 128, torch.float32, 90, tma=True))
        with_tma = flags(kind, 128, bf16, 90, tma=True)
        assert any(t for t, _ in with_tma) and any(ws for _, ws in with_tma), kind
        assert not any(ws for _, ws in flags(kind, 128, bf16, 90, docs=True, tma=True)), kind
        assert flags(kind, 128, bf16, 90, tma=True)[: len(fa.TILES[(kind, 128, 90)])] == [(False, False)] * len(
            fa.TILES[(kind, 128, 90)]
        ), "the pointer tiles stay first (MEGALITE_AUTOTUNE=0 keeps today's choice)"
    q = torch.zeros(2, 64, 4, 128, dtype=bf16).transpose(1, 2)  # the model's layout
    assert fa.tma_eligible(q, q.contiguous())
    assert not fa.tma_eligible(torch.zeros(2, 4, 64, 129, dtype=bf16)[..., :127])  # a row of 127 * 2 bytes
    assert not fa.tma_eligible(q[..., 1:])  # base 2 bytes past an aligned address
    assert not fa.tma_eligible(torch.zeros(2, 4, 64, 128, dtype=bf16).transpose(2, 3))  # head dim not innermost
