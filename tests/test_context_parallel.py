"""Context parallelism (parallel.context, DeepSpeed-Ulysses) against one process.

Two multi-process launches carry every distributed check:
- 4 ranks: attention under CP2 and CP4 against full-sequence float64 attention (forward and backward, odd chunk
  sizes, causal and not, documents crossing chunk boundaries, GQA with replicated kv heads, the Triton kernel once);
  the model's loss, logits and gradients at CP4, CP2 x TP2 (+SP) and CP2 x DP2 against one process; training at
  CP4, CP2 x TP2, CP2 x DP2 (ZeRO-1 and ZeRO-3) and CP2 x PP2 (Llama; GPT with tied embeddings and documents)
  against the plain PyTorch loop of tests/test_engine.py.
- 2 ranks: CP2 at ZeRO-3 with packed documents, exact resume of a CP2 run, elastic resume CP2 -> CP1 x DP2, and
  checkpoints for the Hugging Face export checks.
Llama family (GQA with 2 kv heads, RoPE, SwiGLU, untied) and GPT family (learned positions, tied), with and without
packed documents (data.reset_attention_mask).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import write_token_dataset
from tests.test_engine import CHUNKED_Z, DOCUMENTS, _assert_close_to_reference, _reference, _train_runs

LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "num_kv_heads": 2,
         "tied_embeddings": False, "ffn_hidden_size": 64}
ZERO1, ZERO3 = {"zero_optimization": {"stage": 1}}, {"zero_optimization": {"stage": 3}}
# Training runs at 4 ranks: (name, family, documents, sections). Global batch 4 everywhere (micro x data).
FOUR_RANK_RUNS = [
    ("cp4_llama_docs", "llama", True, {"parallel": {"context": 4},
                                       "deepspeed": {**ZERO1, "train_micro_batch_size_per_gpu": 4}}),
    # Sequence parallelism inside each context chunk, activation checkpointing, the chunked loss and the z-loss.
    ("cp2tp2_gpt_sp_chunked", "gpt_z", False, {
        "parallel": {"context": 2, "tensor": 2, "sequence_parallel": True},
        "model": {**CHUNKED_Z, "activation_checkpointing": True},
        "deepspeed": {**ZERO1, "train_micro_batch_size_per_gpu": 4}}),
    ("cp2dp2_llama_docs_zero1", "llama", True, {"parallel": {"context": 2}, "deepspeed": ZERO1}),
    ("cp2dp2_gpt_zero3", "gpt", False, {"parallel": {"context": 2}, "deepspeed": ZERO3}),
    # Pipeline last: DeepSpeed cannot build a plain engine in a process after a pipeline one.
    ("cp2pp2_llama", "llama", False, {"parallel": {"context": 2, "pipeline": 2}, "model": {"activation_checkpointing": True},
                                      "deepspeed": {**ZERO1, "train_micro_batch_size_per_gpu": 2,
                                                    "gradient_accumulation_steps": 2}}),
    # Tied embeddings across the stages, documents ids (the whole sequence's) passed between them.
    ("cp2pp2_gpt_docs", "gpt", True, {"parallel": {"context": 2, "pipeline": 2},
                                      "deepspeed": {**ZERO1, "train_micro_batch_size_per_gpu": 4}}),
]
SCHEDULE_STEPS = 6  # the resume checks' schedule length, fixed so that a 3-step run has the 6-step schedule


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("context")
    write_token_dataset(str(d / "tok"))
    return str(d)


# ----------------------------------------------------------------------------- attention and model (in ranks)


def _attention_checks(grids: dict) -> list[str]:
    """ContextParallelAttention against full-sequence float64 attention: forward and backward of q, k, v."""
    import torch.distributed as dist

    from megalite import kernels
    from megalite.parallel.context import ContextParallelAttention

    done = []
    for cp, grid in grids.items():
        group, rank = grid.get_sequence_parallel_group(), grid.get_sequence_parallel_rank()
        chunk = {2: 7, 4: 5}[cp]  # odd chunk sizes
        t = cp * chunk
        for kv_heads in (4, 2, 1):
            if kv_heads < cp and cp % kv_heads:
                continue
            for causal in (True, False):
                for docs in (False, True):
                    gen = torch.Generator().manual_seed(1000 * cp + 10 * kv_heads + 2 * causal + docs)
                    q = torch.randn(2, 4, t, 8, generator=gen, dtype=torch.float64)
                    k = torch.randn(2, kv_heads, t, 8, generator=gen, dtype=torch.float64)
                    v = torch.randn(2, kv_heads, t, 8, generator=gen, dtype=torch.float64)
                    dout = torch.randn(2, 4, t, 8, generator=gen, dtype=torch.float64)
                    # Documents of 3, 9 and the rest tokens in row 0 (both boundaries inside chunks, the second
                    # document spanning a chunk boundary), one document in row 1.
                    ids = torch.zeros(2, t, dtype=torch.long)
                    ids[0, 3:12], ids[0, 12:] = 1, 2
                    document_ids = ids if docs else None
                    full = [x.clone().requires_grad_() for x in (q, k, v)]
                    ref = kernels.attention_torch(*full, causal=causal, scale=0.3, document_ids=document_ids)
                    ref.backward(dout)
                    mine = [x[:, :, rank * chunk:(rank + 1) * chunk].clone().requires_grad_() for x in (q, k, v)]
                    layer = ContextParallelAttention(kernels.attention, group, 4, kv_heads)
                    out = layer(*mine, causal=causal, scale=0.3, document_ids=document_ids)
                    assert out.shape == (2, 4, chunk, 8)
                    out.backward(dout[:, :, rank * chunk:(rank + 1) * chunk])
                    where = f"cp{cp} kv{kv_heads} causal={causal} docs={docs}"
                    sl = slice(rank * chunk, (rank + 1) * chunk)
                    torch.testing.assert_close(out, ref[:, :, sl].detach(), rtol=1e-12, atol=1e-12, msg=where)
                    for name, a, b in zip("qkv", mine, full):
                        torch.testing.assert_close(a.grad, b.grad[:, :, sl], rtol=1e-12, atol=1e-12,
                                                   msg=lambda m, name=name, where=where: f"{where} d{name}: {m}")
                    done.append(where)
        # megalite's Triton kernel (interpreted, fp32) inside the all-to-all, documents and GQA replication.
        kernels.set_backend("triton")
        kernels.reset_kernel_calls()
        try:
            gen = torch.Generator().manual_seed(77)
            q, k, v, dout = (torch.randn(1, 4, t, 16, generator=gen) for _ in range(4))
            k, v = k[:, :2], v[:, :2]
            ids = torch.zeros(1, t, dtype=torch.long)
            ids[0, chunk + 1:] = 1  # a document starting just after the first chunk boundary
            full = [x.double().requires_grad_() for x in (q, k, v)]
            ref = kernels.attention_torch(*full, causal=True, scale=0.25, document_ids=ids)
            ref.backward(dout.double())
            mine = [x[:, :, rank * chunk:(rank + 1) * chunk].clone().requires_grad_() for x in (q, k, v)]
            out = ContextParallelAttention(kernels.attention, group, 4, 2)(*mine, causal=True, scale=0.25,
                                                                             document_ids=ids)
            out.backward(dout[:, :, rank * chunk:(rank + 1) * chunk])
            sl = slice(rank * chunk, (rank + 1) * chunk)
            torch.testing.assert_close(out.double(), ref[:, :, sl].detach(), rtol=1e-5, atol=1e-5)
            for a, b in zip(mine, full):
                torch.testing.assert_close(a.grad.double(), b.grad[:, :, sl], rtol=1e-5, atol=1e-5)
            calls = kernels.kernel_calls()
            assert calls.get("attention_fwd", 0) >= 1 and calls.get("attention_bwd", 0) >= 1, calls
            done.append(f"cp{cp} triton")
        finally:
            kernels.set_backend("auto")
        dist.barrier()
    return done


GPT_MODEL = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                 make_vocab_size_divisible_by=4)


def _model_checks(grids: dict) -> list[str]:
    """The model's loss, logits and gradients (each context rank's share summed over the context group, TP shards
    gathered) against the same model in one process, for both families, with and without documents."""
    import torch.distributed as dist

    from megalite.config import ModelConfig, ParallelConfig
    from megalite.model import build_model, context_parallel_group, full_grads, tensor_parallel_group

    done = []
    torch.manual_seed(0)  # the same batch on every rank
    ids = torch.randint(0, 97, (2, 20))
    labels = torch.randint(0, 97, (2, 20))
    mask = (torch.rand(2, 20) > 0.2).float()
    docs = torch.zeros(2, 20, dtype=torch.long)
    docs[0, 4:13], docs[0, 13:], docs[1, 9:] = 1, 2, 1
    for family, shape in (("gpt", GPT_MODEL), ("llama", {**GPT_MODEL, **LLAMA})):
        cfg = ModelConfig(**shape)
        for use_docs in (False, True):
            extra = {"document_ids": docs} if use_docs else {}
            ref = build_model(cfg, seed=11)
            ref_logits = ref(ids, **extra).detach()
            with torch.no_grad():
                ref_eval = ref.eval()(ids, labels=labels, loss_mask=mask, **extra)
            ref_loss = ref.train()(ids, labels=labels, loss_mask=mask, **extra)
            ref_loss.backward()
            ref_grads = full_grads(ref)
            for name, (grid, sp) in grids.items():
                parallel = ParallelConfig(tensor=grid.get_tensor_model_parallel_world_size(), sequence_parallel=sp,
                                          context=grid.get_sequence_parallel_world_size())
                model = build_model(cfg, parallel, grid, seed=11)
                where = f"{family} {name} docs={use_docs}"
                logits = model(ids, gather_logits=True, **extra).detach()
                torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5, msg=where)
                with torch.no_grad():  # evaluation at the run's CP: the same loss as one process
                    torch.testing.assert_close(model.eval()(ids, labels=labels, loss_mask=mask, **extra), ref_eval,
                                               rtol=1e-6, atol=1e-6, msg=where)
                loss = model.train()(ids, labels=labels, loss_mask=mask, **extra)
                torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-6, atol=1e-6, msg=where)
                loss.backward()
                grads = full_grads(model, tensor_parallel_group(grid))
                for key, g in ref_grads.items():
                    total = grads[key].clone()
                    dist.all_reduce(total, group=context_parallel_group(grid))  # the engine sums the shares
                    torch.testing.assert_close(total, g, rtol=1e-5, atol=1e-6,
                                               msg=lambda m, key=key, where=where: f"{where} {key}: {m}")
                done.append(where)
    model = build_model(ModelConfig(**GPT_MODEL), ParallelConfig(context=4), grids["cp4"][0], seed=11)
    with pytest.raises(ValueError, match="parallel.context=1"):  # generation runs at CP 1
        model(ids, kv_cache=model.new_kv_cache(2, 32))
    return done


def _four_ranks(workdir: str) -> dict:
    from megalite.parallel import ProcessGrid
    from tests.test_parallel_layers import no_shm_comm

    no_shm_comm()
    cp4, cp2dp2, cp2tp2 = ProcessGrid(context=4), ProcessGrid(context=2), ProcessGrid(tensor=2, context=2)
    layout = {"cp4": [cp4.get_sequence_parallel_rank(), cp4.get_data_parallel_world_size()],
              "cp2tp2": [cp2tp2.get_tensor_model_parallel_rank(), cp2tp2.get_sequence_parallel_rank(),
                         cp2tp2.get_data_parallel_world_size(), cp2tp2.get_sequence_data_parallel_world_size()],
              "cp2dp2": [cp2dp2.get_sequence_parallel_rank(), cp2dp2.get_data_parallel_rank(),
                         cp2dp2.get_sequence_data_parallel_rank()]}
    out = {"layout": layout, "attention": _attention_checks({2: cp2dp2, 4: cp4})}
    out["model"] = _model_checks({"cp4": (cp4, False), "cp2dp2": (cp2dp2, False), "cp2tp2": (cp2tp2, False),
                                  "cp2tp2_sp": (cp2tp2, True)})
    runs = []
    for name, family, docs, sections in FOUR_RANK_RUNS:
        raw_model = dict(sections.get("model", {}))
        if family == "llama":
            raw_model.update(LLAMA)
        runs.append((name, {**sections, "model": raw_model, "data": DOCUMENTS if docs else {}}))
    out["runs"] = _train_runs(workdir, runs)
    return out


def _references(workdir: str) -> dict:
    return {
        ("gpt", False): _reference(workdir, global_batch=4, clip=0.5),
        ("gpt", True): _reference(workdir, global_batch=4, clip=0.5, data=DOCUMENTS),
        ("gpt_z", False): _reference(workdir, global_batch=4, clip=0.5, model_options={"z_loss": CHUNKED_Z["z_loss"]}),
        ("llama", False): _reference(workdir, global_batch=4, clip=0.5, model_options=LLAMA),
        ("llama", True): _reference(workdir, global_batch=4, clip=0.5, model_options=LLAMA, data=DOCUMENTS),
    }


def test_context_parallel_attention_model_and_training_match_one_process(workdir):
    """CP2, CP4, CP2 x TP2 (+SP), CP2 x DP2 (ZeRO-1, ZeRO-3), CP2 x PP2: attention, model and training equal one
    process (losses within 1e-5, gradient norms and weights as tests/test_engine.py holds every layout)."""
    results = run_ranks(_four_ranks, 4, workdir, timeout_s=600, collective_timeout_s=90)
    refs = _references(workdir)
    assert refs[("llama", True)]["losses"][0] != pytest.approx(refs[("llama", False)]["losses"][0], abs=1e-3)
    # Rank placement: TP innermost (adjacent ranks), then CP, then DP.
    assert [r["layout"]["cp4"] for r in results] == [[0, 1], [1, 1], [2, 1], [3, 1]]
    assert [r["layout"]["cp2tp2"] for r in results] == [[0, 0, 1, 2], [1, 0, 1, 2], [0, 1, 1, 2], [1, 1, 1, 2]]
    assert [r["layout"]["cp2dp2"] for r in results] == [[0, 0, 0], [1, 0, 1], [0, 1, 2], [1, 1, 3]]
    for rank, r in enumerate(results):
        assert len(r["attention"]) == 3 * 4 + 3 * 4 + 2, r["attention"]  # kv heads 4, 2, 1 at CP2 and CP4 + Triton
        assert len(r["model"]) == 2 * 2 * 4, r["model"]
        for name, family, docs, _ in FOUR_RANK_RUNS:
            _assert_close_to_reference(r["runs"][name], refs[(family, docs)], f"{name} rank {rank}", logs=rank == 0)
        assert r["runs"]["cp2dp2_gpt_zero3"]["stage"] == 3
        assert r["runs"]["cp2pp2_llama"]["engine"] == r["runs"]["cp2pp2_gpt_docs"]["engine"] == "PipelineEngine"


# ----------------------------------------------------------------------------- resume, elastic resume, checkpoints


def _layout(context: int, micro: int, zero: dict = ZERO1) -> dict:
    schedule = {"type": "WarmupCosineLR",
                "params": {"warmup_num_steps": 3, "cos_min_ratio": 0.1, "total_num_steps": SCHEDULE_STEPS}}
    return {"parallel": {"context": context},
            "deepspeed": {**zero, "train_micro_batch_size_per_gpu": micro, "scheduler": schedule}}


def _two_ranks(workdir: str) -> dict:
    from tests.test_elastic import _run, _source

    cp2, cp1dp2 = _layout(2, 4), _layout(1, 2)
    out = {"straight": _run(workdir, "cp2_straight", "llama", SCHEDULE_STEPS, cp2),
           "stopped": _source(workdir, "cp2_stopped", "llama", cp2)}  # 3 steps, save, a new process resumes to 6
    # Elastic resume of the CP2 checkpoint at CP1 x DP2 (a layout change: context 2 -> 1, data 1 -> 2).
    out["cp2_to_cp1"] = _run(workdir, "cp2_to_cp1", "llama", SCHEDULE_STEPS, cp1dp2, "cp2_stopped")
    zero3_docs = {"parallel": {"context": 2}, "data": DOCUMENTS,
                  "deepspeed": {**ZERO3, "train_micro_batch_size_per_gpu": 4}}
    out.update(_train_runs(workdir, [("cp2_gpt_docs_zero3", zero3_docs)]))
    return out


@pytest.fixture(scope="module")
def two_ranks(workdir) -> dict:
    return run_ranks(_two_ranks, 2, workdir, timeout_s=600, collective_timeout_s=90)[0]


def test_context_parallel_resume_is_exact_and_elastic(two_ranks, workdir):
    """A CP2 run stopped after 3 steps and resumed in a new process gives the uninterrupted run's losses exactly; its
    checkpoint resumed at CP1 x DP2 is resharded (context 2 -> 1) with the optimizer state bit for bit, and continues
    within 1e-5. CP2 at ZeRO-3 with packed documents trains like one process."""
    straight, stopped, elastic = two_ranks["straight"], two_ranks["stopped"], two_ranks["cp2_to_cp1"]
    assert straight["exit"] == 0 and len(straight["losses"]) == SCHEDULE_STEPS
    assert stopped["losses"] == straight["losses"], (stopped["losses"], straight["losses"])
    assert elastic["exit"] == 0 and elastic["start"] == 3 and elastic["max_state_diff"] == 0.0 and elastic["same_keys"]
    (record,) = elastic["resharded"]
    assert set(record["changes"]) == {"context 2 -> 1", "data 1 -> 2"}, record
    assert record["from"]["context"] == 2 and record["to"]["context"] == 1
    for mine, theirs in zip(elastic["losses"], straight["losses"][3:], strict=True):
        assert abs(mine - theirs) <= 1e-5 * abs(theirs), (elastic["losses"], straight["losses"])
    zero3 = two_ranks["cp2_gpt_docs_zero3"]
    assert zero3["stage"] == 3
    _assert_close_to_reference(zero3, _reference(workdir, global_batch=4, clip=0.5, data=DOCUMENTS), "cp2 zero3 docs")


def test_context_parallel_checkpoints_export_like_cp1(two_ranks, workdir, tmp_path):
    """A CP2 checkpoint (ZeRO-1, and ZeRO-3: partitions over data x context) consolidates to exactly the weights
    the run held; exported to Hugging Face it gives megalite's one-process (CP1) logits, and the CP1 x DP2 run that
    continued it gives the same logits within float noise."""
    from megalite.checkpoint.consolidate import load_full_weights, model_from_checkpoint
    from megalite.interop.export import export_hf
    from tests.test_export import _hf_logits

    _, state, manifest = load_full_weights(f"{workdir}/cp2_gpt_docs_zero3")
    assert manifest["layout"]["context"] == 2 and manifest["layout"]["zero_stage"] == 3
    held = two_ranks["cp2_gpt_docs_zero3"]["params"]
    assert set(state) == set(held)
    for key, tensor in held.items():
        assert torch.equal(state[key], tensor), key
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    logits = {}
    for name in ("cp2_straight", "cp2_to_cp1", "cp2_gpt_docs_zero3"):
        out = export_hf(f"{workdir}/{name}", tmp_path / name)
        logits[name] = _hf_logits(out, ids)
        _, model, _ = model_from_checkpoint(f"{workdir}/{name}")
        with torch.no_grad():
            ours = model(ids, gather_logits=True)[..., :97]
        torch.testing.assert_close(logits[name], ours, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(logits["cp2_to_cp1"], logits["cp2_straight"], atol=2e-4, rtol=1e-4)
    layout = json.loads(next((tmp_path / "cp2_straight").glob("config.json")).read_text())
    assert layout["architectures"] == ["LlamaForCausalLM"]


def test_offline_reshard_into_context_parallelism(two_ranks, workdir, tmp_path):
    """`megalite checkpoint reshard --context 2` of the CP1 x DP2 checkpoint: the written CP2 checkpoint holds the
    source's weights and Adam moments bit for bit (ZeRO-1 partitions over data x context ranks)."""
    from megalite.checkpoint.reshard import TrainingState
    from megalite.engine.reshard_offline import reshard

    written = reshard(f"{workdir}/cp2_to_cp1", tmp_path / "cp2", 1, 1, 1, context=2)
    source, target = TrainingState(f"{workdir}/cp2_to_cp1"), TrainingState(written)
    assert target.manifest["layout"]["context"] == 2 and target.data == 2  # two ZeRO partitions
    assert source.manifest["layout"]["context"] == 1
    for name in source.names():
        a, b = source.parameter(name), target.parameter(name)
        assert torch.equal(a.fp32, b.fp32), name
        assert set(a.moments) == set(b.moments) == {"exp_avg", "exp_avg_sq"}
        for key in a.moments:
            assert torch.equal(a.moments[key], b.moments[key]), (name, key)
    # Resumed in a CP2 engine, the offline checkpoint continues exactly as the online (elastic) resume of its source
    # at CP2 does: DeepSpeed's own loader on one side, megalite's reshard on the other, the same steps.
    runs = run_ranks(_continue_at_cp2, 2, workdir, str(tmp_path / "cp2"), timeout_s=300, collective_timeout_s=90)[0]
    offline, online = runs["offline"], runs["online"]
    assert offline["exit"] == online["exit"] == 0 and offline["start"] == online["start"] == SCHEDULE_STEPS
    assert offline["resharded"] == [] and len(online["resharded"]) == 1, (offline["resharded"], online["resharded"])
    assert len(offline["losses"]) == 2 and offline["losses"] == online["losses"], (offline["losses"], online["losses"])


def _continue_at_cp2(workdir: str, offline_root: str) -> dict:
    """The CP1 x DP2 run's last checkpoint continued at CP2 for two steps, from the offline reshard's output and from
    the checkpoint itself (an elastic resume)."""
    import shutil

    import torch.distributed as dist

    from tests.test_elastic import _run

    if dist.get_rank() == 0:
        shutil.copytree(offline_root, f"{workdir}/offline_cp2/checkpoints")
        shutil.copytree(f"{workdir}/cp2_to_cp1/checkpoints", f"{workdir}/online_cp2/checkpoints")
    dist.barrier()
    cp2 = _layout(2, 4)
    return {name: _run(workdir, f"{name}_cp2", "llama", SCHEDULE_STEPS + 2, cp2, resume="must")
            for name in ("offline", "online")}


# ----------------------------------------------------------------------------- rules and arithmetic (one process)


def _cfg(world: int, **sections):
    from megalite import config as C
    from tests.helpers.engine_utils import tiny_config

    return C.from_dict(tiny_config("data", "out", **sections), world_size=world)


@pytest.mark.parametrize("sections,world,fragment", [
    ({"parallel": {"context": 8}}, 8, "model.num_heads: 4 is not divisible by parallel.tensor x parallel.context = 1 x 8"),
    ({"parallel": {"context": 2, "tensor": 2}, "model": {"num_heads": 2}}, 4,
     "model.num_heads: 2 is not divisible by parallel.tensor x parallel.context = 2 x 2"),
    ({"parallel": {"context": 4}, "model": {"num_heads": 12, "num_kv_heads": 6, "hidden_size": 48}}, 4,
     "model.num_kv_heads: 6 key/value heads (6 per tensor-parallel rank) cannot be spread over parallel.context=4"),
    ({"parallel": {"context": 3}, "model": {"num_heads": 3, "hidden_size": 48}}, 3,
     "data.seq_length: 16 is not divisible by parallel.context = 3"),
    ({"parallel": {"context": 2, "tensor": 2, "sequence_parallel": True}, "model": {"num_heads": 4},
      "data": {"seq_length": 6}}, 4,
     "data.seq_length: 6 is not divisible by parallel.context x parallel.tensor (sequence parallelism) = 4"),
    ({"parallel": {"context": 2}}, 3,
     "world size 3 is not divisible by parallel.tensor x parallel.context x parallel.pipeline = 1 x 2 x 1"),
    ({"parallel": {"context": 0}}, 1, "parallel.context: must be > 0, got 0"),
    ({"parallel": {"context": 2}, "deepspeed": {"zero_optimization": {"stage": 3, "reduce_scatter": False}}}, 2,
     "deepspeed.zero_optimization.reduce_scatter: false is refused with parallel.context > 1 at ZeRO-3"),
])
def test_context_rules_name_key_and_value(sections, world, fragment):
    """Config validation (before any process group) refuses what context parallelism cannot split."""
    from megalite.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        _cfg(world, **sections)
    assert fragment in str(exc.value), str(exc.value)


def test_context_arithmetic_layout_and_plan():
    """Data parallelism is what tensor x context x pipeline leave; the batch, tokens per step (each token once), the
    checkpoint layout, DeepSpeed's batch for the pipeline engine, the gradient scale, and the plan's memory."""
    from megalite import plan as P
    from megalite.config import Layout, kv_replication, summary
    from megalite.engine.build import context_grad_scale, deepspeed_dict

    assert [kv_replication(k, c) for k, c in ((4, 2), (2, 4), (1, 4), (6, 4), (3, 2))] == [1, 2, 4, None, None]
    cfg = _cfg(8, parallel={"context": 2, "tensor": 2})
    info = summary(cfg, 8)
    assert (info["data_parallel"], info["context_parallel"], info["global_batch_size"]) == (2, 2, 4)
    assert info["tokens_per_step"] == 4 * 16 and info["rank_order"].startswith("tensor, context, data")
    layout = cfg.layout(8)
    assert (layout.context, layout.data, layout.world) == (2, 2, 8)
    before_cp = Layout.from_manifest({"tensor": 2, "data": 2, "pipeline": 1, "zero_stage": layout.zero_stage,
                                      "precision": layout.precision, "global_batch": 4})  # written before CP existed
    assert layout.changes(before_cp) == ["context 1 -> 2"]
    assert layout.changes(Layout.from_manifest(layout.to_manifest())) == []
    assert context_grad_scale(cfg) == 1.0  # ZeRO-0..2: DeepSpeed sums the context ranks' shares
    assert context_grad_scale(_cfg(4, parallel={"context": 2}, deepspeed={"zero_optimization": {"stage": 3}})) == 2.0
    pipe = _cfg(8, parallel={"context": 2, "pipeline": 2}, deepspeed={"zero_optimization": {"stage": 1}})
    assert context_grad_scale(pipe) == 2.0 and deepspeed_dict(pipe, 8)["train_batch_size"] == 2 * 2 * 2
    # The plan: per-rank activations of a long sequence fall to about 1/c; the CP all-to-all appears.
    base = {"model": {"num_layers": 2, "max_position_embeddings": 8192}, "data": {"seq_length": 8192},
            "deepspeed": {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}}}
    acts = {}
    for c in (1, 2, 4):
        cfg_c = _cfg(c, **{**base, "parallel": {"context": c}})
        p = P.plan(cfg_c, c, P.get_device("h200"))
        acts[c] = p.memory[0].activations_per_micro_batch
        groups = {(x.group, x.kind): x for x in p.comms[0]}
        assert (("CP", "all-to-all") in groups) == (c > 1)
        if c > 1:
            assert groups[("CP", "all-to-all")].ranks == c and groups[("DP", "all-reduce")].ranks == c
        assert p.layout.describe().startswith(f"TP1, CP{c}" if c > 1 else "TP1, PP1")
    for c in (2, 4):
        ratio = sum(acts[c].values()) / sum(acts[1].values())
        assert 0.9 / c < ratio < 1.1 / c, (c, ratio)
