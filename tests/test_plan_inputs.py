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
