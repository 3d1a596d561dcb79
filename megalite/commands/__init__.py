"""One module per `megalite` subcommand: each parses its arguments and calls one function elsewhere.

Every module exposes HELP (one line), `add_arguments(parser)` and `main(args) -> int`, and keeps heavy
imports (torch, deepspeed, datasets) out of its module level where the command does not need them, so
that `megalite --help` and `megalite config check` stay fast on a login node. A command's result goes to
stdout through `megalite.commands.output`; everything else (logs, progress, library warnings) goes to
stderr, so `megalite eval ... > result.json` holds the result and nothing else.
"""
