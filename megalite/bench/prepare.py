"""Benchmark of `megalite prepare`: tokens/s with 1, 2, 4 workers and peak memory on ~50 MB and ~500 MB.

    megalite bench prepare --sizes-mb 50 500 --workers 1 2 4 --out out/bench-prepare

The corpus is JSON Lines of unique documents: the running interpreter's standard library files, each
prefixed with a line naming its copy, cycled until the size is reached (so the text repeats every
~12 MB, as frequent words repeat in real corpora). A byte-level BPE of 8192 is trained once on `stdlib`
and reused, so the runs time reading, cleaning, de-duplication, tokenising and writing. Each run is a
fresh process; peak memory is the resident set of the parent (VmHWM), of the largest worker and of
all processes together (sampled every 50 ms).
Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megalite.bench import write_json


def make_corpus(path: Path, size_mb: float) -> tuple[int, int]:
    """Write ~size_mb MB of unique JSONL documents; return (documents, bytes of text)."""
    from megalite.data.sources import stdlib_files

    texts = [f.read_text(encoding="utf-8") for f in stdlib_files()]
    target = int(size_mb * 1e6)
    n = written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        while written < target:
            text = f"# copy {n // len(texts)} of {n % len(texts)}\n" + texts[n % len(texts)]
            out.write(json.dumps({"text": text}) + "\n")
            written += len(text.encode("utf-8"))
            n += 1
    os.replace(tmp, path)
    return n, written


def _rss_kb(pid: int | str, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _one_run(args: argparse.Namespace) -> None:
    # Runs in its own process. ru_maxrss survives exec on Linux (it would report the benchmark driver's peak),
    # so peaks come from /proc: VmHWM for this process, and sampling every 50 ms for the workers and the total.
    import threading

    from megalite.data.prepare import prepare

    peaks = {"worker": 0, "total": 0}
    stop = threading.Event()

    def sample() -> None:
        me = os.getpid()
        while not stop.wait(0.05):
            kids = [_rss_kb(c) for c in _children(me)]
            peaks["worker"] = max([peaks["worker"], *kids])
            peaks["total"] = max(peaks["total"], _rss_kb(me) + sum(kids))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    workers = args.workers[0]
    t0 = time.perf_counter()
    m = prepare([args.corpus], args.prefix, tokenizer=args.tokenizer, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    parent = _rss_kb("self", "VmHWM")
    print(json.dumps({"seconds": seconds, "tokens": m["num_tokens"], "documents": m["num_documents"],
                      "parent_peak_mb": parent / 1024, "worker_peak_mb": peaks["worker"] / 1024,
                      "total_peak_mb": max(peaks["total"], parent) / 1024}))


def main(argv: list[str] | None = None) -> int:
    """Generate the corpora, run prepare for each size and worker count, print a table (and JSON)."""
    p = argparse.ArgumentParser(prog="megalite bench prepare", description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[50, 500])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", default="out/bench-prepare")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--_run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._run:
        _one_run(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = out / "stdlib-bpe.json"
    if not tok.exists():
        from megalite.data.prepare import prepare

        t0 = time.perf_counter()
        prepare(["stdlib"], str(out / "stdlib"), vocab_size=args.vocab_size, progress=False)
        os.replace(out / "stdlib.tokenizer.json", tok)
        print(f"trained a {args.vocab_size} BPE on stdlib and tokenised it in {time.perf_counter() - t0:.1f}s")
    rows = []
    for size in args.sizes_mb:
        corpus = out / f"corpus-{size:g}MB.jsonl"
        if not corpus.exists():
            t0 = time.perf_counter()
            n, b = make_corpus(corpus, size)
            print(f"wrote {corpus}: {n} documents, {b / 1e6:.1f} MB of text in {time.perf_counter() - t0:.1f}s")
        for w in args.workers:
            cmd = [sys.executable, "-m", "megalite.bench.prepare", "--_run", "--corpus", str(corpus),
                   "--prefix", str(out / f"p{size:g}-w{w}"), "--tokenizer", str(tok), "--workers", str(w)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r.update(size_mb=size, workers=w, tokens_per_s=r["tokens"] / r["seconds"])
            rows.append(r)
            print(f"{size:>6g} MB  workers {w}  {r['documents']:>7} docs  {r['tokens']:>11,} tokens  "
                  f"{r['seconds']:7.1f} s  {r['tokens_per_s']:>10,.0f} tokens/s  "
                  f"peak MB: parent {r['parent_peak_mb']:4.0f}, each worker {r['worker_peak_mb']:4.0f}, "
                  f"all processes {r['total_peak_mb']:4.0f}", flush=True)
        from megalite.files import sha256_file

        same = {sha256_file(out / f"p{size:g}-w{w}.bin")[1] for w in args.workers}
        print(f"{size:g} MB: .bin identical across worker counts: {len(same) == 1}", flush=True)
    write_json(out / "results.json", {"vocab_size": args.vocab_size, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
