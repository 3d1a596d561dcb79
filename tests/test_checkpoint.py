"""Checkpoint module: commit protocol under kill -9, corruption matrix, exact resume, safe loading.

Launches (each costs seconds on 2 cores, so each carries many checks):
- one subprocess chain (tests/helpers/ckpt_job.py) of 2-rank jobs killed with SIGKILL at every fault point;
- one run_ranks launch doing exact resume for ZeRO 1/2/3, the corruption matrix, the doctored file
  and resume 'must' with nothing to resume.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from megalite import checkpoint as ck
from megalite.checkpoint.ds_engine import _safe_engine_class
from megalite.checkpoint.manifest import manifest_body_hash
from megalite.checkpoint.rng import rng_state, set_rng_state
from megalite.distributed import broadcast_object
from megalite.errors import CheckpointError
from megalite.files import sha256_file
from tests.helpers.distributed import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = {"tp": 1, "pp": 1, "dp": 2, "world_size": 2}
MODEL_STATES = "ds/mp_rank_00_model_states.pt"
OPTIM0 = "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"
OPTIM1 = "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"


# --------------------------------------------------------------------------- in-process unit checks


def test_rng_state_roundtrip_is_json_and_exact():
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()
    saved = json.loads(json.dumps(rng_state()))
    expect = (random.random(), float(np.random.standard_normal()), torch.rand(3).tolist(), random.gauss(0, 1))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(saved)
    got = (random.random(), float(np.random.standard_normal()), torch.rand(3).tolist(), random.gauss(0, 1))
    assert got == expect


def test_manager_rejects_bad_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="keep"):
        ck.CheckpointManager(str(tmp_path), keep=1)
    mgr = ck.CheckpointManager(str(tmp_path))
    with pytest.raises(CheckpointError, match="resume"):
        mgr.find_resume("sometimes")
    assert mgr.find_resume("never") is None
    assert mgr.find_resume("auto") is None
    with pytest.raises(CheckpointError, match="no complete, verified checkpoint"):
        mgr.find_resume("must")


def test_hashing_writer_matches_file(tmp_path):
    engine_cls = _safe_engine_class()
    eng = engine_cls()
    eng.begin_recording(str(tmp_path))
    path = str(tmp_path / "x.pt")
    eng.save({"w": torch.arange(1000.0), "n": 3}, path)
    written, failures = eng.end_recording()
    (size, digest), = written.values()
    assert failures == []
    assert (size, digest) == sha256_file(path)
    assert eng.load(path)["n"] == 3


# --------------------------------------------------------------------------- kill -9 at every injection point

CHAIN = [
    [2, None],                # fresh: saves steps 1, 2
    [3, "before_shards"],     # each of these resumes step 2, trains step 3, dies while saving it
    [3, "between_shards"],
    [3, "before_manifest"],
    [3, "before_rename"],
    [3, "before_latest"],     # step 3 committed, latest still names step 2
    [4, "after_latest"],      # resumes step 2 (latest); its save of step 3 commits, moves latest, dies before pruning
    [5, None],                # resumes step 3, saves 4 and 5, prunes to the last 2
    [5, None, "straight"],    # the same 5 steps without any interruption, in another root
]
# `latest` is the only notion of newest: job 6 resumes step 2 (latest), not the step 3 committed by job 5 before it
# was killed ahead of updating `latest`.
EXPECTED_RESUME = [0, 2, 2, 2, 2, 2, 2, 3, 0]


def _processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `text`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(int(pid))
    return found


def _run_chain(tmp_path, chain: list, expected_resume: list[int], *mode: str) -> tuple[list[dict], dict]:
    """Run tests/helpers/ckpt_job.py's chain of jobs (each killed at its fault point or finishing); check each job's exit,
    fault marker, leftover processes and resume step; return the jobs' results and every rank's losses by step."""
    root, out = tmp_path / "root", tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, DS_ACCELERATOR="cpu")
    env.pop("MEGALITE_CKPT_FAULT", None)
    cmd = [sys.executable, os.path.join(REPO, "tests", "helpers", "ckpt_job.py"), str(root), str(out), json.dumps(chain), *mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _processes_mentioning(str(root)) == [], "orphaned job processes"
    results = json.loads((out / "results.json").read_text())
    losses: dict[int, dict[str, list[float]]] = {0: {}, 1: {}}
    for job, want, (steps, fault, *_) in zip(results, expected_resume, chain):
        where = f"{' '.join(mode)} job {steps=} {fault=}"
        assert job["leftover_pids"] == [], where
        assert job["status"] == (-9 if fault else 0), (where, job["status"])
        assert job["markers"] == ([f"fault-{fault}-rank0"] if fault else []), where
        for rank in (0, 1):
            rec = job["records"][str(rank)]
            assert rec["resumed_from"] == want, (where, rank, rec["report"])
            for step, loss in rec["losses"].items():
                losses[rank].setdefault(step, []).append(loss)
    return results, losses


def _assert_same_losses(losses: dict) -> None:
    """Every interrupted-and-resumed step reproduced the uninterrupted run's loss exactly (fp32)."""
    for rank in (0, 1):
        for step, seen in losses[rank].items():
            assert len(set(seen)) == 1, (rank, step, seen)


def test_kill9_at_every_injection_point_resumes_last_complete(tmp_path):
    root = tmp_path / "root"
    results, losses = _run_chain(tmp_path, CHAIN, EXPECTED_RESUME)
    # The partially written directory of each interrupted save is never committed nor loaded.
    assert results[1]["tmp_files"] == []
    assert "ds/mp_rank_00_model_states.pt" in "".join(results[2]["tmp_files"])
    assert not any(OPTIM0 in f for f in results[2]["tmp_files"]), results[2]["tmp_files"]
    assert any(f.endswith(ck.MANIFEST) for f in results[4]["tmp_files"])
    assert "step00000003" in results[5]["dirs"] and "latest" in results[5]["dirs"]
    assert any("ignoring" in line and "step00000003" in line for line in results[6]["records"]["0"]["report"])
    # Leftovers are cleaned by the next run; pruning keeps the last 2.
    assert results[7]["dirs"] == ["latest", "step00000004", "step00000005"]
    assert (root / "latest").read_text().strip() == "step00000005"
    _assert_same_losses(losses)
    _check_cli(root, tmp_path)


# The same on the asynchronous path: the save's snapshot is taken on the training thread, then a background thread
# writes, hashes and commits while the next step trains. A kill at any point leaves the previous complete checkpoint.
ASYNC_CHAIN = [
    [2, None],
    [3, "after_snapshot"],    # snapshot in host memory, nothing written yet
    [3, "between_shards"],    # in the background thread, files half written
    [3, "before_manifest"],
    [3, "before_rename"],
    [3, "before_latest"],
    [4, "after_latest"],      # committed by the background thread while step 4 trains
    [5, None],
]
ASYNC_EXPECTED_RESUME = [0, 2, 2, 2, 2, 2, 2, 3]


def test_kill9_during_an_asynchronous_save_resumes_last_complete(tmp_path):
    root = tmp_path / "root"
    results, losses = _run_chain(tmp_path, ASYNC_CHAIN, ASYNC_EXPECTED_RESUME, "async")
    assert any(f.endswith(ck.MANIFEST) for f in results[4]["tmp_files"])  # killed before the rename
    assert "step00000003" in results[5]["dirs"] and "latest" in results[5]["dirs"]
    assert results[7]["dirs"] == ["latest", "step00000004", "step00000005"]
    assert (root / "latest").read_text().strip() == "step00000005"
    _assert_same_losses(losses)
    from megalite.checkpoint.manager import verify_checkpoint

    assert verify_checkpoint(str(root / "step00000005"))["step"] == 5


def _check_cli(root, tmp_path) -> None:
    """`megalite checkpoint list|verify` on the chain's final checkpoints, then on a copy with one flipped byte."""
    from megalite.commands import checkpoint as checkpoint_cli

    def run(*argv: str) -> tuple[int, dict]:
        import contextlib
        import io

        parser = __import__("argparse").ArgumentParser()
        checkpoint_cli.add_arguments(parser)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = checkpoint_cli.main(parser.parse_args([*argv, "--json"]))
        return code, json.loads(out.getvalue().strip().splitlines()[-1])

    code, listed = run("list", str(root))
    assert code == 0 and listed["latest"] == "step00000005"
    assert [(c["step"], c["latest"]) for c in listed["checkpoints"]] == [(5, True), (4, False)]
    assert all(c["bytes"] > 0 and c["layout"] for c in listed["checkpoints"])
    code, verified = run("verify", str(root), "--all")
    assert code == 0 and [r["ok"] for r in verified["results"]] == [True, True]
    bad = tmp_path / "flipped"
    _copy_root(str(root), str(bad))
    _flip_byte(str(bad / "step00000005" / "ds" / "mp_rank_00_model_states.pt"))
    code, verified = run("verify", str(bad))  # the newest (latest) by default
    assert code == 2 and not verified["results"][0]["ok"]
    assert "mp_rank_00_model_states.pt" in verified["results"][0]["problems"]
    code, verified = run("verify", str(bad / "step00000004"))  # one step directory: intact
    assert code == 0 and verified["results"][0]["step"] == 4


# --------------------------------------------------------------------------- one run_ranks launch, many checks


def _copy_root(src: str, dst: str) -> None:
    shutil.copytree(src, dst)


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _doctor(root: str, marker: str) -> dict:
    """Rank 0: plant an exec payload in step 2's model states and re-sign the manifest; run the positive control."""
    from tests.helpers.ckpt_common import Payload

    step = os.path.join(root, "step00000002")
    target = os.path.join(step, MODEL_STATES)
    sd = torch.load(target, weights_only=False)  # our own file, written by this test a moment ago
    sd["extra"] = Payload(marker)
    torch.save(sd, target)
    mpath = os.path.join(step, ck.MANIFEST)
    with open(mpath) as f:
        manifest = json.load(f)
    size, digest = sha256_file(target)
    manifest["files"][MODEL_STATES].update(size=size, sha256=digest)
    manifest["body_sha256"] = manifest_body_hash(manifest)
    _write(mpath, json.dumps(manifest))
    # Positive control: the plain unpickler runs the payload.
    torch.load(target, weights_only=False)
    ran = os.path.exists(marker)
    if ran:
        os.remove(marker)
    return {"control_ran": ran, "target": target}


CASES = {
    # name: (mutation applied by rank 0, expected choice, text the report must contain)
    "truncated_shard": (lambda r: _truncate(f"{r}/step00000002/{OPTIM1}"), "step00000001", OPTIM1),
    "flipped_byte": (lambda r: _flip_byte(f"{r}/step00000002/{MODEL_STATES}"), "step00000001", MODEL_STATES),
    "deleted_file": (lambda r: os.remove(f"{r}/step00000002/{OPTIM0}"), "step00000001", OPTIM0),
    "empty_latest": (lambda r: _write(f"{r}/latest", ""), "step00000002", "latest"),
    "latest_missing_step": (lambda r: _write(f"{r}/latest", "step00000009\n"), "step00000002", "step00000009"),
    "truncated_manifest": (lambda r: _truncate(f"{r}/step00000002/manifest.json"), "step00000001",
                           "step00000002/manifest.json"),
    "no_manifest": (lambda r: os.remove(f"{r}/step00000002/manifest.json"), "step00000001",
                    "step00000002/manifest.json"),
    "unlisted_file": (lambda r: _write(f"{r}/step00000002/ds/extra.pt", "x"), "step00000001", "extra.pt"),
    "all_corrupt": (lambda r: [_flip_byte(f"{r}/step0000000{s}/{MODEL_STATES}") for s in (1, 2)], None,
                    "step00000001/" + MODEL_STATES),
}


def _checks_on_ranks(base: str) -> dict:
    """Runs on each of 2 ranks: exact resume for ZeRO 1/2/3, then the corruption matrix and safe loading."""
    import torch.distributed as dist

    from tests.helpers.ckpt_common import (
        MODEL,
        build_engine,
        build_pipe_engine,
        pipe_step,
        seed_all,
        setup_deepspeed,
        train_step,
    )

    setup_deepspeed()
    rank = dist.get_rank()
    out: dict = {"exact": {}, "cases": {}}

    # Exact resume: 4 steps straight vs 2 steps, save, a fresh engine (other init, other RNG), resume, 2 steps.
    for stage in (1, 2, 3):
        seed_all(100 + rank)
        engine = build_engine(stage, seed=5)
        straight = [train_step(engine, s) for s in range(1, 5)]
        seed_all(100 + rank)
        engine = build_engine(stage, seed=5)
        layout = dict(LAYOUT, zero_stage=stage)
        root = os.path.join(base, f"exact{stage}")
        mgr = ck.CheckpointManager(root, keep=2, layout=layout, config={"model": MODEL})
        first = [train_step(engine, s) for s in range(1, 3)]
        t = time.perf_counter()
        saved = mgr.save(engine, 2, {"consumed": 2, "epoch": 0})
        save_s = time.perf_counter() - t
        seed_all(999)
        engine = build_engine(stage, seed=6)
        mgr = ck.CheckpointManager(root, keep=2, layout=layout, config={"model": MODEL})
        path = mgr.find_resume("must")
        state = mgr.load(engine, path)
        rest = [train_step(engine, s) for s in range(state["client_state"]["consumed"] + 1, 5)]
        out["exact"][stage] = {"straight": straight, "resumed": first + rest, "saved": saved, "path": path,
                               "step": state["step"], "save_s": save_s, "config": state["config"]}

    # Pristine ZeRO-1 checkpoints at steps 1 and 2 for the corruption matrix.
    seed_all(7 + rank)
    engine = build_engine(1, seed=5)
    pristine = os.path.join(base, "pristine")
    mgr = ck.CheckpointManager(pristine, keep=3, layout=LAYOUT, config={"model": MODEL})
    for s in (1, 2):
        train_step(engine, s)
        mgr.save(engine, s, {"consumed": s})

    def attempt(root: str, policy: str, layout: dict = LAYOUT, model: dict | None = None) -> dict:
        m = ck.CheckpointManager(root, keep=3, layout=layout, config={"model": MODEL})
        t = time.perf_counter()
        try:
            path = m.find_resume(policy, expected_model=model)
            res = {"choice": os.path.basename(path) if path else None}
        except CheckpointError as e:
            res = {"error": str(e)}
        res.update(report="\n".join(m.resume_report), seconds=time.perf_counter() - t)
        return res

    # Each policy gets its own copy: a rejected checkpoint is quarantined (moved aside) by the first look at it.
    for name, (mutate, _, _) in CASES.items():
        roots = {policy: os.path.join(base, f"{name}-{policy}") for policy in ("auto", "must")}
        if rank == 0:
            for root in roots.values():
                _copy_root(pristine, root)
                mutate(root)
        dist.barrier()
        out["cases"][name] = {policy: attempt(root, policy) for policy, root in roots.items()}
        out["cases"][name]["quarantined"] = sorted(n for n in os.listdir(roots["auto"]) if n.startswith("rejected-"))

    out["cases"]["layout_mismatch"] = {"auto": attempt(pristine, "auto", layout=dict(LAYOUT, tp=2))}
    out["cases"]["model_mismatch"] = {"auto": attempt(pristine, "auto", model=dict(MODEL, hidden=64))}
    empty = os.path.join(base, "nothing")
    out["cases"]["nothing"] = {"auto": attempt(empty, "auto"), "must": attempt(empty, "must")}

    # A real load after a fallback.
    m = ck.CheckpointManager(os.path.join(base, "flipped_byte-auto"), keep=3, layout=LAYOUT)
    out["fallback_load_step"] = m.load(engine, m.find_resume("auto"))["step"]

    # The doctored checkpoint: payload planted, manifest re-signed (an attacker with write access).
    root, probe = os.path.join(base, "doctored"), os.path.join(base, "doctored-probe")
    marker = os.path.join(base, "payload-ran")
    control = None
    if rank == 0:
        _copy_root(pristine, root)
        control = _doctor(root, marker)
        _copy_root(root, probe)  # find_resume quarantines the doctored step: the direct loads below use this copy
        control["target"] = control["target"].replace(root, probe)
    control = broadcast_object(control)
    dist.barrier()
    doc: dict = {"control": control, "auto": attempt(root, "auto")}
    doc["marker_after_find"] = os.path.exists(marker)
    root = probe
    m = ck.CheckpointManager(root, keep=3, layout=LAYOUT)
    try:
        m.load(engine, os.path.join(root, "step00000002"))
        doc["load"] = "loaded"
    except CheckpointError as e:
        doc["load"] = str(e)
    # Bypass megalite's pre-flight scan: DeepSpeed itself reads through the safe engine and refuses.
    try:
        engine.load_checkpoint(os.path.join(root, "step00000002"), tag=ck.DS_TAG)
        doc["deepspeed_load"] = "loaded"
    except CheckpointError as e:
        doc["deepspeed_load"] = str(e)
    try:
        ck.safe_torch_load(control["target"])
        doc["safe_torch_load"] = "loaded"
    except CheckpointError as e:
        doc["safe_torch_load"] = str(e)
    doc["marker_at_end"] = os.path.exists(marker)
    out["doctored"] = doc

    # Exact resume with the pipeline engine (2 stages, one per rank): layer files, train_batch, per-stage RNG.
    # Last: once a PipelineModule exists, DeepSpeed's global groups break a later plain initialize.
    seed_all(100 + rank)
    engine = build_pipe_engine(seed=5)
    straight = [pipe_step(engine, s) for s in range(1, 5)]
    seed_all(100 + rank)
    engine = build_pipe_engine(seed=5)
    root = os.path.join(base, "exact_pipe")
    layout = {"tp": 1, "pp": 2, "dp": 1, "world_size": 2}
    mgr = ck.CheckpointManager(root, keep=2, layout=layout, config={"model": MODEL})
    first = [pipe_step(engine, s) for s in range(1, 3)]
    saved = mgr.save(engine, 2, {"consumed": 2})
    seed_all(999)
    engine = build_pipe_engine(seed=6)
    mgr = ck.CheckpointManager(root, keep=2, layout=layout, config={"model": MODEL})
    path = mgr.find_resume("must")
    state = mgr.load(engine, path)
    rest = [pipe_step(engine, s) for s in range(state["client_state"]["consumed"] + 1, 5)]
    with open(os.path.join(path, ck.MANIFEST)) as f:
        files = sorted(json.load(f)["files"])
    out["exact"]["pipe"] = {"straight": straight, "resumed": first + rest, "saved": saved, "path": path,
                            "step": state["step"], "config": state["config"], "files": files}
    return out


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("ckpt"))
    return run_ranks(_checks_on_ranks, 2, base, timeout_s=240, collective_timeout_s=30)


@pytest.mark.parametrize("stage", [1, 2, 3, "pipe"])
def test_exact_resume(rank_results, stage):
    for rank, res in enumerate(rank_results):
        r = res["exact"][stage]
        assert r["path"] == r["saved"] and r["step"] == 2
        assert r["config"] == {"model": {"kind": "mlp", "d_in": 8, "hidden": 32, "d_out": 4}}
        assert r["resumed"] == r["straight"], (rank, r)
    if stage == "pipe":  # each stage's layer files were written (and hashed) through megalite's engine
        assert any("layer_00-model_states.pt" in f for f in rank_results[0]["exact"]["pipe"]["files"])
        assert any("layer_05-model_states.pt" in f for f in rank_results[0]["exact"]["pipe"]["files"])


@pytest.mark.parametrize("name", list(CASES))
def test_corruption_matrix(rank_results, name):
    _, want, mention = CASES[name]
    got = [res["cases"][name] for res in rank_results]
    assert got[0]["auto"].get("choice") == got[1]["auto"].get("choice")  # ranks agree
    auto = got[0]["auto"]
    assert "error" not in auto, auto
    assert auto["choice"] == want, auto["report"]
    assert mention in auto["report"], auto["report"]
    assert all(g["auto"]["seconds"] < 20 for g in got)  # detected quickly, no hang
    for g in got:
        if want is None:
            assert "no complete, verified checkpoint" in g["must"]["error"]
            assert mention in g["must"]["error"]
        else:
            assert g["must"].get("choice") == want
    # Every rejected checkpoint was moved aside (quarantined), never deleted, never counted as a candidate again.
    rejected = 0 if want == "step00000002" else 2 if want is None else 1
    assert len(got[0]["quarantined"]) == rejected, got[0]["quarantined"]
    assert all(q.startswith("rejected-step0000000") for q in got[0]["quarantined"])


def test_mismatch_names_field_and_refuses(rank_results):
    for res in rank_results:
        lay = res["cases"]["layout_mismatch"]["auto"]
        assert "layout.tp is 1 but this run is configured with 2" in lay["error"]
        assert "step00000002/manifest.json" in lay["error"]
        mod = res["cases"]["model_mismatch"]["auto"]
        assert "model.hidden is 32 but this run is configured with 64" in mod["error"]


def test_nothing_to_resume(rank_results):
    for res in rank_results:
        assert res["cases"]["nothing"]["auto"]["choice"] is None
        assert "starting fresh" in res["cases"]["nothing"]["auto"]["report"]
        assert "no complete, verified checkpoint" in res["cases"]["nothing"]["must"]["error"]
        assert res["fallback_load_step"] == 1


def test_doctored_checkpoint_is_refused_and_payload_never_runs(rank_results):
    for res in rank_results:
        doc = res["doctored"]
        assert doc["control"]["control_ran"] is True  # positive control: plain torch.load runs it
        assert doc["auto"]["choice"] == "step00000001"
        assert MODEL_STATES in doc["auto"]["report"] and "builtins.exec" in doc["auto"]["report"]
        assert MODEL_STATES in doc["load"] and "refus" in doc["load"]
        assert MODEL_STATES in doc["deepspeed_load"] and "exec" in doc["deepspeed_load"]
        assert not doc["marker_after_find"] and not doc["marker_at_end"]
    assert MODEL_STATES in rank_results[0]["doctored"]["safe_torch_load"]
