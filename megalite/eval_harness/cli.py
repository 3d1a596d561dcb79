"""`python -m megalite.eval_harness ARGS`: the harness's own command line with the megalite model registered."""

from __future__ import annotations

import sys

from megalite.errors import MegaliteError
from megalite.eval_harness.checkpoints import HARNESS_DRIVERS, FollowerDone, model_class
from megalite.eval_harness.lm import require_lm_eval


def harness_cli(argv: list[str] | None = None) -> None:
    """`python -m megalite.eval_harness ARGS`: the harness's own command line (every `lm_eval run` option) with
    the megalite model registered, e.g. `--model megalite --model_args checkpoint=DIR --tasks hellaswag`. Under
    torchrun every rank runs it; ranks > 0 serve rank 0's model calls and end when it is done."""
    require_lm_eval()
    model_class()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    ok = False
    try:
        cli_evaluate()
        ok = True
    except FollowerDone as done:
        sys.exit(done.code)
    except MegaliteError as e:  # bad input (checkpoint, tokenizer, model arguments, task data): one line, exit 2
        print(f"python -m megalite.eval_harness: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        while HARNESS_DRIVERS:
            HARNESS_DRIVERS.pop().close(ok)
