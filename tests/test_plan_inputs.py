"""`megalite plan`'s command line on input a new user gives it: numbers that are not numbers, a world size too small
for the layout, a config whose own layout is invalid under --search, and configs only other stacks can train.
Each through the `megalite` entry point: exit code 2 and a message naming the flag or key, or a plan that says
what it assumed."""

from __future__ import annotations

from pathlib import Path

import pytest

from megalite.cli import main

REPO = Path(__file__).resolve().parent.parent
LLAMA = str(REPO / "configs/runs/llama-8b-4nodes.json")  # TP4 + SP, PP1, micro-batch 1 x 16 accumulation


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("args", "named"), [
    (("--peak-tflops", "inf"), "--peak-tflops: must be a finite number, got inf"),
    (("--memory-gib", "inf"), "--memory-gib: must be a finite number, got inf"),
    (("--hbm-tbps", "nan"), "--hbm-tbps: must be a finite number, got nan"),
    (("--inter-node-gbps=-inf",), "--inter-node-gbps: must be a finite number, got -inf"),
    (("--allowance-gib", "inf"), "--allowance-gib: must be a finite number, got inf"),
    (("--allowance-gib=-1",), "--allowance-gib: must be >= 0, got -1.0"),
    (("--search", "--top", "-3"), "--top: must be >= 1 (rows of the --search table), got -3"),
    (("--top", "0"), "--top: must be >= 1"),
])
def test_non_numbers_are_refused_naming_the_flag(capsys: pytest.CaptureFixture, args: tuple, named: str) -> None:
    """`inf` device constants made every time 0 or every layout fit; `--top -3` printed all but the last three rows."""
    code, out, err = _run(capsys, LLAMA, "--world-size", "32", *args)
    assert code == 2 and f"megalite plan: error: {named}" in err and not out, err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- issue 29's messages


def test_a_world_size_too_small_says_how_many_gpus_it_needs(capsys: pytest.CaptureFixture) -> None:
    """8 GPUs at TP4 x PP4 was "not divisible"; the plain fact is that it needs at least 16."""
    from megalite import config as C
    from megalite import plan as P
    from megalite.errors import ConfigError

    code, out, err = _run(capsys, LLAMA, "--world-size", "8", "--set", "parallel.pipeline=4")
    assert code == 2 and not out
    assert ("megalite plan: error: world size 8 is too small: parallel.tensor x parallel.pipeline = 4 x 4 needs at "
            "least 16 GPUs (a multiple of it)") in err, err
    with pytest.raises(ConfigError, match=r"world size 4 is too small: parallel.tensor x parallel.context x "
                                          r"parallel.pipeline = 2 x 2 x 2 needs at least 8 GPUs"):
        C.load(LLAMA, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.context=2"], world_size=4)
    cfg = C.load(LLAMA, ["parallel.pipeline=4"])  # valid without a world size; the planner says the same
    with pytest.raises(ConfigError, match="world size 8 is too small: .* = 4 x 1 x 4 needs at least 16 GPUs"):
        P.layout_of(cfg, 8)
    with pytest.raises(ConfigError, match="world size 24 is not divisible by parallel.tensor x parallel.pipeline"):
        C.load(LLAMA, ["parallel.pipeline=4"], world_size=24)  # at or above 16: divisibility is the problem


SEARCH_FROM_INVALID = [  # (world size, overrides, the reason its own layout is invalid, global batch searched)
    (8, ["parallel.pipeline=4"], "world size 8 is too small", 16),  # micro 1 x 16 accumulation x data-parallel >= 1
    (32, ["parallel.tensor=3"], "model.num_heads: 32 is not divisible by parallel.tensor=3", 160),
    (32, ["parallel.pipeline=2", "deepspeed.zero_optimization.stage=2"], "ZeRO-2 cannot be combined with "
     "parallel.pipeline=2", 16 * 4),
    (32, ["deepspeed.zero_optimization.stage=0"], "deepspeed.zero_optimization.stage: ZeRO-0 with bf16 is refused", 128),
]


@pytest.mark.parametrize("case", SEARCH_FROM_INVALID, ids=[c[2][:24] for c in SEARCH_FROM_INVALID])
def test_search_from_an_invalid_layout_searches_and_says_why(capsys: pytest.CaptureFixture, case: tuple) -> None:
    import json

    world, overrides, reason, batch = case
    sets = [x for o in overrides for x in ("--set", o)]
    code, out, err = _run(capsys, LLAMA, "--world-size", str(world), *sets, "--search", "--top", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith(f"{world} x NVIDIA H100 SXM, global batch {batch} x 8192"), lines[0]
    assert lines[1].startswith(f"(the config's own layout is not valid at {world} GPUs: ") and reason in lines[1]
    assert "every valid layout of this global batch is searched" in lines[1]
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and reason in lines[-1], out
    code, out, err = _run(capsys, LLAMA, "--world-size", str(world), *sets, "--search", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert any(reason in p for p in result["own_layout_problems"]) and result["global_batch"] == batch
    assert result["layouts"] and all(
        lay["layout"]["micro_batch"] * lay["layout"]["accumulation"] * lay["layout"]["data"] == batch
        and lay["layout"]["tensor"] * lay["layout"]["pipeline"] * lay["layout"]["data"] == world
        for lay in result["layouts"])


def test_search_still_refuses_what_is_not_a_layout(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, LLAMA, "--world-size", "32", "--set", "parallel.tensor=3", "--set",
                          "model.num_heads=0", "--search")
    assert code == 2 and not out and "model.num_heads: must be > 0, got 0" in err, err
    code, out, err = _run(capsys, LLAMA, "--world-size", "8", "--set", "parallel.pipeline=4")
    assert code == 2 and "too small" in err  # without --search the config's own layout is what is planned


def test_attention_dropout_is_planned_with_a_note(capsys: pytest.CaptureFixture) -> None:
    """Other stacks' published runs have attention dropout; the planner plans them and says megalite cannot train
    them (training still refuses it)."""
    import json

    from megalite import config as C
    from megalite.errors import ConfigError

    code, out, err = _run(capsys, LLAMA, "--world-size", "32", "--set", "model.attention_dropout=0.1")
    assert code == 0, err
    assert "note: model.attention_dropout=0.1 is planned" in out and "megalite cannot train this config" in out
    code, out, err = _run(capsys, LLAMA, "--world-size", "32", "--set", "model.attention_dropout=0.1", "--json")
    with_dropout = json.loads(out)
    code, out, err = _run(capsys, LLAMA, "--world-size", "32", "--json")
    without = json.loads(out)
    # Flash attention keeps no dropout mask: the same memory and time, and the note
    assert with_dropout.pop("notes") and "notes" not in without and with_dropout == without
    code, out, err = _run(capsys, LLAMA, "--world-size", "32", "--set", "model.attention_dropout=0.1", "--search",
                          "--top", "2")
    assert code == 0 and "\nnote: model.attention_dropout=0.1 is planned" in out, err
    code, out, err = _run(capsys, LLAMA, "--world-size", "32", "--set", "model.attention_dropout=1.5")
    assert code == 2 and "model.attention_dropout: must be in [0, 1), got 1.5" in err  # still a range
    with pytest.raises(ConfigError, match="model.attention_dropout: 0.1 is not supported"):
        C.load(LLAMA, ["model.attention_dropout=0.1"], world_size=32)  # training refuses it as before
