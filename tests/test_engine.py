"""The DeepSpeed engine against a plain PyTorch training loop: same losses, norms and weights."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from megalite import config as C
from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import init_from_report, reference_optimizer, tiny_config, write_token_dataset

STEPS = 10


def _full_parameters(run) -> dict[str, torch.Tensor]:
    """This run's full fp32 parameters (TP shards, PP stages and ZeRO-3 partitions gathered), on every rank."""
    import deepspeed
    import torch.distributed as dist

    from megalite.model import full_state_dict, tensor_parallel_group
    from megalite.model.pipeline import canonical_parameters
    from megalite.parallel.sharding import gather_tensor

    module = run.engine.module
    group = tensor_parallel_group(run.grid)
    if run.cfg.parallel.pipeline == 1:
        stage3 = run.engine.zero_optimization_stage() == 3
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=stage3):
            state = full_state_dict(module, group)
        return {k: v.detach().float().clone() for k, v in state.items()}
    mine = {k: gather_tensor(p, p, group).float() for k, p in canonical_parameters(module).items()}
    stages: list = [None] * run.grid.get_pipe_parallel_world_size()
    dist.all_gather_object(stages, mine, group=run.grid.get_pipe_parallel_group())
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        for k, v in stage.items():
            merged.setdefault(k, v)  # a tied embedding appears on the first and last stage; take the first
    return merged


def _optimizer_state_numel(engine) -> int:
    """Elements of Adam's first moment held by this rank."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)


# Packed documents: positions restart and attention stops at every EOD (Megatron's two reset options).
DOCUMENTS = {"reset_position_ids": True, "reset_attention_mask": True}
CHUNKED_Z = {"loss_chunk_tokens": 5, "z_loss": 1e-3}


def _model_parallel_variants(workdir: str) -> dict:
    zero1 = {"zero_optimization": {"stage": 1}}
    return _train_runs(workdir, [  # pipeline runs last: DeepSpeed cannot build a plain engine after one
        ("tp2", {"parallel": {"tensor": 2}, "deepspeed": zero1}),
        ("tp2sp", {"parallel": {"tensor": 2, "sequence_parallel": True}, "deepspeed": zero1}),
        ("tp2sp_docs", {"parallel": {"tensor": 2, "sequence_parallel": True}, "deepspeed": zero1,
                        "data": DOCUMENTS}),
        # ZeRO-0 (tiny_config's stage): megalite computes the norm itself and clips with it, summing the TP shards.
        ("tp2_zero0", {"parallel": {"tensor": 2}}),
        ("tp2sp_zero0", {"parallel": {"tensor": 2, "sequence_parallel": True}}),
        ("pp2", {"parallel": {"pipeline": 2}, "deepspeed": zero1}),
        ("tp2pp2", {"parallel": {"tensor": 2, "pipeline": 2},
                    "deepspeed": {**zero1, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}}),
        ("pp2_docs", {"parallel": {"pipeline": 2}, "deepspeed": zero1, "data": DOCUMENTS}),
        # The tied output layer applied inside the loss function, 5 tokens at a time, with the z-loss.
        ("pp2_chunked", {"parallel": {"pipeline": 2}, "deepspeed": zero1, "model": CHUNKED_Z}),
    ])


def _dir_bytes(root: str, step: int) -> int:
    """Bytes of the committed checkpoint of `step` under `root`."""
    path = os.path.join(root, f"step{step:08d}")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _train_runs(workdir: str, variants: list[tuple[str, dict]]) -> dict:
    """Train each variant for STEPS steps; return per-variant losses, grad norms and final weights."""
    from megalite.engine.preflight import checkpoint_bytes
    from megalite.engine.trainer import Trainer

    out = {}
    for name, sections in variants:
        raw = tiny_config(f"{workdir}/tok", f"{workdir}/{name}", **sections)
        cfg = C.from_dict(raw)
        run = Trainer(cfg)
        code = run.train()
        records = [r for r in run.sink.records if r.get("kind") == "train"]
        out[name] = {
            "exit": code,
            "losses": [r["loss"] for r in records],
            "grad_norms": [r["grad_norm"] for r in records],
            "stage": run.engine.zero_optimization_stage(),
            "engine": type(run.engine).__name__,
            "tp_pp": (run.grid.get_tensor_model_parallel_world_size(), run.grid.get_pipe_parallel_world_size()),
            "opt_numel": _optimizer_state_numel(run.engine),
            "params": _full_parameters(run),
            "num_params": sum(p.numel() for p in run.engine.module.parameters()),
            "checkpoint_bytes": _dir_bytes(run.checkpoints.store.root, run.checkpoints.store.latest_step()),
            "checkpoint_estimate": checkpoint_bytes(cfg),
        }
        del run
    return out


def _reference(workdir: str, global_batch: int, clip: float, data: dict | None = None,
               model_options: dict | None = None, deepspeed: dict | None = None, micro_batch: int | None = None) -> dict:
    """A plain PyTorch loop on one process: same model init, data order, AdamW groups, schedule, clipping.

    data: DOCUMENTS for packed documents (positions and document ids go to the model); model_options: ModelConfig
    fields to set (the z-loss); deepspeed: the run's DeepSpeed section when not tiny_config's (optimizer and
    schedule parameters are read from it); micro_batch: run each step's batch in consecutive slices of this many
    samples, the mean of their losses (as data-parallel ranks and accumulation steps see them; FP8's dynamic
    scales depend on the slice)."""
    from megalite.data import ResumableSampler, build_datasets
    from megalite.model import build_model

    data = data or {}
    raw = tiny_config(f"{workdir}/tok", f"{workdir}/reference", data=data, model=model_options or {})
    if deepspeed is not None:
        raw["deepspeed"] = deepspeed
    cfg = C.from_dict(raw)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, C.ParallelConfig(), None, seed=cfg.train.seed)
    train_set, _, _ = build_datasets([f"{workdir}/tok"], None, cfg.data.split, cfg.data.seq_length, cfg.train.seed,
                                     cache_dir=cfg.data.cache_dir, vocab_size=cfg.model.vocab_size, **data)
    sampler = iter(ResumableSampler(len(train_set), 0, 1, global_batch, cfg.train.seed))
    opt, sched = reference_optimizer(model, cfg, total_num_steps=STEPS)
    losses, norms = [], []
    for _ in range(STEPS):
        items = [train_set[i] for i in next(sampler)]
        opt.zero_grad()
        slices = [items[i : i + (micro_batch or global_batch)] for i in range(0, global_batch, micro_batch or global_batch)]
        loss = 0.0
        for part in slices:
            batch = {k: torch.stack([it[k] for it in part]) for k in part[0]}
            extra = {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"]} if data else {}
            part_loss = model(batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"], **extra)
            (part_loss / len(slices)).backward()
            loss = loss + part_loss.detach() / len(slices)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        sched.step()
        losses.append(loss.item())
    return {"losses": losses, "grad_norms": norms, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _zero_stages_and_accumulation(workdir: str) -> dict:
    variants = [(f"zero{s}", {"deepspeed": {"zero_optimization": {"stage": s}}}) for s in (0, 1, 2, 3)]
    variants.append(("accumulate", {"deepspeed": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                                                  "zero_optimization": {"stage": 1}}}))
    return _train_runs(workdir, variants)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("engine")
    write_token_dataset(str(d / "tok"))
    return str(d)


def _assert_close_to_reference(result: dict, ref: dict, name: str, logs: bool = True) -> None:
    """Losses and norms (logged by rank 0 only) and the final weights (every rank) match the reference."""
    assert result["exit"] == 0, name
    assert len(result["losses"]) == (STEPS if logs else 0), name
    for step, (a, b) in enumerate(zip(result["losses"], ref["losses"])):
        assert abs(a - b) < 1e-5, f"{name}: step {step + 1} loss {a} vs reference {b}"
    for step, (a, b) in enumerate(zip(result["grad_norms"], ref["grad_norms"])):
        assert a is not None and abs(a - b) < 1e-4 * max(1.0, b), f"{name}: step {step + 1} grad norm {a} vs {b}"
    assert set(result["params"]) == set(ref["params"]), name
    # Adam divides by sqrt of the second moment, so a near-zero gradient's rounding noise moves its weight by up
    # to lr: weights get a looser bound than the losses (each step here moves weights by up to lr = 1e-2).
    for k, v in ref["params"].items():
        torch.testing.assert_close(result["params"][k], v, atol=1e-4, rtol=1e-3, msg=lambda m, k=k: f"{name} {k}: {m}")


def test_zero_stages_match_plain_pytorch(workdir):
    results = run_ranks(_zero_stages_and_accumulation, 2, workdir, timeout_s=400, collective_timeout_s=60)
    ref = _reference(workdir, global_batch=4, clip=0.5)
    assert ref["grad_norms"][0] > 0.5, "clipping must be active in at least one step of this test"
    assert ref["losses"][-1] < ref["losses"][0]
    for rank, rank_result in enumerate(results):
        for s in (0, 1, 2, 3):
            r = rank_result[f"zero{s}"]
            assert r["stage"] == s
            _assert_close_to_reference(r, ref, f"ZeRO-{s} rank {rank}", logs=rank == 0)
            if s >= 1:  # Adam's state is partitioned over the 2 data-parallel ranks
                total = r["num_params"] if s < 3 else sum(v.numel() for v in r["params"].values())
                assert abs(r["opt_numel"] - total / 2) <= 0.05 * total, (s, r["opt_numel"], total)
            # ZeRO-0's norm (megalite's float64 one) is the norm ZeRO-1/2/3 report
            for a, b in zip(r["grad_norms"], rank_result["zero1"]["grad_norms"]):
                assert abs(a - b) <= 1e-6 * b, (s, a, b)
            # preflight's size estimate against the bytes this run's checkpoint really has on disk
            print(f"ZeRO-{s} fp32 checkpoint: {r['checkpoint_bytes']} bytes, estimate {r['checkpoint_estimate']}")
            assert abs(r["checkpoint_estimate"] / r["checkpoint_bytes"] - 1) < 0.10, (s, r["checkpoint_bytes"])
        _assert_close_to_reference(rank_result["accumulate"], ref, "micro 1 x accumulation 2", logs=rank == 0)


def test_tensor_and_pipeline_parallel_match_plain_pytorch(workdir):
    """TP2 x DP2 (with and without sequence parallelism, at ZeRO-1 and ZeRO-0), PP2 x DP2 and TP2 x PP2 on 4 ranks,
    against the plain loop;
    packed documents at TP2+SP and through pipeline stages against TP1 with the same documents; the chunked
    loss (model.loss_chunk_tokens) with the z-loss through the pipeline's tied head."""
    results = run_ranks(_model_parallel_variants, 4, workdir, timeout_s=500, collective_timeout_s=90)
    ref = _reference(workdir, global_batch=4, clip=0.5)
    ref_docs = _reference(workdir, global_batch=4, clip=0.5, data=DOCUMENTS)
    ref_z = _reference(workdir, global_batch=4, clip=0.5, model_options={"z_loss": CHUNKED_Z["z_loss"]})
    assert ref_z["losses"][0] - ref["losses"][0] > 1e-4, "the z-loss must add to the training loss"
    assert abs(ref_docs["losses"][0] - ref["losses"][0]) > 1e-3, "the document mask must change the loss"
    for rank, rank_result in enumerate(results):
        for name, tp_pp in (("tp2", (2, 1)), ("tp2sp", (2, 1)), ("tp2_zero0", (2, 1)), ("tp2sp_zero0", (2, 1)),
                            ("pp2", (1, 2)), ("tp2pp2", (2, 2)),
                            ("tp2sp_docs", (2, 1)), ("pp2_docs", (1, 2)), ("pp2_chunked", (1, 2))):
            r = rank_result[name]
            assert r["tp_pp"] == tp_pp
            assert r["stage"] == (0 if name.endswith("_zero0") else 1), name
            assert r["engine"] == ("PipelineEngine" if tp_pp[1] > 1 else "DeepSpeedEngine")
            expected = ref_docs if name.endswith("_docs") else ref_z if name == "pp2_chunked" else ref
            _assert_close_to_reference(r, expected, f"{name} rank {rank}", logs=rank == 0)


def _lr_sequence(scheduler, optimizer, steps: int) -> list[float]:
    """The learning rate each of `steps` optimizer steps uses (the scheduler steps after each)."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing, keeps torch's step order
        scheduler.step()
    return out


def _dummy_optimizer(lr: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_deepspeed_schedules_equal_deepspeeds_classes():
    """Every DeepSpeed schedule megalite accepts gives, step by step, the learning rate DeepSpeed's class of the same
    name gives for the same parameters (its defaults included: log warm-up, WarmupDecayLR's warmup_max_lr 0.001,
    total_num_steps from train.steps when not given), over a grid of parameters."""
    import inspect
    import itertools

    from deepspeed.runtime import lr_schedules

    from megalite.config import DEEPSPEED_SCHEDULERS, SCHEDULERS
    from megalite.engine.build import build_schedule

    for name in DEEPSPEED_SCHEDULERS:  # megalite knows every parameter DeepSpeed's class takes, and no other
        cls_params = set(inspect.signature(getattr(lr_schedules, name)).parameters)
        assert SCHEDULERS[name] == cls_params - {"optimizer", "last_batch_iteration"}, name
    grid = {
        "WarmupLR": [{}, {"warmup_num_steps": 4}, {"warmup_num_steps": 7, "warmup_type": "linear"},
                     {"warmup_num_steps": 5, "warmup_min_lr": 0.001, "warmup_max_lr": 0.02, "warmup_type": "log"}],
        "WarmupDecayLR": [{"warmup_num_steps": w, "warmup_type": t, **lrs} for w, t, lrs in itertools.product(
            (1, 3, 8), ("log", "linear"), ({}, {"warmup_min_lr": 0.002, "warmup_max_lr": 0.05}))],
        "WarmupCosineLR": [{"warmup_num_steps": w, "warmup_type": t, **r} for w, t, r in itertools.product(
            (1, 3, 8), ("log", "linear"), ({}, {"warmup_min_ratio": 0.1, "cos_min_ratio": 0.2}))],
    }
    for name, cases in grid.items():
        for params, total in itertools.product(cases, (6, 20)):
            ours = _dummy_optimizer()
            mine = _lr_sequence(build_schedule(ours, {"type": name, "params": dict(params)}, total), ours, total + 3)
            ref = _dummy_optimizer()
            args = dict(params) if name == "WarmupLR" else {"total_num_steps": total, **params}
            theirs = _lr_sequence(getattr(lr_schedules, name)(ref, **args), ref, total + 3)
            assert mine == theirs, (name, params, total, mine, theirs)
    # A few values written out: DeepSpeed's cosine starts at 0 (its first step uses last_batch_iteration -1), warms
    # up logarithmically by default, and ends at cos_min_ratio.
    opt = _dummy_optimizer(1.0)
    seq = _lr_sequence(build_schedule(opt, {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 4,
                                                                                  "cos_min_ratio": 0.1}}, 10), opt, 12)
    assert seq[0] == 0.0 and seq[1] == 0.0 and seq[2] == pytest.approx(math.log(2) / math.log(4))
    assert seq[-1] == pytest.approx(0.1)


def test_megalite_schedules_follow_their_formulas():
    """WarmupStableDecay and Constant against values computed by hand (the README's formulas)."""
    from megalite.engine.build import build_schedule

    opt = _dummy_optimizer(1.0)
    wsd = {"type": "WarmupStableDecay", "params": {"warmup_num_steps": 2, "warmup_min_ratio": 0.5,
                                                   "total_num_steps": 10, "decay_num_steps": 4, "min_ratio": 0.1}}
    got = _lr_sequence(build_schedule(opt, wsd, 99), opt, 12)
    # s = 0, 1: warm-up 0.5 + 0.5 (s+1)/2; s = 2..5: 1; s = 6..10: 0.1 + 0.9 (10 - s)/4; after: 0.1
    want = [0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]
    assert got == pytest.approx(want)
    opt = _dummy_optimizer(0.3)
    assert _lr_sequence(build_schedule(opt, {"type": "Constant"}, 5), opt, 5) == [0.3] * 5
    opt = _dummy_optimizer(0.3)
    assert _lr_sequence(build_schedule(opt, None, 5), opt, 3) == [0.3] * 3  # no scheduler: constant


def test_zero0_gradient_norm_is_accurate_where_torchs_cpu_norm_is_not():
    """Why ZeRO-0 drifted from ZeRO-1/3 (issue 14 item 12): torch's CPU fp32 norm of a large tensor accumulates an
    error that grows with its size, and DeepSpeed's ZeRO-0 clipping took per-parameter fp32 norms. megalite's
    ZeRO-0 norm (also used to clip) sums squares in float64."""
    from megalite.engine.strategy import clip_gradients, global_grad_norm

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(10_000_000))
    p.grad = torch.randn(10_000_000) * 1e-3
    exact = float(p.grad.double().norm())
    assert abs(float(p.grad.norm()) / exact - 1) > 1e-5  # positive control: torch's fp32 norm is off here
    assert abs(global_grad_norm([p], None) / exact - 1) < 1e-12
    clip_gradients([p], exact, 0.5 * exact)
    assert float(p.grad.double().norm()) == pytest.approx(0.5 * exact, rel=1e-6)
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert math.isnan(global_grad_norm([q], None))


def test_every_configured_optimizer_and_schedule_is_built():
    """config names the optimizers and schedules (and validates their parameters); build implements each name."""
    from megalite import config as cfg_mod
    from megalite.engine import build

    assert set(build.OPTIMIZER_BUILDERS) == set(cfg_mod.OPTIMIZERS)
    assert set(build.SCHEDULES) | set(cfg_mod.DEEPSPEED_SCHEDULERS) == set(cfg_mod.SCHEDULERS)
    assert not set(build.SCHEDULES) & set(cfg_mod.DEEPSPEED_SCHEDULERS)


def test_optimizer_mapping_and_no_decay_groups():
    from megalite.engine.build import build_optimizer
    from megalite.model import build_model

    cfg = C.from_dict(tiny_config("x", "y"))
    model = build_model(cfg.model, C.ParallelConfig(), None, seed=1)
    adamw = build_optimizer(model, {"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.1}})
    adam = build_optimizer(model, {"type": "Adam", "params": {"lr": 0.1, "weight_decay": 0.1}})
    sgd = build_optimizer(model, {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.8}})
    assert type(adamw) is torch.optim.AdamW and type(adam) is torch.optim.Adam and type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["momentum"] == 0.8
    decayed = {id(p) for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        should_decay = p.ndim >= 2 and "embedding" not in name
        assert (id(p) in decayed) == should_decay, name


def test_metrics_and_plot_written(workdir, tmp_path):
    """A single plain process (no launcher) trains, logs JSON Lines with MFU inputs, and plots."""
    import subprocess
    import sys

    raw = tiny_config(f"{workdir}/tok", str(tmp_path / "run"), train={
        "steps": 4, "eval_interval": 2,
        "logging": {"plot": True, "profile_start_step": 2, "profile_end_step": 3}})
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    out = subprocess.run([sys.executable, "-m", "megalite.cli", "train", str(path)], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "breakdown_s", "memory_gb"):
            assert r[key] is not None, key
        assert set(r["breakdown_s"]) >= {"data", "forward", "backward", "optimizer"}
    assert [r["step"] for r in records if r["kind"] == "valid"] == [2, 4]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert Path(tmp_path / "run" / "config.json").exists()
    traces = list((tmp_path / "run" / "profile").glob("*.json"))
    assert traces and traces[0].stat().st_size > 1000, "the profiler window must write a trace"


REPO = Path(__file__).resolve().parent.parent
OFFLOAD_ADAM = {**json.loads((REPO / "configs" / "deepspeed" / "zero3_offload.json").read_text()),
                "bf16": {"enabled": False}, "data_types": {}}


def _bf16_and_init_from(workdir: str, hf_dir: str) -> dict:
    """bf16 with fp32 master weights and fp32 accumulation; start from a Hugging Face checkpoint at TP2."""
    from megalite.engine.preflight import checkpoint_bytes
    from megalite.engine.trainer import Trainer
    from megalite.interop.hf import load_hf_state

    out = {}
    bf16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}
    run = Trainer(C.from_dict(tiny_config(f"{workdir}/tok", f"{workdir}/bf16", deepspeed=bf16)))
    out["bf16_exit"] = run.train()
    out["bf16_losses"] = [r["loss"] for r in run.sink.records if r.get("kind") == "train"]
    out["param_dtypes"] = sorted({str(p.dtype) for p in run.engine.module.parameters()})
    inner = run.engine.optimizer.optimizer  # the torch optimizer DeepSpeed drives holds the master weights
    out["master_dtypes"] = sorted({str(p.dtype) for g in inner.param_groups for p in g["params"]})
    out["adam_state_dtypes"] = sorted({str(v.dtype) for st in inner.state.values() for v in st.values()
                                       if torch.is_tensor(v) and v.ndim > 0})
    out["data_types"] = [str(t) for t in run.engine.get_data_types()]
    out["checkpoint_sizes"] = {1: (_dir_bytes(run.checkpoints.store.root, run.checkpoints.store.latest_step()),
                                   checkpoint_bytes(run.cfg))}
    del run
    for stage in (2, 3):  # the size estimate at the other ZeRO stages in bf16
        raw = tiny_config(f"{workdir}/tok", f"{workdir}/bf16-zero{stage}", train={"steps": 2},
                          deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}})
        run = Trainer(C.from_dict(raw))
        assert run.train() == 0
        out["checkpoint_sizes"][stage] = (_dir_bytes(run.checkpoints.store.root, run.checkpoints.store.latest_step()),
                                          checkpoint_bytes(run.cfg))
        del run

    llama = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "num_kv_heads": 2,
             "tied_embeddings": False, "ffn_hidden_size": 64, "norm_eps": 1e-6}
    raw = tiny_config(f"{workdir}/tok", f"{workdir}/init", parallel={"tensor": 2}, model=llama,
                      train={"init_from": hf_dir, "steps": 1})
    raw["model"]["make_vocab_size_divisible_by"] = 4
    _, theirs = load_hf_state(hf_dir, 4)
    report = init_from_report(raw, theirs)
    out["init_keys_equal"], out["init_max_diff"], out["mismatch"] = (report["keys_equal"], report["max_diff"],
                                                                     report["mismatch"])

    # Optimizer offload to the CPU (SGD: torch's own optimizer, so no CPU-Adam build is needed here).
    sgd = {"optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    run = Trainer(C.from_dict(tiny_config(f"{workdir}/tok", f"{workdir}/offload", deepspeed=sgd)))
    out["offload_exit"] = run.train()
    out["offload"] = bool(run.engine.zero_cpu_offload())
    out["offload_losses"] = [r["loss"] for r in run.sink.records if r.get("kind") == "train"]
    del run

    # The shipped ZeRO-3 offload config (parameters and optimizer on the CPU, AdamW as DeepSpeed's CPU Adam, built
    # on first use), in fp32 so that it can be held to the plain loop's losses.
    run = Trainer(C.from_dict(tiny_config(f"{workdir}/tok", f"{workdir}/offload-adam", deepspeed=OFFLOAD_ADAM)))
    out["adam_offload_exit"] = run.train()
    out["adam_offload_optimizer"] = type(getattr(run.engine.optimizer, "optimizer", run.engine.optimizer)).__name__
    out["adam_offload_losses"] = [r["loss"] for r in run.sink.records if r.get("kind") == "train"]
    del run

    # init_from into a pipeline (last: no plain engine can be built in this process afterwards).
    from megalite.model.pipeline import canonical_parameters

    raw["model"]["hidden_size"] = 32
    raw["parallel"] = {"tensor": 1, "pipeline": 2}
    raw["train"]["output_dir"] = f"{workdir}/init-pp"
    raw["deepspeed"]["zero_optimization"] = {"stage": 1}
    run = Trainer(C.from_dict(raw))
    mine = {k: p.detach().float() for k, p in canonical_parameters(run.engine.module).items()}
    out["pp_init_max_diff"] = max((mine[k] - theirs[k].float()).abs().max().item() for k in mine)
    out["pp_init_names"] = sorted(mine)
    return out


def test_offloaded_adam_uses_deepspeed_cpu_adam(monkeypatch):
    """With offload_optimizer, Adam/AdamW become DeepSpeed's CPU Adam (in the right mode); the real one needs a
    two-minute JIT build, so a stand-in records how it was made."""
    import deepspeed.ops.adam

    from megalite.engine.build import build_optimizer, offloads_optimizer
    from megalite.model import build_model

    made = {}

    class Recorder(torch.optim.SGD):
        def __init__(self, groups, lr, adamw_mode, **kw):
            made.update(adamw_mode=adamw_mode, lr=lr, **kw)
            super().__init__(groups, lr=lr)

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", Recorder)
    assert offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3}})
    model = build_model(C.from_dict(tiny_config("x", "y")).model, C.ParallelConfig(), None, seed=1)
    build_optimizer(model, {"type": "AdamW", "params": {"lr": 0.1, "betas": [0.9, 0.95]}}, offload=True)
    assert made == {"adamw_mode": True, "lr": 0.1, "betas": (0.9, 0.95)}
    build_optimizer(model, {"type": "Adam", "params": {"lr": 0.2}}, offload=True)
    assert made["adamw_mode"] is False


def test_bf16_precision_policy_and_init_from_hf(workdir, tmp_path):
    import transformers

    hf = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf).save_pretrained(tmp_path / "hf")
    results = run_ranks(_bf16_and_init_from, 2, workdir, str(tmp_path / "hf"), timeout_s=300)
    ref = _reference(workdir, global_batch=4, clip=0.5)
    for rank, r in enumerate(results):
        assert r["bf16_exit"] == 0
        assert r["param_dtypes"] == ["torch.bfloat16"] and r["master_dtypes"] == ["torch.float32"]
        assert r["adam_state_dtypes"] == ["torch.float32"]
        assert r["data_types"] == ["torch.bfloat16", "torch.float32"]  # model dtype, gradient accumulation dtype
        if rank == 0:  # bf16 follows the fp32 reference closely, not exactly
            assert len(r["bf16_losses"]) == STEPS
            assert max(abs(a - b) for a, b in zip(r["bf16_losses"], ref["losses"])) < 0.05
        assert r["init_keys_equal"] and r["init_max_diff"] == 0.0
        assert r["pp_init_max_diff"] == 0.0
        stage_layers = {0: "layers.0.", 1: "layers.1."}[rank]  # 2 layers over 2 stages
        assert any(n.startswith(stage_layers) for n in r["pp_init_names"])
        assert r["offload_exit"] == 0 and r["offload"]
        if rank == 0:
            assert len(r["offload_losses"]) == STEPS and r["offload_losses"][-1] < r["offload_losses"][0]
        assert r["adam_offload_exit"] == 0 and r["adam_offload_optimizer"] == "DeepSpeedCPUAdam"
        if rank == 0:  # DeepSpeed's CPU Adam with parameters offloaded: the plain AdamW loop's losses
            offload_ref = _reference(workdir, global_batch=2 * OFFLOAD_ADAM["train_micro_batch_size_per_gpu"],
                                     clip=OFFLOAD_ADAM["gradient_clipping"], deepspeed=OFFLOAD_ADAM)
            assert len(r["adam_offload_losses"]) == STEPS
            for a, b in zip(r["adam_offload_losses"], offload_ref["losses"]):
                assert abs(a - b) < 1e-5, (r["adam_offload_losses"], offload_ref["losses"])
        assert "train.init_from" in r["mismatch"] and "hidden_size" in r["mismatch"]
        for stage, (real, estimate) in r["checkpoint_sizes"].items():  # preflight's estimate vs the bytes written
            assert abs(estimate / real - 1) < 0.10, ("bf16", stage, real, estimate)


def test_flops_count_the_attention_that_documents_leave():
    """MFU's attention term uses the keys a token attends to: the sequence, or its document under
    reset_attention_mask (token-weighted mean document length of the run's first samples)."""
    from megalite.engine.metrics import mean_document_length
    from megalite.plan import flops_per_token

    samples = [{"document_ids": torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 0, 0])}, {"document_ids": torch.zeros(10)}]
    assert mean_document_length(samples) == (9 + 4 + 25 + 100) / 20  # runs of equal ids are the documents
    cfg = C.from_dict(tiny_config("x", "y"))
    m = cfg.model
    assert flops_per_token(cfg) - flops_per_token(cfg, 6.9) == pytest.approx(
        12 * m.num_layers * m.hidden_size * (cfg.data.seq_length - 6.9))
