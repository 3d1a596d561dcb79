"""`kernels: auto` follows a device's measured table (issue 24), checked on the CPU with synthetic tables: which
calls a table covers, the winner it names for each, the table the benchmark builds from its rows, the one
announcement, and the routing of a chosen SDPA backend."""

from __future__ import annotations

import json

import pytest
import torch

import megalite.kernels as K
from megalite.kernels import measured


def row(op: str, impl: str, ms: float, mode: str = "fwd+bwd", **shape) -> dict:
    return {"op": op, "impl": impl, "mode": mode, "ms": ms, "shape": shape}


def attention(seq: int, impl: str, ms: float, causal: bool = True, head_dim: int = 128, **extra) -> dict:
    return {**row("attention", impl, ms, batch=1, heads=16, seq=seq, head_dim=head_dim, causal=causal), **extra}


META = {"device": "NVIDIA Test GPU", "dtype": "bfloat16", "commit": "abc123", "date": "2026-12-06", "torch": "2.11.0",
        "triton": "3.6.0"}
ROWS = [
    # seq 2048: cuDNN fastest; seq 4096: megalite; seq 8192: cuDNN, but its output was wrong, so flash wins
    attention(2048, "megalite", 2.0), attention(2048, "sdpa-cudnn", 1.0), attention(2048, "sdpa-flash", 1.5),
    attention(4096, "megalite", 3.0), attention(4096, "sdpa-cudnn", 3.5),
    attention(8192, "megalite", 9.0), attention(8192, "sdpa-cudnn", 5.0, mismatch=0.5),
    attention(8192, "sdpa-flash", 8.0), attention(8192, "sdpa-math", 1.0),  # math: never chosen (not selectable)
    attention(2048, "megalite", 1.0, causal=False), attention(2048, "sdpa-cudnn", 0.9, causal=False),
    {**attention(2048, "sdpa-cudnn", 0.1), "mode": "bwd"},  # bwd alone is no call's mode: ignored
    row("rms_norm", "megalite", 1.0, rows=4, width=1024), row("rms_norm", "torch", 0.5, rows=4, width=1024),
    row("rms_norm", "megalite", 1.0, rows=4, width=4096), row("rms_norm", "torch", 2.0, rows=4, width=4096),
    row("rms_norm", "megalite", 1.0, mode="fwd", rows=4, width=1024), row("rms_norm", "torch", 3.0, mode="fwd", rows=4,
                                                                          width=1024),
    {**row("rms_norm", "flex", 0.01, rows=4, width=1024)},  # not an implementation auto can run
    {**row("layer_norm", "torch", 0.5, rows=4, width=2048)},  # megalite not measured: no entry
    {"op": "layer_norm", "impl": "megalite", "mode": None, "shape": {"rows": 4, "width": 2048}, "error": "x"},
]


def test_build_picks_the_fastest_correct_selectable_implementation():
    table = measured.build(ROWS, META)
    winners = {(e.op, e.mode, e.klass, e.size): e.winner for e in table.entries}
    assert winners == {
        ("attention", "fwd+bwd", (128, True), 2048): "sdpa-cudnn",
        ("attention", "fwd+bwd", (128, True), 4096): "megalite",
        ("attention", "fwd+bwd", (128, True), 8192): "sdpa-flash",
        ("attention", "fwd+bwd", (128, False), 2048): "sdpa-cudnn",
        ("rms_norm", "fwd+bwd", (), 1024): "torch",
        ("rms_norm", "fwd+bwd", (), 4096): "megalite",
        ("rms_norm", "fwd", (), 1024): "megalite",
    }
    entry = next(e for e in table.entries if e.size == 8192)
    assert entry.times_ms == {"megalite": 9.0, "sdpa-flash": 8.0}  # the wrong cuDNN and the math backend left out
    assert table.device == "NVIDIA Test GPU" and table.measured["commit"] == "abc123"
    assert all(e.dtype == "bfloat16" for e in table.entries)


def test_a_table_covers_only_measured_classes_and_lengths():
    table = measured.build(ROWS, META)
    win = lambda size, mode="fwd+bwd", causal=True, head_dim=128: table.winner(  # noqa: E731
        "attention", "bfloat16", mode, size, head_dim=head_dim, causal=causal)
    assert win(2048) == "sdpa-cudnn" and win(4096) == "megalite" and win(8192) == "sdpa-flash"
    assert win(2500) == "sdpa-cudnn" and win(3500) == "megalite"  # the nearest measured length on a log scale
    assert win(1024) is None and win(16384) is None  # outside the measured lengths: not covered
    assert win(2048, mode="fwd") is None  # the forward alone was not measured
    assert win(2048, head_dim=64) is None and win(4096, causal=False) is None
    assert table.winner("attention", "float16", "fwd+bwd", 2048, head_dim=128, causal=True) is None
    assert table.winner("rms_norm", "bfloat16", "fwd+bwd", 1024) == "torch"
    assert table.winner("rms_norm", "bfloat16", "fwd+bwd", 3000) == "megalite"
    assert table.winner("rms_norm", "bfloat16", "fwd+bwd", 512) is None
    assert table.winner("layer_norm", "bfloat16", "fwd+bwd", 2048) is None


def test_tables_round_trip_merge_and_name_the_device(tmp_path):
    assert measured.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    first = measured.build(ROWS, META)
    path = measured.write(first, tmp_path)
    assert path.name == "nvidia-test-gpu.json"
    again = measured.load("NVIDIA Test GPU", tmp_path)
    assert again.entries == first.entries and again.measured == first.measured
    # a later run (another dtype, and one shape again) replaces only what it measured
    fp16 = measured.build([attention(2048, "megalite", 0.5), attention(2048, "sdpa-cudnn", 1.0)],
                          {**META, "dtype": "float16", "commit": "def456"})
    rerun = measured.build([attention(4096, "megalite", 5.0), attention(4096, "sdpa-cudnn", 1.0)],
                           {**META, "commit": "def456"})
    measured.write(fp16, tmp_path)
    merged = measured.load("NVIDIA Test GPU", measured.write(rerun, tmp_path).parent)
    assert len(merged.entries) == len(first.entries) + 1
    assert merged.winner("attention", "bfloat16", "fwd+bwd", 4096, head_dim=128, causal=True) == "sdpa-cudnn"
    assert merged.winner("attention", "float16", "fwd+bwd", 2048, head_dim=128, causal=True) == "megalite"
    assert merged.measured["commit"] == "def456" and merged.measured["earlier"]["commit"] in ("abc123", "def456")
    assert measured.load("Another GPU", tmp_path) is None
    assert json.loads(path.read_text())["device"] == "NVIDIA Test GPU"


def test_auto_choice_follows_the_table_and_says_so_once(monkeypatch, capsys):
    table = measured.build(ROWS, META)
    monkeypatch.setattr(K, "_announced", False)
    monkeypatch.delenv("RANK", raising=False)
    choose = lambda *args, **kwargs: K.auto_choice(table, *args, **kwargs)  # noqa: E731
    bf16 = torch.bfloat16
    assert choose("attention", bf16, 2048, True, head_dim=128, causal=True) == "sdpa-cudnn"
    assert choose("attention", bf16, 4096, True, head_dim=128, causal=True) == "triton"
    assert choose("attention", bf16, 8192, True, head_dim=128, causal=True) == "sdpa-flash"
    assert choose("attention", bf16, 2048, False, head_dim=128, causal=True) == "triton"  # no gradient: fwd, unmeasured
    assert choose("attention", bf16, None, True, head_dim=128, causal=True) == "triton"  # GQA or Tq != Tk
    assert choose("attention", torch.float16, 2048, True, head_dim=128, causal=True) == "triton"
    assert choose("rms_norm", bf16, 1024, True) == "torch" and choose("rms_norm", bf16, 1024, False) == "triton"
    assert K.auto_choice(None, "rms_norm", bf16, 1024, True) == "triton"  # no table: today's behaviour
    err = capsys.readouterr().err
    assert err.count("follows the measured table") == 1, err
    assert "NVIDIA Test GPU" in err and "commit abc123" in err and "torch 2.11.0" in err and "triton 3.6.0" in err
    assert "attention bfloat16 d128 causal fwd+bwd, seq 2048: sdpa-cudnn (2.00x faster than megalite)" in err, err
    assert "8192: sdpa-flash (1.12x faster than megalite)" in err and "rms_norm bfloat16 fwd+bwd, width 1024: torch" in err
    # another rank says nothing
    monkeypatch.setattr(K, "_announced", False)
    monkeypatch.setenv("RANK", "1")
    choose("rms_norm", bf16, 1024, True)
    assert capsys.readouterr().err == ""


def test_apex_and_dense_mask_winners(monkeypatch):
    table = measured.build([row("layer_norm", "megalite", 2.0, rows=4, width=1024),
                            row("layer_norm", "apex", 1.0, rows=4, width=1024)], META)
    monkeypatch.setattr(K, "_announced", True)
    # apex measured fastest but not importable here: megalite's kernel, never an error
    assert K.auto_choice(table, "layer_norm", torch.bfloat16, 1024, True) == "triton"
    docs = measured.build([{**attention(4096, "megalite", 2.0), "op": "attention_docs"},
                           {**attention(4096, "sdpa-dense-mask", 1.0), "op": "attention_docs"}], META)
    assert K.auto_choice(docs, "attention_docs", torch.bfloat16, 4096, True, head_dim=128, causal=True) == "torch"


def test_attention_routes_a_chosen_sdpa_backend(monkeypatch):
    """A call auto resolves to 'sdpa-cudnn' runs torch's SDPA with cuDNN first in its priority list (falling back to
    the others for shapes it cannot run); the result is attention_torch's."""
    seen = []
    monkeypatch.setattr(K, "_resolve", lambda op, x, **kw: seen.append((op, kw)) or "sdpa-cudnn")
    entered = []
    original = K._sdpa_first
    monkeypatch.setattr(K, "_sdpa_first", lambda name: entered.append(name) or original(name))
    q, k, v = (torch.randn(1, 2, 33, 16, requires_grad=True) for _ in range(3))
    out = K.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, K.attention_torch(q, k, v, causal=True))
    assert entered == ["sdpa-cudnn"]
    op, kw = seen[0]
    assert op == "attention" and kw["size"] == 33 and kw["grad"] and kw["head_dim"] == 16 and kw["causal"]
    K.attention(q[:, :, :20], k, v, causal=True)  # Tq != Tk: not a shape the tables measure
    K.attention(q, k[:, :1], v[:, :1], causal=False)  # grouped-query heads neither
    assert seen[1][1]["size"] is None and seen[2][1]["size"] is None
    K.attention(q, k, v, causal=True, document_ids=torch.zeros(1, 33, dtype=torch.long))
    assert seen[3][0] == "attention_docs"


def test_auto_on_the_cpu_never_reads_a_table(monkeypatch):
    monkeypatch.setattr(K, "_table_for", lambda device: pytest.fail("a table was read for a CPU tensor"))
    x = torch.randn(4, 64)
    K.set_backend("auto")
    torch.testing.assert_close(K.rms_norm(x, torch.ones(64)), torch.nn.functional.rms_norm(x, (64,), torch.ones(64)))
