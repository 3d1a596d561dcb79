"""`python -m megalite.eval_harness ARGS` (also under torchrun): the harness's own command line, see cli.py."""

from megalite.eval_harness.cli import harness_cli

harness_cli()
