"""The engines' behaviour the plan's time model assumes, against the measurements committed under kernels/results/:
DeepSpeed's ZeRO-3 prefetch and re-gathers (`megalite bench zero3`), and its PipelineEngine's host work, blocking sends
and BF16_Optimizer's per-micro-batch fp32 gradient bookkeeping (`megalite bench pipeline-engine`). The measurements run real DeepSpeed engines on
CPU ranks (minutes); here their committed results are read back and compared with the plan's model, and the benches'
analysis runs on a made-up timeline."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from megalite import config as C
from megalite import plan as P
from megalite.bench.pipeline_engine import simulate
from megalite.bench.zero3 import prefetched
from megalite.plan.communication import zero3_traffic
from megalite.plan.timing import BF16_BOOKKEEPING_BYTES, ENGINE_HOST_S_PER_MICRO_BATCH

REPO = Path(__file__).resolve().parent.parent
ZERO3 = REPO / "kernels/results/zero3-cpu-2026-12-06/zero3.json"
PIPELINE = REPO / "kernels/results/pipeline-engine-cpu-2026-12-06/pipeline_engine.json"


def test_zero3_prefetch_and_regathers_match_the_committed_timeline() -> None:
    """With any prefetch bucket every layer's gather but the first is issued before the previous layer's forward ends
    (it can run under it); without, none is. The backward gathers again all but the last 2 x bucket elements of the
    forward: the plan's max(0, 1 - 2 x bucket / partitioned), measured at buckets of 0 to all 8 layers."""
    result = json.loads(ZERO3.read_text())
    layers, width = result["settings"]["layers"], result["settings"]["width"]
    rows = {r["label"]: r for r in result["rows"]}
    assert len(rows) == 6 and rows["off"]["bucket"] == 0
    for row in rows.values():
        bucket = row["bucket"]
        assert row["forward"]["gathered"] == layers
        assert row["forward"]["issued_ahead"] == (layers - 1 if bucket else 0), row
        again = layers * max(0.0, 1 - 2 * bucket / (layers * width * width))
        # without prefetch the last layer, whose backward follows at once, is not released: one fewer
        assert again - (0 if bucket else 1) == row["backward"]["gathered"], row


def test_zero3_plan_uses_the_measured_regathers() -> None:
    """The plan's bytes for the same model: 8 layers of 256 x 256, nothing persistent, one micro-batch."""
    raw = {"model": {"vocab_size": 128, "hidden_size": 256, "num_layers": 2, "num_heads": 4,
                     "max_position_embeddings": 64},
           "data": {"prefixes": ["x"], "seq_length": 64},
           "deepspeed": {"train_micro_batch_size_per_gpu": 1,
                         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}}
    for bucket, again in ((0, 1.0), (10**9, 0.0)):
        raw["deepspeed"]["zero_optimization"]["stage3_prefetch_bucket_size"] = bucket
        cfg = C.from_dict(raw, world_size=2)
        s = P.settings(cfg)
        st = P.stages(cfg, 1, 1)[0]
        z3 = zero3_traffic(st, s, 2, "NVLink", 2)
        assert z3.gathers == 1 + again and z3.one_pass.bytes == 4 * P.numel(st.params)


def test_the_timeline_analysis_on_a_made_up_trace() -> None:
    """Two layers: layer 1's gather issued while layer 0 runs (ahead); in the backward layer 0 is gathered again after
    layer 1's backward ended (waited)."""
    events = [("gather", 0, 0.0), ("forward start", 0, 1.0), ("gather", 1, 1.5), ("forward end", 0, 2.0),
              ("forward start", 1, 2.1), ("forward end", 1, 3.0), ("backward start", 1, 4.0),
              ("backward end", 1, 5.0), ("gather", 0, 5.1), ("backward start", 0, 5.2), ("backward end", 0, 6.0)]
    out = prefetched(events, 2)
    assert out["forward"] == {"gathered": 2, "issued_ahead": 1, "waited": 0}
    assert out["backward"] == {"gathered": 1, "issued_ahead": 0, "waited": 1}


def test_pipeline_engine_constants_are_the_committed_measurement() -> None:
    """The plan's DeepSpeed-engine constants are what `megalite bench pipeline-engine` measured: BF16_Optimizer's
    update_hp_grads takes the time of one cast to fp32 and one add over as many elements (within 20%), so it moves
    the 18 bytes per parameter those two kernels do (plus the 2-byte zeroing of the bf16 gradients; on this CPU the
    conversion is slower than its bytes, at least 18 bytes' worth at copy speed); the PipelineEngine's host work per
    micro-batch is two steps of its schedule (median over the buffered-transfer rows). The steps themselves are
    1F1B's (m + p - 1)(F + B) plus the engine's own time: within 3% with buffered transfers, within 6% with
    transfers no buffer holds (the send waits for its receiver), and well below a lockstep schedule's."""
    result = json.loads(PIPELINE.read_text())
    book = result["bookkeeping"]
    assert BF16_BOOKKEEPING_BYTES == 18 + 2
    assert 0.8 < book["update_hp_grads_over_cast_add"] < 1.2 and book["bytes_per_param_at_copy_speed"] >= 18, book
    small = [r for r in result["rows"] if r["payload"] == "4 kB"]
    assert len(small) == 8
    assert ENGINE_HOST_S_PER_MICRO_BATCH == pytest.approx(2 * statistics.median(r["idle_s_per_slot"] for r in small),
                                                          rel=0.01)
    for r in result["rows"]:
        one_f_one_b = r["one_f_one_b_s"] + r["idle_step_s"]
        assert r["deepspeed_simulated_s"] == pytest.approx(r["one_f_one_b_s"])
        assert r["step_s"] == pytest.approx(one_f_one_b, rel=0.03 if r["payload"] == "4 kB" else 0.06), r
        assert r["step_s"] < 0.9 * (r["deepspeed_lockstep_s"] + r["idle_step_s"]), r


@pytest.mark.parametrize("stages,micro_batches", [(2, 1), (3, 5), (4, 8)])
def test_deepspeed_schedule_with_blocking_sends_is_one_f_one_b(stages: int, micro_batches: int) -> None:
    """DeepSpeed's own TrainSchedule instruction streams, simulated with sends that wait for their receiver (and
    without), take 1F1B's (m + p - 1)(F + B): the blocking sends add no bubble, so the plan charges only the
    transfers themselves."""
    for rendezvous in (False, True):
        assert simulate(stages, micro_batches, 0.05, 0.15, rendezvous) == pytest.approx(
            (micro_batches + stages - 1) * 0.2)


def test_plan_charges_the_engines_overheads_and_megatron_has_none() -> None:
    """bf16 at PP2 with BF16_Optimizer: DeepSpeed's bookkeeping costs BF16_BOOKKEEPING_BYTES per parameter per
    micro-batch at the device's copy speed, Megatron's none; a stage whose device work is shorter than the engine's
    host work per micro-batch waits for the host (a tiny model), a big one never does."""
    raw = {"model": {"vocab_size": 512, "hidden_size": 64, "num_layers": 4, "num_heads": 4,
                     "max_position_embeddings": 64},
           "parallel": {"pipeline": 2}, "data": {"prefixes": ["x"], "seq_length": 64},
           "deepspeed": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 8,
                         "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}}
    cfg = C.from_dict(raw, world_size=2)
    device = P.get_device("h100-sxm")
    ds = P.plan(cfg, 2, device, 8)
    mega = P.plan(cfg, 2, device, 8, assume={"engine": "megatron"})
    assert ds.settings.path == "bf16_optimizer"
    n = max(P.numel(st.params) for st in P.stages(cfg, 1, 2))
    bandwidth = device.efficiency["copy"] * device.hbm_tbps * 1e12
    assert ds.optimizer_s - mega.optimizer_s == pytest.approx(n * BF16_BOOKKEEPING_BYTES * 8 / bandwidth, rel=1e-6)
    t = ds.times[0]
    assert t.compute < ENGINE_HOST_S_PER_MICRO_BATCH and t.total == pytest.approx(ENGINE_HOST_S_PER_MICRO_BATCH)
    assert mega.times[0].total == pytest.approx(t.compute + t.pp_comm) and mega.step_s < ds.step_s
    assert any("Megatron-LM" in note for note in mega.notes)
    raw["model"].update(hidden_size=4096, num_heads=32, max_position_embeddings=2048)
    raw["data"]["seq_length"] = 2048
    big = P.plan(C.from_dict(raw, world_size=2), 2, device, 8)
    assert big.times[0].host_exposed == 0.0 and "host work beyond" not in P.format_plan(big)
    assert "host work beyond" in P.format_plan(ds)
