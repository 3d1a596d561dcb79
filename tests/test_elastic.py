"""Elastic resume: a run saved at layout A continues at layout B with its optimizer state, schedule and sample position.

For each transition: train 3 steps at A and save; (a) continue at A to step 6, (b) resume the saved checkpoint at B
to step 6. The losses of (b) match (a), and right after the reshard the optimizer state at B equals A's
consolidated state bit for bit (it is data movement). fp32, dropout off, CPU and gloo.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from megalite import config as C
from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import tiny_config, write_token_dataset

LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "num_kv_heads": 2,
         "tied_embeddings": False, "ffn_hidden_size": 64}
ZERO = {0: {"zero_optimization": {"stage": 0}}, 1: {"zero_optimization": {"stage": 1}},
        3: {"zero_optimization": {"stage": 3}}}


def _layout(tensor: int = 1, pipeline: int = 1, micro: int = 2, accumulation: int = 1, zero: int = 1) -> dict:
    return {"parallel": {"tensor": tensor, "pipeline": pipeline},
            "deepspeed": {**ZERO[zero], "train_micro_batch_size_per_gpu": micro,
                          "gradient_accumulation_steps": accumulation}}


def _run(workdir: str, name: str, family: str, steps: int, layout: dict, source: str | None = None,
         **train) -> dict:
    """Train `name` to `steps` (from `source`'s saved checkpoint when given); returns losses, the sample ids every
    rank read, and, after a resume, the largest difference between the engine's state and the source's."""
    import torch.distributed as dist

    from megalite.distributed import all_gather_objects
    from megalite.engine.trainer import Trainer

    out_dir = f"{workdir}/{name}"
    if source is not None and dist.get_rank() == 0 and not os.path.exists(out_dir):
        shutil.copytree(f"{workdir}/{source}.saved", out_dir)
    dist.barrier()
    raw = tiny_config(f"{workdir}/tok", out_dir, train={"steps": steps, "checkpoint_interval": 3, **train},
                      **layout)
    if family == "llama":
        raw["model"].update(LLAMA)
    trainer = Trainer(C.from_dict(raw))
    seen: list[int] = []
    dataset = trainer.train_set

    class Recorder:  # the sample ids this rank reads
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int):
            seen.append(int(i))
            return dataset[i]

    trainer.train_set = Recorder()
    checked: dict = {}
    original = trainer.train_step

    def first_step(timer):
        if not checked and source is not None:  # right after the reshard, before any step at layout B
            # Against the source run's own state, taken from its engine just before it saved (not read back through
            # the reader that fed the reshard): the same parameters, the same moments, every value.
            expected = torch.load(f"{workdir}/{source}.state.pt")
            mine = _whole_state(trainer)
            checked["same_keys"] = set(mine) == set(expected) and all(
                set(state.moments) == set(expected[n][1]) for n, state in mine.items() if n in expected)
            worst = 0.0
            for name_, state in mine.items():
                fp32, moments = expected[name_]
                worst = max(worst, float((state.fp32 - fp32).abs().max().detach()))
                for key, value in state.moments.items():
                    worst = max(worst, float((value - moments[key]).abs().max()))
            checked["max_state_diff"] = worst
        checked.setdefault("done", True)
        return original(timer)

    trainer.train_step = first_step
    if source is None and steps == 3:  # the checkpoint the transitions resume: keep the engine's state as it saves
        save = trainer.checkpoints.save

        def save_and_keep_state(step: int, last: bool = False) -> str | None:
            if step == 3:
                state = _whole_state(trainer)  # collective
                if dist.get_rank() == 0:
                    torch.save({n: (p.fp32, p.moments) for n, p in state.items()}, f"{out_dir}.state.pt")
            return save(step, last=last)

        trainer.checkpoints.save = save_and_keep_state
    code = trainer.train()
    return {"exit": code, "losses": [r["loss"] for r in trainer.sink.records if r.get("kind") == "train"],
            "start": trainer.start_step, "seen": sorted(i for ids in all_gather_objects(seen) for i in ids),
            "max_state_diff": checked.get("max_state_diff"), "same_keys": checked.get("same_keys"),
            "resharded": [r for r in trainer.sink.records if r.get("kind") == "reshard"]}


def _whole_state(trainer) -> dict:
    """The engine's whole training state by canonical name on every rank (collective): each pipeline stage's, joined;
    a parameter two stages hold (the tied embedding) is the first stage's, as a checkpoint's reader takes it."""
    from megalite.distributed import all_gather_objects
    from megalite.engine.elastic import full_state_of

    whole: dict = {}
    for stage in all_gather_objects(full_state_of(trainer.engine, trainer.grid)):  # ranks in order: stage 0 first
        for name, state in stage.items():
            whole.setdefault(name, state)
    return whole


def _source(workdir: str, name: str, family: str, layout: dict) -> dict:
    """Train 3 steps and keep the checkpoint (`name.saved`); then continue the same run to step 6."""
    import torch.distributed as dist

    first = _run(workdir, name, family, 3, layout)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.copytree(f"{workdir}/{name}", f"{workdir}/{name}.saved")
    dist.barrier()
    rest = _run(workdir, name, family, 6, layout)
    return {"losses": first["losses"] + rest["losses"], "seen_first": first["seen"], "seen_rest": rest["seen"]}


def _two_ranks_dense(workdir: str) -> dict:
    from megalite.errors import MegaliteError

    out = {"gpt_dp2": _source(workdir, "gpt_dp2", "gpt", _layout()),
           "gpt_z3": _source(workdir, "gpt_z3", "gpt", _layout(zero=3)),
           "llama_tp2": _source(workdir, "llama_tp2", "llama", _layout(tensor=2, micro=4))}
    out["z1_to_z3"] = _run(workdir, "z1_to_z3", "gpt", 6, _layout(zero=3), "gpt_dp2")
    out["z3_to_z0"] = _run(workdir, "z3_to_z0", "gpt", 6, _layout(zero=0), "gpt_z3")
    out["tp2_to_dp2"] = _run(workdir, "tp2_to_dp2", "llama", 6, _layout(), "llama_tp2")
    out["tp1_to_tp2"] = _run(workdir, "tp1_to_tp2", "gpt", 6, _layout(tensor=2, micro=4), "gpt_dp2")
    bf16 = _layout()
    bf16["deepspeed"]["bf16"] = {"enabled": True}
    out["fp32_to_bf16"] = _run(workdir, "fp32_to_bf16", "gpt", 6, bf16, "gpt_dp2")
    out["batch_allowed"] = _run(workdir, "batch_allowed", "gpt", 6, _layout(micro=4), "gpt_dp2",
                                allow_batch_change=True)
    refusals = {}
    sgd = {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}
    for case, layout, model, optimizer in (("shape", _layout(), {"hidden_size": 64}, None),
                                           ("batch", _layout(micro=4), {}, None),
                                           ("optimizer", _layout(tensor=2, micro=4), {}, sgd)):
        try:
            _run_refused(workdir, f"refused-{case}", layout, model, optimizer)
            refusals[case] = "no error"
        except MegaliteError as e:
            refusals[case] = str(e)
    out["refusals"] = refusals
    return out


def _run_refused(workdir: str, name: str, layout: dict, model: dict, optimizer: dict | None) -> None:
    import torch.distributed as dist

    from megalite.engine.trainer import Trainer

    out_dir = f"{workdir}/{name}"
    if dist.get_rank() == 0:
        shutil.copytree(f"{workdir}/gpt_dp2.saved", out_dir)
    dist.barrier()
    raw = tiny_config(f"{workdir}/tok", out_dir, train={"steps": 6, "resume": "must"}, **layout)
    raw["model"].update(model)
    if optimizer is not None:
        raw["deepspeed"]["optimizer"] = optimizer
    Trainer(C.from_dict(raw)).train()


def _four_ranks(workdir: str) -> dict:
    out = {"dp2_to_dp4": _run(workdir, "dp2_to_dp4", "gpt", 6, _layout(micro=1), "gpt_dp2"),
           "gpt_dp4": _source(workdir, "gpt_dp4", "gpt", _layout(micro=1))}
    # Pipelines last: DeepSpeed cannot build a plain engine in a process that has built a PipelineModule.
    out["gpt_pp2"] = _source(workdir, "gpt_pp2", "gpt", _layout(pipeline=2, micro=1, accumulation=2))
    out["llama_tp2pp2"] = _source(workdir, "llama_tp2pp2", "llama", _layout(tensor=2, pipeline=2, micro=2,
                                                                              accumulation=2))
    return out


def _two_ranks_again(workdir: str) -> dict:
    out = {"dp4_to_dp2": _run(workdir, "dp4_to_dp2", "gpt", 6, _layout(), "gpt_dp4"),
           "offline": _run(workdir, "offline", "gpt", 6, _layout(tensor=2, micro=4), "offline_tp2")}
    out["pp1_to_pp2"] = _run(workdir, "pp1_to_pp2", "gpt", 6, _layout(pipeline=2, micro=2, accumulation=2), "gpt_dp2")
    return out


def _four_ranks_dense(workdir: str) -> dict:
    return {"pp2_to_dp4": _run(workdir, "pp2_to_dp4", "gpt", 6, _layout(micro=1), "gpt_pp2"),
            "tp2pp2_to_dp4": _run(workdir, "tp2pp2_to_dp4", "llama", 6, _layout(micro=1), "llama_tp2pp2")}


@pytest.fixture(scope="module")
def elastic(tmp_path_factory) -> dict:
    from megalite.engine.reshard_offline import reshard

    d = tmp_path_factory.mktemp("elastic")
    write_token_dataset(str(d / "tok"))
    work = str(d)
    results = run_ranks(_two_ranks_dense, 2, work, timeout_s=500, collective_timeout_s=90)[0]
    results.update(run_ranks(_four_ranks, 4, work, timeout_s=500, collective_timeout_s=90)[0])
    # The offline command, from the TP1 x DP2 checkpoint to TP2 x DP1; resumed below like any checkpoint.
    os.makedirs(f"{work}/offline_tp2.saved")
    results["offline_written"] = reshard(f"{work}/gpt_dp2.saved", f"{work}/offline_tp2.saved/checkpoints", 2, 1, 1)
    shutil.copy(f"{work}/gpt_dp2.state.pt", f"{work}/offline_tp2.state.pt")  # what the offline reshard must hold
    results.update(run_ranks(_two_ranks_again, 2, work, timeout_s=500, collective_timeout_s=90)[0])
    results.update(run_ranks(_four_ranks_dense, 4, work, timeout_s=500, collective_timeout_s=90)[0])
    results["workdir"] = work
    return results


TRANSITIONS = {  # transition -> the source run it continues
    "z1_to_z3": "gpt_dp2", "z3_to_z0": "gpt_z3", "tp2_to_dp2": "llama_tp2", "tp1_to_tp2": "gpt_dp2",
    "dp2_to_dp4": "gpt_dp2", "dp4_to_dp2": "gpt_dp4", "pp1_to_pp2": "gpt_dp2", "pp2_to_dp4": "gpt_pp2",
    "tp2pp2_to_dp4": "llama_tp2pp2", "offline": "gpt_dp2", "fp32_to_bf16": "gpt_dp2",
}


@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_resume_on_another_layout_continues_the_run(elastic, transition):
    run, source = elastic[transition], elastic[TRANSITIONS[transition]]
    assert run["exit"] == 0 and run["start"] == 3
    # Data movement only: the engine holds the source run's own state, bit for bit, parameter and moment sets equal.
    assert run["same_keys"] is True and run["max_state_diff"] == 0.0, (run["same_keys"], run["max_state_diff"])
    if transition != "offline":  # the offline checkpoint already has the target layout: DeepSpeed's own loader
        assert len(run["resharded"]) == 1 or not run["losses"]
    if run["losses"]:  # rank 0 logs
        continued = source["losses"][3:]
        assert len(run["losses"]) == 3
        tolerance = 2e-2 if transition == "fp32_to_bf16" else 1e-5  # bf16 compute from the same fp32 master
        for mine, theirs in zip(run["losses"], continued):
            assert abs(mine - theirs) <= tolerance * abs(theirs), (transition, run["losses"], continued)


def test_a_batch_change_when_allowed_continues_from_the_sample_position(elastic):
    source, run = elastic["gpt_dp2"], elastic["batch_allowed"]
    assert run["exit"] == 0 and run["start"] == 3
    assert len(run["seen"]) == 3 * 8  # three steps of the new global batch (2 ranks x micro-batch 4)
    assert not set(run["seen"]) & set(source["seen_first"])  # no sample of the first three steps again
    assert run["resharded"] == []  # same parallel layout: DeepSpeed's own loader, only the batch differs


def test_every_sample_is_seen_exactly_once_across_a_data_parallel_change(elastic):
    source, resumed = elastic["gpt_dp2"], elastic["dp2_to_dp4"]
    straight = source["seen_first"] + source["seen_rest"]
    across = source["seen_first"] + resumed["seen"]
    assert sorted(across) == sorted(straight)
    assert len(set(across)) == len(across)  # within the first epoch: no sample twice


def test_offline_reshard_gives_the_online_losses(elastic):
    assert elastic["offline_written"].endswith("step00000003")
    assert elastic["offline"]["losses"] == elastic["tp1_to_tp2"]["losses"]


def test_refusals_name_what_cannot_carry_over(elastic, tmp_path):
    refusals = elastic["refusals"]
    assert "model.hidden_size is 32 but this run is configured with 64" in refusals["shape"], refusals["shape"]
    assert "train.allow_batch_change" in refusals["batch"] and "global batch of 4" in refusals["batch"]
    assert "optimizer is 'AdamW' there but 'SGD' in this run" in refusals["optimizer"], refusals["optimizer"]


def test_a_corrupted_source_is_found_by_its_hash_before_loading(elastic, tmp_path):
    from megalite.checkpoint.reshard import TrainingState
    from megalite.errors import CheckpointError

    copy = tmp_path / "copy"
    source = next(Path(p) for p in Path(elastic["offline_written"]).parent.parent.parent.glob("gpt_dp2.saved"))
    shutil.copytree(source, copy)
    target = next((copy / "checkpoints").glob("step*/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: SHA-256 does not match"):
        TrainingState(copy)
    torch.manual_seed(0)


def test_offline_reshard_never_writes_into_its_source(elastic, tmp_path, monkeypatch):
    """`checkpoint reshard --out` inside or around the source's step directory, checkpoint root or run directory is
    refused before anything is written (it would become part of the run it came from); a disk without room for the
    result is refused up front, saying so; the source stays intact."""
    from megalite.checkpoint import committed_steps, verify_checkpoint
    from megalite.engine import reshard_offline
    from megalite.errors import CheckpointError

    run = Path(elastic["workdir"]) / "gpt_dp2.saved"
    step_dir = run / "checkpoints" / "step00000003"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out, what in ((step_dir, "is the source's step directory"), (step_dir / "sub", "step directory"),
                      (run / "checkpoints", "is the source's checkpoint root"), (run, "run directory"),
                      (run / "resharded", "run directory"), (run.parent, "overlaps")):
        with pytest.raises(CheckpointError, match=what) as refused:
            reshard_offline.reshard(run, out, 2, 1, 1)
        assert "--out" in str(refused.value)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written
    verify_checkpoint(step_dir)
    assert [s for s, _ in committed_steps(run / "checkpoints")] == [3]
    monkeypatch.setattr(reshard_offline, "checkpoint_bytes", lambda cfg: 1 << 60)
    with pytest.raises(CheckpointError, match="not enough free space"):
        reshard_offline.reshard(run, tmp_path / "elsewhere", 2, 1, 1)
    assert not (tmp_path / "elsewhere").exists()
