"""`megalite eval`: loss, perplexity and next-token accuracy of a checkpoint on a data split (one JSON object), or
with --tasks the lm-evaluation-harness's downstream tasks (the results table, or the result JSON with --json)."""

from __future__ import annotations

import argparse
import json
import logging
import math

from megalite.commands.output import emit, emit_json
from megalite.errors import ConfigError, shown

HELP = "loss, perplexity and accuracy of a checkpoint, or downstream tasks (--tasks)"
# The options of each mode, for the refusal of a mix (`--limit` without `--tasks` would be silently ignored).
DATA_ONLY = {"data": "--data", "max_samples": "--max-samples", "unigram": "--unigram"}
TASKS_ONLY = {"include_path": "--include-path", "num_fewshot": "--num-fewshot", "limit": "--limit",
              "output": "--output", "json": "--json", "log_samples": "--log-samples", "tokenizer": "--tokenizer"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite eval`."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint step directory, root, or run directory")
    parser.add_argument("--data", default=None, help="data prefix (default: the run's)")
    parser.add_argument("--split", choices=["train", "valid", "test"], default="valid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many samples")
    parser.add_argument("--unigram", action="store_true", help="also report a unigram model's perplexity")
    group = parser.add_argument_group("downstream tasks (lm-evaluation-harness; the `eval` extra)")
    group.add_argument("--tasks", default=None, metavar="T1,T2",
                       help="harness task names (comma-separated, globs allowed), e.g. hellaswag,lambada_openai; "
                            "without it `eval` measures perplexity on the run's data")
    group.add_argument("--include-path", default=None, metavar="DIR", help="a folder of your own task YAMLs")
    group.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples per prompt")
    group.add_argument("--limit", type=float, default=None, metavar="N",
                       help="at most N examples per task (a number below 1 is a fraction)")
    group.add_argument("--output", default=None, metavar="FILE",
                       help="write the result JSON (scores, checkpoint step and manifest hash, task and harness versions)")
    group.add_argument("--json", action="store_true", help="print the result JSON instead of the results table")
    group.add_argument("--log-samples", action="store_true",
                       help="keep every request's prompt and model outputs in the result JSON (as the harness's --log_samples)")
    group.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--seed", type=int, default=1234, help="seed of sampled generations")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _check_mode(args: argparse.Namespace) -> None:
    """Refuse options of the other mode, naming them, and bad harness numbers (before anything loads)."""
    other = TASKS_ONLY if args.tasks is None else DATA_ONLY
    given = [flag for key, flag in other.items() if getattr(args, key) not in (None, False)]
    if given:
        where = "only with --tasks" if args.tasks is None else "not with --tasks (they measure the run's data)"
        raise ConfigError(f"{', '.join(given)}: {where}")
    problems = []
    if args.limit is not None and not args.limit > 0:
        problems.append(f"--limit {args.limit:g}: must be > 0 (a number of examples, or a fraction below 1)")
    elif args.limit is not None and args.limit >= 1 and not (math.isfinite(args.limit) and args.limit.is_integer()):
        problems.append(f"--limit {args.limit:g}: must be a whole number of examples, or a fraction below 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        problems.append(f"--num-fewshot {args.num_fewshot}: must be >= 0")
    if args.output is not None:
        from megalite.eval_harness.results import output_problems

        problems += output_problems(args.output)  # now, not after an evaluation of hours
    if problems:
        raise ConfigError(problems)


def main(args: argparse.Namespace) -> int:
    """Print one JSON object: loss, perplexity, accuracy, tokens (and the unigram baseline if asked); with --tasks,
    the harness's results table (rank 0)."""
    from megalite.evaluate import check_eval_options

    _check_mode(args)
    check_eval_options(args.batch_size, args.max_samples, names={"batch_size": "--batch-size",
                                                                  "max_samples": "--max-samples"})
    if args.tasks is not None:
        return _main_tasks(args)
    from megalite.evaluate import evaluate_checkpoint

    emit_json(evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.max_samples,
                                  args.unigram))
    return 0


def _main_tasks(args: argparse.Namespace) -> int:
    """`megalite eval --tasks`: rank 0 prints the results table (or the result JSON) and writes --output."""
    from megalite.eval_harness import evaluate_checkpoint_tasks, require_lm_eval
    from megalite.eval_harness.results import write_results

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--tasks {shown(args.tasks)}: no task names")
    require_lm_eval()
    from lm_eval.utils import handle_non_serializable, make_table, setup_logging

    setup_logging(logging.WARNING)  # LMEVAL_LOG_LEVEL overrides; the harness logs to stderr
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    done = evaluate_checkpoint_tasks(args.checkpoint, names, args.include_path, args.num_fewshot, limit,
                                     args.batch_size, args.tokenizer, args.dtype, args.seed, args.log_samples)
    if done is None:  # ranks > 0 served rank 0's model calls
        return 0
    results, document = done
    if args.json:
        emit(json.dumps(document, default=handle_non_serializable))
    else:
        emit(make_table(results).rstrip("\n"))
        if results.get("groups"):
            emit(make_table(results, "groups").rstrip("\n"))
    if args.output:  # if it cannot be written now, the results go elsewhere and the error says where
        write_results(json.dumps(document, indent=2, default=handle_non_serializable) + "\n", args.output)
    return 0
