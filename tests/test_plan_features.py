"""Features that change the plan's answer (issue 29, item 4): FP8 (megalite's model.fp8: matmuls at the FP8 peak,
the recipes' saved copies, row-parallel fp32 reductions, MFU against both peaks in the plan and the training log),
and what only other stacks run, planned from the command line with a note: a stored T x T softmax, selective
recompute of the attention core, tensor-parallel communication hidden behind GEMMs, sequence-parallel inputs kept
as shards. The FP8 activations and collectives are also checked against autograd and real engines in
tests/test_plan.py."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from megalite import config as C
from megalite import plan as P
from megalite.cli import main
from megalite.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
RUN_13B = str(REPO / "configs/runs/gpt3-1.3b-2nodes.json")
GiB = 2**30


def _gpt(fp8: dict | None = None, tp: int = 1, sp: bool = False, **model) -> C.Config:
    raw = {"model": {"preset": "gpt3-1.3b", "max_position_embeddings": 2048, **model, **({"fp8": fp8} if fp8 else {})},
           "parallel": {"tensor": tp, "sequence_parallel": sp}, "data": {"prefixes": ["x"], "seq_length": 2048},
           "train": {"kernels": "triton"},
           "deepspeed": {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                         "zero_optimization": {"stage": 1}}}
    return C.from_dict(C.expand_references(raw, None), world_size=8)


def test_fp8_runs_its_linears_at_the_fp8_peak() -> None:
    """The blocks' linears listed in model.fp8.layers run at the device's FP8 peak x its FP8 matmul fraction;
    attention and the output layer at the bf16 peak; rowwise_with_gw_hp keeps the weight gradient (one of three
    matmuls) in bf16. The casts add memory-bound time; an A100 has no FP8 units."""
    h200 = P.get_device("h200")
    base = P.plan(_gpt(), 8, h200, 8)
    full = P.plan(_gpt({"recipe": "tensorwise"}), 8, h200, 8)
    half = P.plan(_gpt({"recipe": "tensorwise", "layers": ["mlp.fc", "mlp.proj"]}), 8, h200, 8)
    gw_hp = P.plan(_gpt({"recipe": "rowwise_with_gw_hp"}), 8, h200, 8)
    t0, t1 = base.times[0], full.times[0]
    m = base.cfg.model
    matrices = 12 * m.hidden_size**2
    flops = 2 * 4 * 2048 * matrices * 3 * m.num_layers  # forward, input and weight gradients of the block linears
    expected = (t0.matmul - flops / (P.EFFICIENCY["matmul"] * 989e12) + flops / (P.EFFICIENCY["matmul_fp8"] * 1979e12))
    assert t1.matmul == pytest.approx(expected, rel=1e-9)
    assert t1.attention == t0.attention and t1.memory_bound > t0.memory_bound
    assert t0.matmul > half.times[0].matmul > t1.matmul and gw_hp.times[0].matmul > t1.matmul
    assert full.step_s < base.step_s
    # MFU against both peaks, named, in the JSON and the report
    assert full.mfu_fp8_peak == pytest.approx(full.mfu * 989 / 1979) and base.mfu_fp8_peak is None
    assert full.to_dict()["mfu_fp8_peak"] == full.mfu_fp8_peak and "mfu_fp8_peak" not in base.to_dict()
    assert f"{full.mfu_fp8_peak:.1%} of 1979 (FP8 peak)" in P.format_plan(full)
    with pytest.raises(ConfigError, match="model.fp8: NVIDIA A100 SXM 80GB has no FP8 units"):
        P.plan(_gpt({"recipe": "tensorwise"}), 8, P.get_device("a100-80g"), 8)


def test_fp8_memory_by_recipe() -> None:
    """Tensorwise keeps each FP8 linear's input as its e4m3 cast (1 byte) and an e4m3 weight copy per micro-batch; the
    rowwise recipes keep the bf16 input (the same bytes as without FP8); a cast transiently holds ~5 bytes an element
    of its largest operand, and TP2's row-parallel layers their fp32 output."""
    layout = P.layout_of(_gpt(), 8)
    st = P.stages(_gpt(), 1, 1)[0]
    m = _gpt().model
    N, h, f = 4 * 2048, m.hidden_size, m.ffn_size
    bf16 = P.activation_bytes(_gpt(), layout, st, P.settings(_gpt()))
    tw_cfg = _gpt({"recipe": "tensorwise"})
    tw = P.activation_bytes(tw_cfg, layout, st, P.settings(tw_cfg))
    rw_cfg = _gpt({"recipe": "rowwise"})
    assert P.activation_bytes(rw_cfg, layout, st, P.settings(rw_cfg)) == bf16
    # per layer: qkv and fc inputs 2 -> 1 byte, mlp.proj input 2 -> 1, plus the projection's e4m3 copy of the
    # attention output; and 12 h^2 bytes of weight copies
    L = m.num_layers
    assert tw["attention"] - bf16["attention"] == L * (-N * h + N * h)
    assert tw["mlp"] - bf16["mlp"] == L * (-N * h - N * f)
    assert tw["FP8 weight copies"] == L * 12 * h * h
    p = P.plan(tw_cfg, 8, P.get_device("h200"), 8)
    assert p.memory[0].terms["transient: FP8 casts"] == 5 * max(N * f, 4 * h * h)


def test_fp8_row_parallel_reductions_carry_fp32() -> None:
    """At TP > 1 an FP8 row-parallel layer's forward reduction is in fp32: twice a bf16 reduction's bytes, the same
    calls; rowwise adds its amax reductions over the split dimensions (per token and per weight row or column)."""
    def tp_bytes(cfg: C.Config) -> dict:
        p = P.plan(cfg, 8, P.get_device("h200"), 8)
        return {(c.kind): (c.bytes, c.calls) for c in p.comms[0] if c.group == "TP"}

    base, tw = tp_bytes(_gpt(tp=2)), tp_bytes(_gpt({"recipe": "tensorwise"}, tp=2))
    m, N, L = _gpt().model, 4 * 2048, _gpt().model.num_layers
    act = N * m.hidden_size * 2
    assert tw["all-reduce"][0] - base["all-reduce"][0] == pytest.approx(L * 2 * act)  # two row layers, 2 -> 4 bytes
    assert tw["all-reduce"][1] == base["all-reduce"][1]
    rw = tp_bytes(_gpt({"recipe": "rowwise"}, tp=2))
    assert rw["all-reduce"][1] - base["all-reduce"][1] == L * 4 * 2  # four layers, two vectors each
    assert rw["all-reduce"][0] - tw["all-reduce"][0] == pytest.approx(L * 4 * 4 * (N + m.hidden_size))


def test_fp8_in_the_training_log() -> None:
    """The training log's window reports MFU against the run's peak and, with model.fp8, against the FP8 peak: in the
    record (metrics.jsonl) and the printed line."""
    from megalite.engine.metrics import MetricWindow, StepTimer, format_record

    class Sink:
        def __init__(self) -> None:
            self.records: list[dict] = []

        def log(self, record: dict) -> None:
            self.records.append(record)

    cfg = _gpt({"recipe": "tensorwise"})
    window = MetricWindow(cfg, Sink(), StepTimer(False), 8, 1e10, 989.0, False, peak_fp8_tflops=1979.0)
    window.start -= 1.0  # one second for one step
    window.add(2.0, False)
    record = window.flush(1, 1e-4, 1.0, None, 0, True)
    tflops = 1e10 * cfg.global_batch_size(8) * 2048 / 8 / 1e12
    assert record["mfu"] == pytest.approx(tflops / 989, rel=1e-2)
    assert record["mfu_fp8_peak"] == pytest.approx(tflops / 1979, rel=1e-2)
    assert "(" + f"{100 * record['mfu_fp8_peak']:.1f}% of the FP8 peak)" in format_record(record)
    plain = MetricWindow(_gpt(), Sink(), StepTimer(False), 8, 1e10, 989.0, False, 1979.0)
    plain.add(2.0, False)
    assert plain.flush(1, 1e-4, 1.0, None, 0, True)["mfu_fp8_peak"] is None


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_other_stacks_features_from_the_command_line(capsys: pytest.CaptureFixture) -> None:
    """A stored T x T softmax, selective recompute of the attention core, TP overlap and shard-keeping SP are planned
    from the command line, each with a note; each changes the answer the way it should."""
    args = (RUN_13B, "--world-size", "16", "--set", "parallel.tensor=2", "--set", "parallel.sequence_parallel=true",
            "--json")

    def run(*extra: str) -> dict:
        code, out, err = _cli(capsys, *args, *extra)
        assert code == 0, err
        return json.loads(out)

    flash = run()
    stored = run("--attention", "materialized")
    selective = run("--attention", "materialized", "--recompute-attention")
    overlap = run("--tp-overlap")
    shard = run("--sp-keeps-shard")
    zero1 = ("--set", "deepspeed.zero_optimization.stage=1")  # bf16 ZeRO-1: BF16_Optimizer on DeepSpeed
    deepspeed, megatron = run(*zero1), run(*zero1, "--engine", "megatron")
    acts = [d["memory_gib"][0]["activations_per_micro_batch"]["attention"] for d in (flash, stored, selective)]
    assert acts[1] > acts[0] and acts[2] < acts[1]  # the T x T scores kept, then rebuilt instead
    assert selective["micro_batch_s"][0]["matmul"] > stored["micro_batch_s"][0]["matmul"]  # QK^T and AV again
    assert overlap["micro_batch_s"][0]["tp_comm"] < flash["micro_batch_s"][0]["tp_comm"]
    assert shard["memory_gib"][0]["total"] < flash["memory_gib"][0]["total"]
    assert "stored T x T softmax" in " ".join(stored["notes"]) and "notes" not in flash
    assert "selective recompute" in " ".join(selective["notes"])
    assert "Megatron-Core overlaps" in " ".join(overlap["notes"])
    assert "keeping their input's shard" in " ".join(shard["notes"])
    assert deepspeed["deepspeed_path"] == "BF16_Optimizer" and megatron["optimizer_s"] < deepspeed["optimizer_s"]
    assert "Megatron-LM" in " ".join(megatron["notes"])
    with pytest.raises(SystemExit) as exit_:
        _cli(capsys, RUN_13B, "--world-size", "16", "--attention", "flash")
    assert exit_.value.code == 2 and "--attention: invalid choice: 'flash'" in capsys.readouterr().err


def test_selective_recompute_is_korthikantis() -> None:
    """Korthikanti et al. 2022: with selective recompute (the attention core rebuilt), TP and SP, a layer keeps
    sbh x 34 / t; the plan adds its two named differences (the norms' fp32 statistics; with megalite's layers the
    sequence-gathered qkv and fc inputs, which Megatron's keep as shards: --sp-keeps-shard removes it)."""
    s_, b, h, a, t = 2048, 2, 1024, 16, 4
    raw = {"model": {"vocab_size": 50304, "hidden_size": h, "num_layers": 1, "num_heads": a,
                     "max_position_embeddings": s_, "hidden_dropout": 0.1},
           "parallel": {"tensor": t, "sequence_parallel": True}, "data": {"prefixes": ["x"], "seq_length": s_},
           "deepspeed": {"train_micro_batch_size_per_gpu": b, "fp16": {"enabled": True}}}
    cfg = C.from_dict(raw)
    cfg.model = dataclasses.replace(cfg.model, attention_dropout=0.1)
    s = dataclasses.replace(P.settings(cfg, attention="materialized"), recompute_attention=True,
                            sp_saved_input="shard")
    layer = sum(P.activation_bytes(cfg, P.layout_of(cfg, t), P.Stage(0, 1, False, False, ()), s).values())
    sbh = s_ * b * h
    assert layer == pytest.approx(sbh * 34 / t + 16 * s_ * b / t, rel=1e-12)


def test_search_keeps_the_assumptions_and_stays_fast() -> None:
    cfg = C.load(REPO / "configs/runs/llama-8b-4nodes.json")
    start = time.process_time()  # CPU time (about 1 s): a loaded machine's wall clock says nothing of the search
    plans = P.search(cfg, 32, P.get_device("h100"), 8, assume={"tp_overlap": True})
    assert time.process_time() - start < 10 and all(p.settings.tp_overlap for p in plans)
    with pytest.raises(ConfigError, match="plan assumptions: unknown overlap_everything"):
        P.plan(cfg, 32, P.get_device("h100"), 8, assume={"overlap_everything": True})


def test_each_device_has_its_own_efficiencies_with_sources() -> None:
    """Issue 29: the matmul fractions are each device's own (published measurements; the H200's megalite's own), the
    rest the H200's, and the report's "constants of" lines name where each came from; a plan's matmul time follows
    its device's fraction."""
    expected = {"h200": 788.0 / 989.0, "h100-sxm": 794.5 / 989.0, "a100-80g": 271.2 / 312.0,
                "a100-40g": 271.2 / 312.0, "h100-pcie": 499.5 / 756.0}
    for key, fraction in expected.items():
        device = P.get_device(key)
        assert device.efficiency["matmul"] == pytest.approx(fraction)
        assert device.efficiency["copy"] == P.EFFICIENCY["copy"]
        named = dict(device.sources)
        assert "efficiency matmul" in named and "efficiency copy, norms, attention" in named
    assert "Bekman" in dict(P.get_device("a100").sources)["efficiency matmul"]
    assert "kernels/results/h200-2026-11-30" in dict(P.get_device("h200").sources)["efficiency matmul"]
    cfg = _gpt()
    a100 = P.plan(cfg, 8, P.get_device("a100-80g"), 8)
    slower = P.get_device("a100-80g").with_overrides()
    slower = dataclasses.replace(slower, efficiency={**slower.efficiency, "matmul": 0.5})
    assert P.plan(cfg, 8, slower, 8).times[0].matmul == pytest.approx(a100.times[0].matmul * (271.2 / 312.0) / 0.5)
    report = P.format_plan(a100)
    assert "efficiency matmul: 271.2 of 312 TFLOP/s bf16" in report and "matmul 0.869 of peak" in report
