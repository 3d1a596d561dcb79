#!/usr/bin/env python3
"""Resource report: compile every Triton kernel for a GPU target on a machine without a GPU.

For every kernel the launchers can start (attention forward, delta, dk/dv, dq with every autotune config: pointer,
TMA and warp-specialised tiles; LayerNorm/RMSNorm forward and backward with every candidate per row width), every
dtype, head dim / width and architecture, prints registers and stack bytes per thread, dynamic shared memory and the
SASS counts of HGMMA, HMMA, LDL, STL (local memory = spills), UTMALDG (TMA loads) and USETMAXREG (warp
specialisation), as a markdown table and optionally JSON (with `resources.fingerprint()` of the kernels). Exits 1 if any compiled
kernel spills (stack, local memory or LDL/STL), 2 if a kernel fails to compile.

    python kernels/compile_check.py [--arch 80,90] [--dtype bf16,fp16] [--head-dims 64,128,80,96,256]
                                    [--widths 256,...,16384] [--generic] [--sample] [--summary] [--json FILE]

--generic compiles without argument specialisation (no 16-byte alignment, no unit strides), as a launch
with odd strides or offsets would (no TMA tiles: such tensors are not TMA-eligible either, but the recorded launch
is, so --generic rows of TMA tiles describe no real launch). --sample compiles each attention tile once per
architecture, kernel, dtype and size, taking the causal/documents variants in turn, and each norm candidate once
(the CI test's choice). Compiled kernels are cached
by Triton (TRITON_CACHE_DIR); a cold full run takes minutes on 2 cores (each compile 1-10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite.kernels import resources  # noqa: E402

WIDTHS = "256,1024,2048,4096,8192,16384"


def _commit() -> str:
    """HEAD of this checkout, with "+dirty" when the kernels differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "megalite/kernels"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="CUDA compute capabilities, e.g. 80,90")
    parser.add_argument("--dtype", default="bf16,fp16", help="bf16, fp16, fp32 (comma-separated)")
    parser.add_argument("--head-dims", default="64,128,80,96,256", help="attention head dims ('' for none)")
    parser.add_argument("--widths", default=WIDTHS, help="norm row widths ('' for none)")
    parser.add_argument("--variants", default="full,causal,full docs,causal docs",
                        help="attention variants to compile (comma-separated)")
    parser.add_argument("--kernels", default="", help="only kernels whose name contains one of these (e.g. dkdv,fwd)")
    parser.add_argument("--generic", action="store_true", help="no argument specialisation (odd strides)")
    parser.add_argument("--sample", action="store_true", help="each tile once, variants in turn (CI)")
    parser.add_argument("--summary", action="store_true", help="one row per tile: the worst of its variants")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--json", type=Path, help="also write every row and the versions here")
    args = parser.parse_args(argv)
    archs, dtypes = _ints(args.arch), [d for d in args.dtype.split(",") if d]
    variants = {v.strip() for v in args.variants.split(",")}
    cases = [c for c in resources.attention_cases(dtypes, _ints(args.head_dims)) if c.variant in variants]
    cases += resources.norm_cases(dtypes, _ints(args.widths))
    t0 = time.perf_counter()
    jobs = [job for case in cases for job in resources.jobs_for(case, archs, generic=args.generic)]
    if args.kernels:
        jobs = [j for j in jobs if any(k in j.name for k in args.kernels.split(","))]
    if args.sample:
        jobs = resources.sample_variants(jobs)
    try:
        rows = resources.run_jobs(jobs, args.workers)
    except Exception as e:  # noqa: BLE001 - report which kernel failed, then fail
        print(f"compile failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print(resources.summary_markdown(rows) if args.summary else resources.markdown(rows))
    spilling = [r for r in rows if not r["spill_free"]]
    versions = resources.versions()
    print(f"\n{len(rows)} kernels, {len(spilling)} spilling; triton {versions['triton']}; {seconds:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        head = {**versions, "commit": _commit(), "fingerprint": resources.fingerprint(), "generic": args.generic,
                "seconds": round(seconds, 1)}
        # One row per line: compact, and diffs between two reports stay readable.
        body = ",\n".join(json.dumps(r, sort_keys=True) for r in rows)
        args.json.write_text(json.dumps(head)[:-1] + ', "rows": [\n' + body + "\n]}\n")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
