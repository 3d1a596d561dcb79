"""The engines' behaviour the plan's time model assumes, against the measurements committed under kernels/results/:
DeepSpeed's ZeRO-3 prefetch and re-gathers (`megalite bench zero3`). The measurements run real DeepSpeed engines on
CPU ranks (minutes); here their committed results are read back and compared with the plan's model, and the benches'
analysis runs on a made-up timeline."""

from __future__ import annotations

import json
from pathlib import Path

from megalite import config as C
from megalite import plan as P
from megalite.bench.zero3 import prefetched
from megalite.plan.communication import zero3_traffic

REPO = Path(__file__).resolve().parent.parent
ZERO3 = REPO / "kernels/results/zero3-cpu-2026-12-06/zero3.json"


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
