"""`megalite plan`: the cost model against published tables, DeepSpeed's own estimates, and what real runs on this
machine hold, save and send.

References, none of them the cost model itself:
- Rajbhandari et al. 2019 (ZeRO), Figure 1: model states of a 7.5B model on 64 GPUs.
- DeepSpeed's `estimate_zero2/3_model_states_mem_needs_all_cold`.
- Korthikanti et al. 2022, per-layer activations sbh(34 + 5as/h), /t with tensor (and sequence) parallelism.
- The bytes autograd saves in real forward passes (saved_tensors_hooks), the tensors a real DeepSpeed engine holds,
  the payload of every torch.distributed call during a real step (tests/helpers/plan_probes.py).
Step times against the published runs the cost model's constants came from are in tests/test_plan_calibration.py,
against runs it was not tuned on in tests/test_plan_published.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalite import config as C
from megalite import plan as P
from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import tiny_config, write_token_dataset
from tests.helpers.plan_configs import plan_config, preset_model

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


def _model_states(terms: dict[str, float]) -> float:
    keys = ("parameters", "gradients", "fp32 gradients", "master weights", "optimizer states")
    return sum(terms.get(k, 0.0) for k in keys)


# ----------------------------------------------------------------------------- model states on paper


def test_zero_paper_figure_1() -> None:
    """7.5B parameters, mixed-precision Adam (K = 12), 64 GPUs: 120 / 31.4 / 16.6 / 1.9 GB per GPU."""
    params = [P.Param("weights", 7_500_000_000, True)]
    figures = []
    for stage in (0, 1, 2, 3):
        cfg = plan_config("gpt2-124m", deepspeed={"fp16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp16"},
                                                  "zero_optimization": {"stage": stage}})
        states = P.model_state_bytes(params, 64, P.settings(cfg))
        figures.append(round(_model_states({k: v for k, (v, _) in states.items()}) / 1e9, 1))
    assert figures == [120.0, 31.4, 16.6, 1.9]
    # bf16 at ZeRO-0 with bf16 accumulation is the same FP16_Optimizer (engine._configure_fp16_optimizer, in bf16):
    # fp32 master weights and fp32 Adam moments beside the 16-bit weights and gradients, K = 12 again
    cfg = plan_config("gpt2-124m", deepspeed={"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"},
                                          "zero_optimization": {"stage": 0}})
    s = P.settings(cfg)
    states = {k: v for k, (v, _) in P.model_state_bytes(params, 64, s).items()}
    assert s.path == "bf16_ddp" and states["master weights"] == 4 * 7.5e9 and states["optimizer states"] == 8 * 7.5e9
    assert round(_model_states(states) / 1e9, 1) == 120.0


def _deepspeed_estimate(fn, *args, **kwargs) -> float:
    """The per-GPU figure DeepSpeed prints for its no-offload row, in bytes (it prints GiB to 2 decimals)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args, **kwargs)
    for line in out.getvalue().splitlines():
        if "offload_optimizer=none" in line and ("offload_param" not in line or "offload_param=none" in line) \
                and ("zero_init" not in line or "zero_init=1" in line):
            return float(re.findall(r"([\d.]+)GB", line)[1]) * GiB
    raise AssertionError(out.getvalue())


@pytest.mark.parametrize("preset,tp,nodes", [("gpt2-1.5b", 1, 1), ("llama-8b", 1, 4), ("gpt3-13b", 4, 8)])
def test_deepspeed_model_state_estimates(preset: str, tp: int, nodes: int) -> None:
    """DeepSpeed's estimate_zero2/zero3 functions against the plan, on the parameters one model-parallel rank holds.

    Conventions: DeepSpeed counts ZeRO-2 as 2 + 18/n bytes per parameter, the 18 including a 16-bit gradient
    partition (2/n) that DeepSpeed 0.19 no longer keeps (its 16-bit gradients live in the reduce bucket, which the
    plan counts separately); ZeRO-3 as 18/n plus 4 bytes per parameter of the largest layer (its gathered
    parameters and gradients, which the plan counts as a transient). With those named, the figures agree to the
    rounding of DeepSpeed's printout.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    gpus = 8 * nodes // tp  # data-parallel ranks sharing one model-parallel rank's parameters
    for stage in (2, 3):
        cfg = plan_config(preset, world=8 * nodes, parallel={"tensor": tp},
                      deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}})
        s = P.settings(cfg)
        params = P.stages(cfg, tp, 1)[0].params
        n = P.numel(params)
        ours = _model_states({k: v for k, (v, _) in P.model_state_bytes(params, gpus, s).items()})
        if stage == 2:
            theirs = _deepspeed_estimate(estimate_zero2_model_states_mem_needs_all_cold, n, gpus, 1)
            ours += 2 * n / gpus
        else:
            largest = max(p.numel for p in params)
            theirs = _deepspeed_estimate(estimate_zero3_model_states_mem_needs_all_cold, n, largest, gpus, 1)
            persistent = sum(p.numel for p in params if p.numel <= s.persistence_threshold)
            ours += 4 * largest - 2 * persistent  # DeepSpeed leaves out the whole copies of small parameters
        assert abs(ours - theirs) <= 0.006 * GiB, (preset, stage, ours / GiB, theirs / GiB)


# ----------------------------------------------------------------------------- activations on paper


def test_korthikanti_formula_and_the_differences() -> None:
    """Per-layer activations for the case the formula covers (a stored T x T softmax, dropout, fp16):
    sbh(34 + 5as/h), sbh(10 + 24/t + 5as/(ht)) with TP, sbh(34/t + 5as/(ht)) with TP and SP. The plan adds the
    norms' fp32 statistics (16 bytes per token), and with SP keeps the sequence-gathered qkv and fc inputs whole
    (4sbh instead of 4sbh/t): megalite's column-parallel layer saves the gathered input, where Megatron saves its
    shard and gathers it again in the backward."""
    s_, b, h, a = 2048, 2, 1024, 16
    model = {"vocab_size": 50304, "hidden_size": h, "num_layers": 1, "num_heads": a, "max_position_embeddings": s_,
             "hidden_dropout": 0.1, "attention_dropout": 0.1}
    for t, sp in ((1, False), (2, False), (4, False), (2, True), (4, True)):
        cfg = plan_config(model, parallel={"tensor": t, "sequence_parallel": sp},
                      deepspeed={"fp16": {"enabled": True}, "train_micro_batch_size_per_gpu": b})
        layout = P.layout_of(cfg, t)
        s = P.settings(cfg, attention="materialized")
        layer = sum(P.activation_bytes(cfg, layout, P.Stage(0, 1, False, False, ()), s).values())
        sbh = s_ * b * h
        if sp:
            paper = sbh * (34 / t + 5 * a * s_ / (h * t))
            expected = paper + 4 * sbh * (1 - 1 / t) + 16 * s_ * b / t
        else:
            paper = sbh * (10 + 24 / t + 5 * a * s_ / (h * t))
            expected = paper + 16 * s_ * b
        assert layer == pytest.approx(expected, rel=1e-12), (t, sp, layer, paper)
    # Flash attention (megalite's kernels) replaces the 5as^2b bytes of scores by the output and an fp32
    # log-sum-exp per head: at 2k tokens and 16 heads, 5x less per layer.
    cfg = plan_config({**model, "hidden_dropout": 0.0, "attention_dropout": 0.0},
                  deepspeed={"fp16": {"enabled": True}, "train_micro_batch_size_per_gpu": b})
    flash = sum(P.activation_bytes(cfg, P.layout_of(cfg, 1), P.Stage(0, 1, False, False, ()), P.settings(cfg))
                .values())
    assert flash < (34 + 5 * a * s_ / h) * s_ * b * h / 5


# ----------------------------------------------------------------------------- activations against autograd

GPT = dict(vocab_size=500, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64,
           make_vocab_size_divisible_by=8)
LLAMA = dict(vocab_size=500, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64,
             make_vocab_size_divisible_by=8, norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
             tied_embeddings=False, ffn_hidden_size=96)


def _activation_case_config(case: dict) -> C.Config:
    model = {**(GPT if case["family"] == "gpt" else LLAMA), "activation_checkpointing": case.get("recompute", False),
             "loss_chunk_tokens": case.get("chunk", 0), "hidden_dropout": case.get("dropout", 0.0),
             **({"fp8": {"recipe": case["fp8"]}} if case.get("fp8") else {})}
    ds = {"train_micro_batch_size_per_gpu": case["B"], "zero_optimization": {"stage": 1}}
    if case.get("bf16"):
        ds["bf16"] = {"enabled": True}
    return C.from_dict({"model": model, "parallel": {"tensor": case["tp"], "sequence_parallel": case.get("sp", False)},
                        "data": {"prefixes": ["x"], "seq_length": case["T"],
                                 "reset_attention_mask": case.get("docs", False)},
                        "train": {"kernels": case.get("backend", "torch")}, "deepspeed": ds})


ACTIVATION_CASES = [
    *(dict(family=f, tp=tp, sp=sp, recompute=rec, B=2, T=32) for f in ("gpt", "llama")
      for tp, sp in ((1, False), (2, False), (2, True)) for rec in (False, True)),
    *(dict(family=f, tp=2, sp=True, chunk=16, B=2, T=32) for f in ("gpt", "llama")),
    *(dict(family=f, tp=1, chunk=16, B=2, T=32, bf16=True) for f in ("gpt", "llama")),
    dict(family="gpt", tp=2, sp=False, B=2, T=32, dropout=0.1),
    dict(family="gpt", tp=1, B=1, T=64, docs=True),
    # megalite's Triton kernels (the GPU path; here under Triton's interpreter), with packed documents
    dict(family="gpt", tp=1, B=1, T=64, backend="triton"),
    dict(family="llama", tp=2, sp=True, B=1, T=64, backend="triton", docs=True),
    dict(family="llama", tp=2, sp=True, recompute=True, B=1, T=64, backend="triton", docs=True),
    # FP8 (model.fp8): tensorwise keeps e4m3 inputs and weight copies, the rowwise recipes the inputs as they are
    dict(family="gpt", tp=1, B=2, T=32, fp8="tensorwise"),
    dict(family="llama", tp=2, sp=True, B=2, T=32, fp8="tensorwise", bf16=True),
    dict(family="gpt", tp=2, sp=True, B=2, T=32, fp8="rowwise"),
    dict(family="llama", tp=1, B=2, T=32, fp8="rowwise_with_gw_hp", bf16=True),
    # the lower bound's activations: column-parallel layers keeping their sequence shard, as Megatron-LM's do
    *(dict(family=f, tp=2, sp=True, recompute=rec, B=2, T=32, shard=True) for f in ("gpt", "llama")
      for rec in (False, True)),
]


def _count_saved_activations(cases: list[dict]) -> list[tuple[int, int]]:
    """On each rank: (bytes autograd saves in one forward, parameters held) per case; TP2 cases across both ranks."""
    import torch
    import torch.distributed as dist

    import megalite.kernels as K
    from megalite.memory import saved_activation_bytes
    from megalite.model.transformer import Transformer
    from megalite.model.weights import initialize_parameters

    out = []
    for case in cases:
        cfg = _activation_case_config(case)
        group = dist.group.WORLD if case["tp"] == 2 else None
        K.set_backend(case.get("backend", "torch"))
        model = Transformer(cfg.model, cfg.parallel, group, dtype=torch.bfloat16 if case.get("bf16") else None)
        initialize_parameters(model, 1, group)
        model.train()
        b, t = case["B"], case["T"]
        ids = torch.randint(1, cfg.model.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
        extra = {}
        if case.get("docs"):  # two packed documents per sample
            extra["document_ids"] = (torch.arange(t) >= t // 3).long().unsqueeze(0).expand(b, t).contiguous()
        if case.get("shard"):
            from tests.helpers.plan_probes import shard_saving_sequence_parallel

            with shard_saving_sequence_parallel():
                saved = saved_activation_bytes(model, lambda m=model, x=ids, kw=extra: m(x, labels=x, **kw))
                model(ids, labels=ids, **extra).backward()  # the emulated layer's gradients are megalite's
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, **extra).backward()
            assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-6) for a, p in zip(grads, model.parameters()))
        else:
            saved = saved_activation_bytes(model, lambda m=model, x=ids, kw=extra: m(x, labels=x, **kw))
        out.append((saved, sum(p.numel() for p in model.parameters())))
    return out


def test_activation_bytes_match_what_autograd_saves() -> None:
    """The plan's activations per micro-batch against the bytes autograd saves in real forward passes on CPU, per
    rank: TP1/TP2, with and without SP, with and without recompute, chunked loss, bf16, dropout, packed documents
    (also with recompute), GPT and Llama, torch and Triton kernels; and the lower bound's activations against the
    same model with Megatron-style column-parallel layers (keeping the sequence shard; gradients checked equal). Within 10% each (the issue's bound; the
    largest error, printed, is 0.5%)."""
    results = run_ranks(_count_saved_activations, 2, ACTIVATION_CASES, timeout_s=300,
                        env={"TRITON_INTERPRET": "1"})
    worst = 0.0
    for rank_results in results:
        for case, (saved, numel) in zip(ACTIVATION_CASES, rank_results):
            cfg = _activation_case_config(case)
            stage = P.stages(cfg, case["tp"], 1)[0]
            assert P.numel(stage.params) == numel, case  # the plan's parameter list is the model's
            s = dataclasses.replace(P.settings(cfg, platform="cpu"),
                                    sp_saved_input="shard" if case.get("shard") else "gathered")
            planned = sum(P.activation_bytes(cfg, P.layout_of(cfg, case["tp"]), stage, s).values())
            error = planned / saved - 1
            worst = max(worst, abs(error))
            assert abs(error) < 0.10, (case, saved, planned)
            if case.get("fp8") == "tensorwise":  # its e4m3 copies change the bytes by more than the error
                plain = dataclasses.replace(s, fp8_recipe="", fp8_layers=())
                without = sum(P.activation_bytes(cfg, P.layout_of(cfg, case["tp"]), stage, plain).values())
                assert abs(error) < 0.01 and abs(without / saved - 1) > 0.03, (case, saved, planned, without)
            if case.get("shard") and not case.get("recompute"):  # the two differ by more than the error
                gathered = sum(P.activation_bytes(cfg, P.layout_of(cfg, 2), stage, P.settings(cfg, platform="cpu"))
                               .values())
                assert abs(error) < 0.01 and gathered / saved - 1 > 0.03, (case, saved, planned, gathered)
    print(f"largest activation error over {len(ACTIVATION_CASES)} cases x 2 ranks: {worst:.2%}")


# ----------------------------------------------------------------------------- DeepSpeed engines: states and traffic

ENGINE_VARIANTS = [
    *((f"fp32 ZeRO-{s}", {"deepspeed": {"zero_optimization": {"stage": s}}}) for s in (0, 1, 2, 3)),
    *((f"bf16 ZeRO-{s}", {"deepspeed": {"bf16": {"enabled": True}, "zero_optimization": {"stage": s}}})
      for s in (1, 2, 3)),
    ("bf16 ZeRO-2 overlap_comm", {"deepspeed": {"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 2, "overlap_comm": True, "reduce_bucket_size": 1_000_000}}}),
    # every parameter partitioned (none persistent): gathered for the forward, the recompute and the backward
    ("fp32 ZeRO-3 recompute accumulation 2", {"model": {"activation_checkpointing": True}, "deepspeed": {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}}),
    # the optimizer steps the partition in sub-groups of about 2000 elements: the fp32 gradient copy is one sub-group's
    ("bf16 ZeRO-3 sub-groups", {"deepspeed": {"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "sub_group_size": 2000, "stage3_param_persistence_threshold": 0}}}),
    ("fp32 TP2", {"parallel": {"tensor": 2}, "deepspeed": {"zero_optimization": {"stage": 1}}}),
    # FP8 row-parallel layers reduce their fp32 output; rowwise also reduces its amaxes over the split dimensions
    ("bf16 TP2 FP8 tensorwise", {"parallel": {"tensor": 2}, "model": {"fp8": {"recipe": "tensorwise"}},
                                 "deepspeed": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}}),
    ("bf16 TP2+SP FP8 rowwise", {"parallel": {"tensor": 2, "sequence_parallel": True},
                                 "model": {"fp8": {"recipe": "rowwise"}},
                                 "deepspeed": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}}),
    ("bf16 TP2+SP accumulation 2", {"parallel": {"tensor": 2, "sequence_parallel": True}, "deepspeed": {
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 2}}),
    # last: DeepSpeed cannot build a plain engine after a pipeline one in the same process
    ("bf16 PP2 accumulation 3", {"parallel": {"pipeline": 2}, "deepspeed": {
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 3}}),
]


def _engine_holdings_and_traffic(workdir: str, variants: list) -> dict:
    """Per variant on this rank: the bytes reachable from the engine at the end of the backward (before the
    gradient reduction) and inside the optimizer step of the second step, and every collective of that step."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from megalite.engine.trainer import Trainer
    from tests.helpers.plan_probes import second_step_holdings

    out = {}
    for name, sections in variants:
        run = Trainer(C.from_dict(tiny_config(f"{workdir}/tok", f"{workdir}/{name.replace(' ', '_')}", **sections)))
        held, calls = second_step_holdings(run)
        grid = run.grid
        flat = getattr(run.engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3's sub-groups
        out[name] = {"held": held, "calls": calls, "tp": sorted(grid.tp_ranks),
                     "dp": sorted(grid.dp_group), "stage": grid.get_pipe_parallel_rank(),
                     "sub_group": max(x.numel() for x in flat) if flat else 0}
        del run
    return out


def _expected_held(mem: P.StageMemory, s: P.Settings) -> float:
    """What the plan says the engine holds at the end of the backward or in the step: model states, the ZeRO-3
    bucket, and the ZeRO optimizer's reduce bucket (which ZeRO-2's gradients are inside of at that moment)."""
    held = _model_states(mem.terms) + mem.terms.get("ZeRO-3 reduce bucket", 0.0)
    if s.path == "zero":
        held += mem.terms["transient: gradient reduce bucket"]
        if s.zero_stage == 2:
            held -= mem.terms["gradients"]
    return held


def _group(call: tuple, result: dict) -> str:
    kind, ranks, _ = call
    if kind == "send/recv":
        return "PP"
    if len(ranks) == 1:
        return "single"
    if list(ranks) == result["tp"] and len(result["tp"]) > 1:
        return "TP"
    if list(ranks) == result["dp"]:
        return "DP"
    return "PP" if len(result["dp"]) == 1 and len(result["tp"]) == 1 else "other"


def test_engine_model_states_and_collectives(tmp_path: Path) -> None:
    """Real DeepSpeed engines on 2 gloo ranks (ZeRO 0-3 in fp32 and bf16, overlap_comm, ZeRO-3 with recompute and
    nothing persistent, TP2, TP2+SP with accumulation, PP2 with accumulation): the bytes the engine holds equal the plan's model states and buckets up
    to the scalars DeepSpeed and torch add (grad norm, loss, a 4-byte step counter per parameter tensor of a plain
    torch optimizer; the decay/no-decay groups of this model need no alignment padding; with ZeRO-3 the fp32
    copy of one group's gradient partition it flattens during the step, a transient the plan counts), and the
    payload of every collective in one step equals the plan's
    figure per group and kind, and so does the number of calls (NCCL's latency is charged per call), once scalar
    control messages (16 bytes or less: flags, norms, the loss) are set aside."""
    write_token_dataset(str(tmp_path / "tok"))
    results = run_ranks(_engine_holdings_and_traffic, 2, str(tmp_path), ENGINE_VARIANTS, timeout_s=400,
                        collective_timeout_s=60)
    for rank, rank_results in enumerate(results):
        for name, sections in ENGINE_VARIANTS:
            result = rank_results[name]
            cfg = C.from_dict(tiny_config(str(tmp_path / "tok"), str(tmp_path / "x"), **sections))
            plan = P.plan(cfg, 2, P.get_device("h100-sxm"), 2)
            stage = result["stage"]
            mem = plan.memory[stage]
            expected = _expected_held(mem, plan.settings)
            scalars = 64 + 4 * len(plan.memory[stage].terms) + 4 * len(P.stages(cfg, plan.layout.tensor,
                                                                                 plan.layout.pipeline)[stage].params)
            if plan.layout.pipeline > 1:  # at the step the pipeline still holds part of its buffers (receive buffers)
                scalars += mem.terms["pipeline buffers"]
            if plan.settings.path == "zero3":  # the fp32 copy of a sub-group's gradients, flattened during the step
                transient = mem.terms["transient: fp32 gradients at the step"]
                scalars += transient
                # the plan's copy is the largest sub-group's (DeepSpeed's sub-groups end at the parameter that takes
                # them past sub_group_size elements): at least the engine's, and within one parameter of it
                largest = max(p.numel for p in P.stages(cfg, 1, 1)[0].params)
                assert 4 * result["sub_group"] <= transient <= 4 * (result["sub_group"] + largest / 2), (
                    name, result["sub_group"], transient)
            assert 0 <= result["held"] - expected <= scalars, (name, rank, result["held"], expected)
            counted: dict[tuple[str, str], int] = {}
            calls: dict[tuple[str, str], int] = {}
            control = 0
            for call in result["calls"]:
                group = _group(call, result)
                if call[2] <= 16 or group == "single":
                    control += call[2]
                    continue
                key = (group, call[0])
                counted[key] = counted.get(key, 0) + call[2]
                calls[key] = calls.get(key, 0) + 1
            planned = {(c.group if c.group != "tied embedding" else "PP", c.kind): c.bytes
                       for c in plan.comms[stage]}
            planned_calls = {(c.group if c.group != "tied embedding" else "PP", c.kind): c.calls
                             for c in plan.comms[stage]}
            broadcast = counted.pop(("DP", "broadcast"), 0)  # ZeRO-3's small per-step broadcasts (not modeled)
            calls.pop(("DP", "broadcast"), 0)
            assert broadcast <= 0.02 * sum(counted.values()), (name, broadcast)
            assert counted == pytest.approx(planned, rel=1e-9), (name, rank, counted, planned)
            # and the number of calls, which NCCL's latency is charged per
            assert calls == planned_calls, (name, rank, calls, planned_calls)


# ----------------------------------------------------------------------------- pieces, search, input errors


def test_partition_is_deepspeeds() -> None:
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    rng = random.Random(0)
    for _ in range(40):
        weights = [rng.choice([0, 1, rng.randint(1, 10**6)]) for _ in range(rng.randint(1, 40))]
        parts = rng.randint(1, 12)
        assert P.partition_balanced(weights, parts) == partition_balanced(weights, parts), (weights, parts)
        assert P.partition_uniform(len(weights), parts) == partition_uniform(len(weights), parts)


def test_parameter_lists_match_the_configs_count() -> None:
    for name in ("gpt2-124m", "llama-8b", "gpt3-13b", "llama-70b"):
        m = C.ModelConfig(**preset_model(name))
        cfg = plan_config(name)
        assert P.numel(P.stages(cfg, 1, 1)[0].params) == C.count_parameters(m)["total"]
        # A pipeline holds every layer once, and the tied embedding twice.
        piped = plan_config(name, parallel={"pipeline": 4}, deepspeed={"zero_optimization": {"stage": 1}})
        stages = P.stages(piped, 1, 4)
        tied = m.padded_vocab_size * m.hidden_size + (m.max_position_embeddings * m.hidden_size
                                                      if m.position == "learned" else 0)
        assert sum(P.numel(s.params) for s in stages) == C.count_parameters(m)["total"] + (
            tied if m.tied_embeddings else 0)
        assert sum(s.blocks for s in stages) == m.num_layers and stages[0].embedding and stages[-1].head


def test_search_over_1024_gpus_is_fast_and_ranks_fitting_layouts() -> None:
    cfg = C.load(REPO / "configs/runs/gpt3-13b-8nodes.json", ["model.hidden_size=12288", "model.num_layers=96",
                                                               "model.num_heads=96"])
    # CPU time, not wall time: the search is single-threaded arithmetic (about 1.4 s of CPU), and on a loaded 2-core
    # machine its wall time went past 13 s; a search that blew up combinatorially would still take minutes of CPU.
    start = time.process_time()
    plans = P.search(cfg, 1024, P.get_device("a100-80g"), 8)
    seconds = time.process_time() - start
    assert seconds < 10, seconds
    fitting = [p for p in plans if p.fits]
    assert len(plans) > 1000 and fitting
    speeds = [float(f"{p.tokens_per_s:.4g}") for p in fitting]
    assert speeds == sorted(speeds, reverse=True)
    assert all(p.peak_memory <= 80 * GiB for p in fitting)
    table = P.format_search(plans)
    assert table.count("\n| ") == 11  # header and ten rows


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megalite.cli", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_bad_input_names_the_value(capsys: pytest.CaptureFixture) -> None:
    """Exit code 2 and a message naming the value, through the `megalite` entry point (one case also as a real
    process)."""
    from megalite.cli import main

    run = str(REPO / "configs/runs/llama-8b-4nodes.json")
    cases = [
        ((run, "--world-size", "6", "--gpus-per-node", "2"),
         "world size 6 is not divisible by parallel.tensor x parallel.pipeline = 4 x 1"),
        ((run, "--world-size", "32", "--set", "parallel.tensor=3"), "not divisible by parallel.tensor=3"),
        ((run, "--world-size", "32", "--device", "b300"), "--device: unknown device 'b300'"),
        ((run, "--world-size", "12", "--gpus-per-node", "8"), "--world-size: 12 is not a multiple of --gpus-per-node 8"),
        ((run, "--world-size", "32", "--memory-gib", "-1"), "--memory-gib: must be > 0, got -1.0"),
        ((run, "--world-size", "32", "--set", "deepspeed.zero_optimization.stage=0"),
         "deepspeed.zero_optimization.stage: ZeRO-0 with bf16 is refused: DeepSpeed 0.19.8 has no ZeRO-0 path"),
    ]
    for args, fragment in cases:
        assert main(["plan", *args]) == 2, args
        err = capsys.readouterr().err
        assert f"megalite plan: error: {fragment}" in err or fragment in err, (args, err)
    out = _cli(*cases[0][0])
    assert out.returncode == 2 and cases[0][1] in out.stderr, out.stderr


def test_plan_of_every_shipped_run_config() -> None:
    worlds = {"demo-cpu": 2, "gpt2-124m-1node": 8, "gpt3-1.3b-2nodes": 16, "gpt3-13b-8nodes": 64,
              "llama-8b-4nodes": 32, "moe-cpu": 2}
    assert set(worlds) == {p.stem for p in (REPO / "configs/runs").glob("*.json")}
    for name, world in worlds.items():
        cfg = C.load(REPO / "configs/runs" / f"{name}.json")
        plan = P.plan(cfg, world, P.get_device("h100-sxm"), 8)
        text = P.format_plan(plan, name)
        for fragment in ("memory per GPU", "communication per step", "tokens/s", "MFU"):
            assert fragment in text
        assert plan.fits, name
    out = _cli("configs/runs/llama-8b-4nodes.json", "--world-size", "32", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["layout"]["tensor"] == 4 and data["fits"] and data["memory_gib"][0]["total"] > 0


def test_memory_summary_and_warning() -> None:
    cfg = C.load(REPO / "configs/runs/gpt3-1.3b-2nodes.json")
    line = P.memory_summary(P.memory_plan(cfg, 16, P.get_device("a100-40g")))
    assert line.startswith("plan: ") and "GiB per GPU of 40.0 GiB on NVIDIA A100 SXM 40GB" in line
    assert P.memory_warning(P.memory_plan(cfg, 16, P.get_device("h200"))) is None
    big = C.load(REPO / "configs/runs/gpt3-1.3b-2nodes.json", ["deepspeed.train_micro_batch_size_per_gpu=32"])
    warning = P.memory_warning(P.memory_plan(big, 16, P.get_device("a100-40g")))
    assert warning and "the biggest term is activations" in warning


def test_preflight_train_and_config_show_report_the_plan(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """preflight's memory check, the lines `train` prints at start and `config show`'s memory summary, for a GPU
    the device table knows (this machine has none: the lookup is replaced)."""
    from megalite import launch
    from megalite.commands import config as config_cli
    from megalite.engine import preflight

    cfg = C.load(REPO / "configs/runs/gpt3-1.3b-2nodes.json")
    monkeypatch.setattr(launch, "local_gpu", lambda: None)
    assert "skipped, no GPU" in preflight.check_memory(cfg, 16, env={})[0].message
    assert P.startup_report(preflight.plan_this_run(cfg, 16, env={})) == []
    monkeypatch.setattr(launch, "local_gpu", lambda: ("NVIDIA H100 80GB HBM3", 79.6))  # an H100 SXM
    (check,) = preflight.check_memory(cfg, 16, env={"LOCAL_WORLD_SIZE": "8"})
    assert check.ok and check.message.startswith("plan: ") and "on NVIDIA H100 SXM" in check.message
    assert P.startup_report(preflight.plan_this_run(cfg, 16, env={"LOCAL_WORLD_SIZE": "8"})) == [check.message]
    big = C.load(REPO / "configs/runs/gpt3-1.3b-2nodes.json", ["deepspeed.train_micro_batch_size_per_gpu=64"])
    (check,) = preflight.check_memory(big, 16, env={"LOCAL_WORLD_SIZE": "8"})
    assert check.ok and check.message.startswith("warning: the plan needs") and "biggest term is activations" \
        in check.message
    assert P.startup_report(preflight.plan_this_run(big, 16, env={"LOCAL_WORLD_SIZE": "8"}))[1] == check.message
    args = argparse.Namespace(action="show", config=str(REPO / "configs/runs/gpt3-1.3b-2nodes.json"), world_size=16,
                              overrides=[])
    assert config_cli.main(args) == 0
    shown = json.loads(capsys.readouterr().out)["derived"]["memory_per_gpu"]
    assert shown["device"] == "NVIDIA H100 SXM" and shown["fits"] and shown["total_gib"] > shown["allocated_gib"] > 0


# Runs `megalite train` with every call of the named functions counted, however a module imported them: each one's
# code is swapped for a counting one that calls a copy of the original. This machine's GPU is an H100 SXM here.
_COUNTED_TRAIN = """
import importlib, sys, types
counts, argv = sys.argv[1], sys.argv[2:]

def count(module_name, name):
    fn = getattr(importlib.import_module(module_name), name)
    original = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    original.__kwdefaults__ = fn.__kwdefaults__
    g = fn.__globals__
    g["_counted_" + name], g["_counts_file"] = original, counts
    exec(f"def _counting(*args, **kwargs):\\n    with open(_counts_file, 'a') as f:\\n        f.write('{name}\\\\n')\\n"
         f"    return _counted_{name}(*args, **kwargs)\\n", g)
    fn.__code__, fn.__defaults__, fn.__kwdefaults__ = g.pop("_counting").__code__, None, None

count("megalite.config.validate", "validate")
count("megalite.plan.estimate", "evaluate")
count("megalite.plan.summaries", "memory_summary")
import megalite.launch as launch
launch.local_gpu = lambda: ("NVIDIA H100 80GB HBM3", 79.6)
from megalite.cli import main
sys.exit(main(argv))
"""


def test_train_validates_and_plans_once(tmp_path: Path) -> None:
    """One `megalite train` start-up validates its config once (at load, for the launcher's world size) and builds
    one plan, which preflight's memory check and the start-up report both summarise and whose GPU gives the MFU peak
    (before: 8 validations and 5 plans)."""
    write_token_dataset(str(tmp_path / "tok"))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(tiny_config(str(tmp_path / "tok"), str(tmp_path / "run"), train={"steps": 2})))
    counts = tmp_path / "counts"
    out = subprocess.run([sys.executable, "-c", _COUNTED_TRAIN, str(counts), "train", str(path)], capture_output=True,
                         text=True, cwd=REPO, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    calls = counts.read_text().split()
    assert {name: calls.count(name) for name in set(calls)} == {"validate": 1, "evaluate": 1, "memory_summary": 2}
    assert "megalite: plan: 1.5 GiB per GPU of 79.6 GiB on NVIDIA H100 SXM" in out.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["kind"] == "start")
    assert start["peak"] == "NVIDIA H100 80GB HBM3: 67.0 TFLOP/s dense fp32"
