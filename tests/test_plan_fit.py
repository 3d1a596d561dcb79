"""A plan says "does not fit" only when it is sure: the verdict and the lower bound (`megalite.plan.memory.floor_memory`).

The lower bound's parts are each checked against a measurement in tests/test_plan.py: its activations against what
autograd saves when the column-parallel layers keep their sequence shard (Megatron-LM's way), ZeRO-3's fp32 gradient
copy at the step against a real engine's sub-groups. Here: the bound never exceeds the plan's own estimate, the three
verdicts and what the command says of each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalite import config as C
from megalite import plan as P
from megalite.cli import main

REPO = Path(__file__).resolve().parent.parent
LLAMA = REPO / "configs/runs/llama-8b-4nodes.json"
GiB = 2**30
LLAMA_70B = ["model.hidden_size=8192", "model.num_layers=80", "model.num_heads=64", "model.num_kv_heads=8",
             "model.ffn_hidden_size=28672"]


@pytest.mark.parametrize(("path", "overrides", "world", "device"), [
    (LLAMA, [], 32, "h100"),
    (LLAMA, LLAMA_70B, 64, "h200"),
    (REPO / "configs/runs/gpt3-13b-8nodes.json", ["deepspeed.fp16.enabled=true", "deepspeed.bf16.enabled=false"],
     64, "a100-40g"),
    (REPO / "configs/runs/gpt2-124m-1node.json", ["train.kernels=torch"], 8, "a100-80g"),
])
def test_the_lower_bound_never_exceeds_the_estimate(path: Path, overrides: list, world: int, device: str) -> None:
    """Over every layout a search plans (ZeRO 0-3, TP, SP, PP, recompute, loss chunks), on every stage of each kind:
    the lower bound is at most the plan's allocated peak, so 'does not fit' (the bound over the device) implies the
    estimate does not fit either."""
    cfg = C.load(path, overrides)
    plans = P.search(cfg, world, P.get_device(device), 8)
    assert len(plans) > 20
    for p in plans:
        for sm in p.memory.fullest():
            assert sm.floor is not None and sm.floor.allocated <= sm.allocated * (1 + 1e-12), (
                p.layout, p.settings.recompute, sm.stage, sm.floor.terms, sm.terms)
        assert (p.verdict == "fits") == p.fits
        assert p.verdict != "does not fit" or p.floor_memory > p.device.memory_gib * GiB


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(["plan", *args])
    return code, capsys.readouterr().out


def test_three_verdicts_in_the_report_and_json(capsys: pytest.CaptureFixture) -> None:
    # Llama 70B at TP4, ZeRO-1, on 64 H200: BF16_Optimizer's full fp32 gradients (4.4 GiB/B parameters) do not fit,
    # but a distributed optimizer's would: not certain
    sets = [x for o in LLAMA_70B for x in ("--set", o)]
    code, out = _cli(capsys, str(LLAMA), "--world-size", "64", "--device", "h200", *sets)
    assert code == 0
    assert "DOES NOT FIT AS MEGALITE RUNS IT: stage 0 needs" in out and "another implementation may fit" in out
    _, out = _cli(capsys, str(LLAMA), "--world-size", "64", "--device", "h200", *sets, "--json")
    data = json.loads(out)
    assert data["verdict"] == "does not fit as megalite runs it" and not data["fits"]
    assert data["lower_bound_gib"] < 140.4 < data["memory_gib"][0]["total"]
    # the same on 8 GPUs without ZeRO: 16 bytes per parameter of 70B / TP8 alone is 130 GiB: certain
    code, out = _cli(capsys, str(LLAMA), "--world-size", "8", "--device", "h100", *sets, "--set", "parallel.tensor=8",
                     "--set", "deepspeed.zero_optimization.stage=1", "--set", "deepspeed.gradient_accumulation_steps=1")
    assert code == 0 and "DOES NOT FIT: stage 0 needs" in out and "no implementation of this layout fits" in out
    _, out = _cli(capsys, str(LLAMA), "--world-size", "32", "--json")
    data = json.loads(out)
    assert data["verdict"] == "fits" and data["lower_bound_gib"] < data["memory_gib"][0]["total"]


def test_warning_and_search_say_how_sure() -> None:
    cfg = C.load(LLAMA, LLAMA_70B)
    p = P.memory_plan(cfg, 64, P.get_device("h200"))
    warning = P.memory_warning(p)
    assert warning and "(as megalite runs it; the layout's lower bound is" in warning
    assert P.memory_breakdown(p)["verdict"] == "does not fit as megalite runs it"


def test_zero3_fp32_gradient_copy_is_one_sub_group() -> None:
    """DeepSpeed steps a ZeRO-3 partition in sub-groups of sub_group_size (1e9) elements, flattening one sub-group's
    gradients into fp32 at a time: MPT-30B on 8 A100 80 GB (MosaicML's published run, FSDP) was planned with its
    whole 3.7e9-element partition copied (14 GiB) and 'does not fit'; it fits."""
    model = {"vocab_size": 50368, "hidden_size": 7168, "num_layers": 48, "num_heads": 56, "bias": False,
             "max_position_embeddings": 2048, "activation_checkpointing": True}
    raw = {"model": model, "data": {"prefixes": ["x"], "seq_length": 2048},
           "deepspeed": {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 21,
                         "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}}
    p = P.plan(C.from_dict(raw, world_size=8), 8, P.get_device("a100-80g"), 8)
    copy = p.memory[0].terms["transient: fp32 gradients at the step"]
    largest = 50432 * 7168 / 8  # the embedding (vocabulary padded to 128), the largest tensor
    assert copy == pytest.approx(4 * (1e9 + largest)) and p.verdict == "fits"
