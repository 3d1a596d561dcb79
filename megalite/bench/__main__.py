"""`python -m megalite.bench NAME [options]`: the same as `megalite bench NAME [options]`."""

import sys

from megalite.bench.runner import run

sys.exit(run(sys.argv[1:]))
