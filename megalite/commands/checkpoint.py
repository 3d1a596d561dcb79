"""`megalite checkpoint list|verify`: see what a run has saved, and prove a checkpoint intact before using it.

`list` reads only the manifests (fast). `verify` re-hashes every file against its manifest (as a resume does
before loading) and checks the pickles' globals, so a copy to other storage or a suspect file system can be
checked without starting a job. Exit status 0 when everything asked about is complete and intact, else 2.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from megalite.checkpoint.manifest import read_manifest
from megalite.checkpoint.paths import MANIFEST, checkpoint_root, committed_steps, read_latest, resolve_checkpoint
from megalite.commands.output import emit, emit_json
from megalite.errors import CheckpointError

HELP = "list a run's checkpoints, or verify one against its manifest"


def _summary(step_dir: str) -> dict:
    """What a step directory's manifest says (its files not verified), or why it cannot be read."""
    if not os.path.isfile(os.path.join(step_dir, MANIFEST)):
        return {"error": f"no {MANIFEST}: incomplete (never loaded)"}
    try:
        m = read_manifest(step_dir)
        layout = m.get("layout", {})
        return {"step": m.get("step"), "bytes": sum(int(v["size"]) for v in m.get("files", {}).values()),
                "files": len(m.get("files", {})), "layout": {k: layout.get(k) for k in sorted(layout)},
                "saved_unix": m.get("created_unix"), "git_commit": m.get("git_commit")}
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        return {"error": f"unreadable {MANIFEST}: {e}"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite checkpoint`."""
    sub = parser.add_subparsers(dest="action", required=True)
    for action, help_text in (("list", "the checkpoints of a run, newest first, from their manifests"),
                              ("verify", "re-hash every file of a checkpoint against its manifest")):
        p = sub.add_parser(action, help=help_text)
        p.add_argument("path", help="run directory, checkpoint root, or one checkpoint's step directory")
        if action == "verify":
            p.add_argument("--all", action="store_true", help="every checkpoint of the root, not only the newest")
        p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p = sub.add_parser("reshard", help="rewrite a checkpoint for another layout (TP, CP, PP, DP, EP, ZeRO stage) without "
                                      "training; the target world runs as CPU processes on this machine")
    p.add_argument("path", help="run directory, checkpoint root, or one checkpoint's step directory")
    p.add_argument("--out", required=True, help="an empty directory: the new checkpoint root")
    p.add_argument("--tensor", type=int, required=True, help="tensor-parallel degree of the target")
    p.add_argument("--pipeline", type=int, required=True, help="pipeline-parallel degree of the target")
    p.add_argument("--data", type=int, required=True, help="data-parallel degree of the target")
    p.add_argument("--context", type=int, default=1, help="context-parallel degree of the target (default 1)")
    p.add_argument("--expert", type=int, default=1, help="expert-parallel degree of the target: experts split over "
                   "this many of the data x context replicas (default 1)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None, help="ZeRO stage (default: the source's)")


def main(args: argparse.Namespace) -> int:
    """List, verify or reshard; exit 0 when all is complete and intact, 2 otherwise."""
    if args.action == "reshard":
        from megalite.engine.reshard_offline import reshard  # DeepSpeed and the target world: heavy

        for name in ("tensor", "pipeline", "data", "context", "expert"):
            if getattr(args, name) < 1:
                raise CheckpointError(f"--{name}: must be >= 1, got {getattr(args, name)}")
        report: dict = {}
        written = reshard(args.path, args.out, args.tensor, args.pipeline, args.data, args.zero, report=report,
                          context=args.context, expert=args.expert)
        ranks = report.get("ranks") or [{}]
        load_s = max(r.get("load_s", 0.0) for r in ranks)
        peak = max(r.get("reshard_peak_bytes", 0) - r.get("engine_bytes", 0) for r in ranks)
        cp = (f" x CP{args.context}" if args.context > 1 else "") + (f" x EP{args.expert}" if args.expert > 1 else "")
        emit(f"wrote {written}: layout TP{args.tensor}{cp} x PP{args.pipeline} x DP{args.data}; state moved in "
             f"{load_s:.1f} s using at most {peak / 2**20:.0f} MiB per rank beyond its engine")
        return 0
    from megalite.checkpoint.verify import verify_checkpoint

    root = checkpoint_root(args.path)
    steps = committed_steps(root)
    latest = read_latest(root)
    if args.action == "list":
        rows = [{"path": path, "latest": os.path.basename(path) == latest, **_summary(path)} for _, path in steps]
        if args.json:
            emit_json({"root": str(root), "latest": latest, "checkpoints": rows})
        else:
            emit(f"{root}: {len(rows)} checkpoint(s), latest -> {latest}")
            for r in rows:
                mark = "*" if r["latest"] else " "
                if "error" in r:
                    emit(f" {mark} {os.path.basename(r['path'])}: {r['error']}")
                else:
                    emit(f" {mark} {os.path.basename(r['path'])}: step {r['step']}, {r['files']} files, "
                          f"{r['bytes'] / 1e6:.1f} MB, layout {r['layout']}")
        return 0 if rows and all("error" not in r for r in rows) else 2
    if args.all and not Path(args.path, MANIFEST).is_file():
        targets = [path for _, path in steps]
        if not targets:
            raise CheckpointError(f"{root}: no checkpoints")
    else:
        targets = [str(resolve_checkpoint(args.path))]
    results = []
    for target in targets:
        t0 = time.perf_counter()
        try:
            manifest = verify_checkpoint(target)
            results.append({"path": target, "ok": True, "step": manifest.get("step"),
                            "bytes": sum(int(v["size"]) for v in manifest["files"].values()),
                            "seconds": round(time.perf_counter() - t0, 3)})
        except CheckpointError as e:
            results.append({"path": target, "ok": False, "problems": str(e)})
    if args.json:
        emit_json({"root": str(root), "results": results})
    else:
        for r in results:
            if r["ok"]:
                emit(f"{r['path']}: OK - step {r['step']}, {r['bytes'] / 1e6:.1f} MB verified in {r['seconds']} s")
            else:
                emit(r["problems"])
    return 0 if all(r["ok"] for r in results) else 2
