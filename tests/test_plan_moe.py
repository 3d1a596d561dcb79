"""`megalite plan` of Mixture-of-Experts models (megalite.plan.experts) against what runs, and the shipped MoE presets
planned on H100/H200 clusters:

- the bytes autograd saves in MoE models' forward passes (routers, experts, shared experts, dense first layers, both
  routers, GELU and SwiGLU, fp32 and bf16; then TP2 + SP and EP2 on 4 gloo ranks) against the plan's activations;
- real DeepSpeed engines at EP1 and EP2 (ZeRO-1/2 with the experts split and their states over the expert-data-
  parallel pairs, ZeRO-3 with every expert partitioned over the replicas, EP2 x TP2 + SP) on 4 gloo ranks: the bytes
  each engine holds against the plan's model states, and every collective of one step against the plan's bytes per
  group and kind (the experts' all-to-alls summed over the ranks, as a rank's share depends on the routing);
- parameter counts per stage and FLOPs (active parameters), the search choosing parallel.expert, and the big presets'
  plans (memory, the all-to-all bytes, throughput) on H100/H200.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megalite import config as C
from megalite import plan as P
from tests.helpers.distributed import run_ranks
from tests.helpers.engine_utils import tiny_config, write_token_dataset

MOE = {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32}
LLAMA = dict(vocab_size=500, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64,
             make_vocab_size_divisible_by=8, norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
             tied_embeddings=False, ffn_hidden_size=96)


def _activation_config(case: dict) -> C.Config:
    model = {**LLAMA, "mlp": case.get("mlp", "swiglu"), "moe": {**MOE, **case.get("moe", {})}}
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}}
    if case.get("bf16"):
        ds["bf16"] = {"enabled": True}
    parallel = {"tensor": case.get("tp", 1), "expert": case.get("ep", 1), "sequence_parallel": case.get("sp", False)}
    return C.from_dict({"model": model, "parallel": parallel, "data": {"prefixes": ["x"], "seq_length": 32},
                        "train": {"kernels": "torch"}, "deepspeed": ds}, world_size=case.get("world", 1))


ONE_PROCESS = [
    {}, {"moe": {"aux_loss": 0.01, "router_z_loss": 0.001}}, {"moe": {"shared_experts": 1, "aux_loss": 0.01}},
    {"mlp": "gelu", "moe": {"router": "sigmoid", "expert_bias": True, "aux_loss": 0.01}},
    {"bf16": True, "moe": {"aux_loss": 0.01}}, {"moe": {"first_dense_layers": 1}},
]
FOUR_RANKS = [  # (case, the ranks whose saved bytes add up to the plan's times their number)
    ({"tp": 2, "sp": True, "world": 4, "moe": {"shared_experts": 1, "aux_loss": 0.01}}, "each"),
    ({"ep": 2, "world": 4, "moe": {"aux_loss": 0.01}}, "sum"),  # a rank's received rows depend on the routing
    ({"ep": 2, "tp": 2, "sp": True, "world": 4, "moe": {"aux_loss": 0.01, "router_z_loss": 0.01}}, "sum"),
]


def _saved(cfg: C.Config, grid=None) -> tuple[int, int]:
    """(bytes autograd saves in one training forward of `cfg`'s model, parameters the rank holds)."""
    import torch

    import megalite.kernels as K
    from megalite.memory import saved_activation_bytes
    from megalite.model import build_model

    K.set_backend("torch")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    model = build_model(cfg.model, cfg.parallel, grid, seed=1, dtype=dtype).train()
    ids = torch.randint(1, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return saved_activation_bytes(model, lambda: model(ids, labels=ids)), sum(p.numel() for p in model.parameters())


def _planned_activations(cfg: C.Config, world: int) -> tuple[float, int]:
    stage = P.stages(cfg, cfg.parallel.tensor, 1)[0]
    layout = P.layout_of(cfg, world)
    return sum(P.activation_bytes(cfg, layout, stage, P.settings(cfg, platform="cpu")).values()), P.numel(stage.params)


# ----------------------------------------------------------------------------- 4 ranks: activations, engines

ENGINE_MODEL = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "num_kv_heads": 2,
                "tied_embeddings": False, "ffn_hidden_size": 24,
                "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 16, "first_dense_layers": 1,
                        "shared_experts": 1, "aux_loss": 0.01, "router_z_loss": 0.001}}
ZERO = {s: {"zero_optimization": {"stage": s}, "train_micro_batch_size_per_gpu": 1} for s in (1, 2, 3)}
ENGINE_VARIANTS = [
    ("EP1 ZeRO-1", {"deepspeed": ZERO[1]}),
    ("EP2 ZeRO-1", {"parallel": {"expert": 2}, "deepspeed": ZERO[1]}),
    ("EP2 ZeRO-2", {"parallel": {"expert": 2}, "deepspeed": ZERO[2]}),
    ("EP2 ZeRO-3", {"parallel": {"expert": 2}, "deepspeed": ZERO[3]}),
    ("EP2 TP2+SP ZeRO-1", {"parallel": {"expert": 2, "tensor": 2, "sequence_parallel": True},
                           "deepspeed": {**ZERO[1], "train_micro_batch_size_per_gpu": 2}}),
]


def _engine_config(workdir: str, name: str, sections: dict) -> dict:
    raw = tiny_config(f"{workdir}/tok", f"{workdir}/{name.replace(' ', '_')}", **sections)
    raw["model"].update(ENGINE_MODEL)
    return raw


def _four_ranks(workdir: str) -> dict:
    import deepspeed
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from megalite.engine.trainer import Trainer
    from megalite.parallel import ProcessGrid
    from tests.helpers.plan_probes import second_step_holdings

    # One-process models, a share on each rank (no collectives), then the 4-rank ones.
    out: dict = {"one_process": [(i, _saved(_activation_config(case)))
                                 for i, case in enumerate(ONE_PROCESS) if i % 4 == dist.get_rank()],
                 "activations": []}
    for case, _ in FOUR_RANKS:
        cfg = _activation_config(case)
        grid = ProcessGrid(tensor=cfg.parallel.tensor, expert=cfg.parallel.expert)
        out["activations"].append(_saved(cfg, grid))
    for name, sections in ENGINE_VARIANTS:
        run = Trainer(C.from_dict(_engine_config(workdir, name, sections)))
        held, calls = second_step_holdings(run)
        grid = run.grid
        out[name] = {"held": held, "calls": calls, "rank": dist.get_rank(),
                     "groups": {"TP": sorted(grid.tp_ranks), "DP": sorted(grid.dp_group), "EP": sorted(grid.ep_ranks),
                                "EDP": sorted(grid.edp_ranks)}}
        del run
    return out


def _group(kind: str, ranks: tuple, groups: dict) -> str:
    """The group of a collective: the experts' all-to-alls on the expert-parallel group, the rest by their ranks (an
    expert-data-parallel group equal to the data-parallel one, without expert parallelism, is DP)."""
    if len(ranks) == 1:
        return "single"
    if kind == "all-to-all" and list(ranks) == groups["EP"]:
        return "EP"
    for name in ("TP", "DP", "EDP"):
        if list(ranks) == groups[name]:
            return name
    return "other"


def test_moe_plan_against_real_engines_and_activations(tmp_path: Path) -> None:
    """4 gloo ranks: saved activations (one-process models: routers, experts, shared experts, dense first layers,
    softmax and sigmoid, GELU and SwiGLU, fp32 and bf16; TP2 + SP, EP2 summed over the ranks) against the plan; engines at EP1
    and EP2 (ZeRO-1/2 split experts over expert-data-parallel pairs, ZeRO-3, EP2 x TP2 + SP): held bytes equal the
    plan's model states and buckets plus the MoE blocks' statistics counters and DeepSpeed's scalars, and each
    collective's bytes per group and kind equal the plan's (the experts' all-to-all summed over the four ranks)."""
    write_token_dataset(str(tmp_path / "tok"))
    results = run_ranks(_four_ranks, 4, str(tmp_path), timeout_s=500, collective_timeout_s=150)
    _check_four_ranks(results, tmp_path)


def _check_four_ranks(results: list, tmp_path: Path) -> None:
    for i, (saved, numel) in (x for r in results for x in r["one_process"]):
        cfg = _activation_config(ONE_PROCESS[i])
        planned, planned_numel = _planned_activations(cfg, 1)
        assert planned_numel == numel, ONE_PROCESS[i]  # the plan's parameter list is the model's
        assert abs(planned / saved - 1) < 0.01, (ONE_PROCESS[i], saved, planned)
    assert sorted(i for r in results for i, _ in r["one_process"]) == list(range(len(ONE_PROCESS)))
    for i, (case, how) in enumerate(FOUR_RANKS):
        cfg = _activation_config(case)
        planned, planned_numel = _planned_activations(cfg, 4)
        saved = [r["activations"][i][0] for r in results]
        assert all(r["activations"][i][1] == planned_numel for r in results), case
        if how == "each":
            assert all(abs(planned / s - 1) < 0.01 for s in saved), (case, saved, planned)
        else:
            assert abs(4 * planned / sum(saved) - 1) < 0.01, (case, saved, planned)
    for name, sections in ENGINE_VARIANTS:
        cfg = C.from_dict(_engine_config(str(tmp_path), name, sections))
        plan = P.plan(cfg, 4, P.get_device("h100-sxm"), 4)
        mem, s = plan.memory[0], plan.settings
        expected = sum(mem.terms[k] for k in P.MODEL_STATE_TERMS if k in mem.terms)
        expected += mem.terms.get("ZeRO-3 reduce bucket", 0.0)
        if s.path == "zero":
            expected += mem.terms["transient: gradient reduce bucket"] - (mem.terms["gradients"] if s.zero_stage == 2
                                                                           else 0.0)
        moe_layers = P.stages(cfg, plan.layout.tensor, 1)[0].moe_blocks
        expected += moe_layers * (4 * 8 + 5 * 8)  # the MoE blocks' statistics counters (int64 loads, float64 sums)
        scalars = 64 + 4 * len(mem.terms) + 4 * len(P.stages(cfg, plan.layout.tensor, 1)[0].params)
        if s.path == "zero3":
            scalars += mem.terms["transient: fp32 gradients at the step"]
        counted: dict = {}
        for rank_results in results:
            result = rank_results[name]
            assert 0 <= result["held"] - expected <= scalars, (name, result["rank"], result["held"], expected)
            mine: dict = {}
            for kind, ranks, nbytes in result["calls"]:
                group = _group(kind, ranks, result["groups"])
                if nbytes <= 16 or group == "single":
                    continue  # control messages: flags, norms, the loss
                mine[(group, kind)] = mine.get((group, kind), 0) + nbytes
            planned = {(c.group, c.kind): c.bytes for c in plan.comms[0]}
            experts = ("EP", "all-to-all")
            counted[experts] = counted.get(experts, 0) + mine.pop(experts, 0)
            broadcast = mine.pop(("DP", "broadcast"), 0)  # ZeRO-3's small per-step broadcasts (not modeled)
            assert broadcast <= 0.02 * sum(mine.values()), (name, broadcast)
            assert mine == pytest.approx({k: v for k, v in planned.items() if k != experts}, rel=1e-9), \
                (name, result["rank"], mine, planned)
        assert counted[("EP", "all-to-all")] == pytest.approx(4 * planned.get(("EP", "all-to-all"), 0.0), rel=1e-9), \
            (name, counted, planned)
        if plan.layout.expert > 1:
            assert counted[("EP", "all-to-all")] > 0, name


# ----------------------------------------------------------------------------- the shipped MoE presets and run config

# Published totals: Mistral AI's Mixtral-8x7B (46.7B, 12.9B active; the counts of its released weights) and Qwen's
# Qwen3-30B-A3B model card (30.5B total, 3.3B activated).
PUBLISHED = {"mixtral-8x7b": (46_702_792_704, 12_879_925_248), "qwen3-30b-a3b": (30.5e9, 3.3e9)}
# Megatron-Core's MoE README: Mixtral 8x7B bf16 training at 468 TFLOP/s per H100 (MCore v0.9); the sentence names no
# layout, and TP1 x PP4 x EP8 on 64 H100 is the one a third-party summary of Megatron-Core's benchmarks lists.
MEGATRON_MIXTRAL_TFLOPS = 468


def _preset_run(name: str, world: int, **parallel) -> C.Config:
    raw = {"model": name, "parallel": parallel, "data": {"prefixes": ["x"], "seq_length": 4096},
           "deepspeed": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 16,
                         "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}}
    return C.from_dict(C.expand_references(raw, None), world_size=world)


def test_moe_presets_count_plan_and_search() -> None:
    """The presets' parameter counts (total and active) against the published figures; their plans on 64 H100 and
    64 H200 at TP1 x PP4 x EP8: they fit, Mixtral's throughput is within 25% of Megatron-Core's published 468
    TFLOP/s per H100 (the model's own prediction is printed), the experts' all-to-all bytes and the expert states'
    share follow the formulas written out here, and MFU counts active parameters (heads x head_dim for Qwen3's
    attention); the search over 64 H100 takes expert parallelism."""
    for name, (total, active) in PUBLISHED.items():
        counts = C.count_parameters(_preset_run(name, 64, pipeline=4, expert=8).model)
        assert abs(counts["total"] / total - 1) < 0.01 and abs(counts["active"] / active - 1) < 0.02, (name, counts)
    cfg = _preset_run("mixtral-8x7b", 64, pipeline=4, expert=8)
    m = cfg.model
    for device in ("h100-sxm", "h200"):
        plan = P.plan(cfg, 64, P.get_device(device), 8)
        print(f"mixtral-8x7b on 64 {device}: {plan.model_tflops_per_gpu:.0f} TFLOP/s per GPU, MFU {plan.mfu:.1%}, "
              f"{plan.peak_memory / 2**30:.1f} GiB")
        assert plan.fits and plan.layout.expert == 8
        if device == "h100-sxm":
            assert abs(plan.model_tflops_per_gpu / MEGATRON_MIXTRAL_TFLOPS - 1) < 0.25, plan.model_tflops_per_gpu
    stage = P.stages(cfg, 1, 4)[0]
    assert stage.moe_blocks == stage.blocks == 8
    comms = {(c.group, c.kind): c for c in plan.comms[0]}
    tokens, k, h, bf16 = 4096, 2, m.hidden_size, 2
    dispatch_and_combine = tokens * k * h * bf16 * 4  # two forward, two backward, per layer and micro-batch
    assert comms[("EP", "all-to-all")].bytes == 16 * 8 * (dispatch_and_combine + 8 * 8)  # + the counts, E int64
    assert comms[("EP", "all-to-all")].ranks == 8 and comms[("EP", "all-to-all")].link == "NVLink"
    # Each rank holds 1 of the 8 experts of its 8 layers; their fp32 master weights are split over the 2
    # expert-data-parallel replicas, the rest over all 16 (padding aside).
    expert = 3 * h * m.expert_ffn_size
    dense = P.numel(stage.params) - 8 * expert
    master = plan.memory[0].terms["master weights"]
    assert abs(master / (4 * (dense / 16 + 8 * expert / 2)) - 1) < 1e-4
    whole = P.plan(_preset_run("mixtral-8x7b", 64, pipeline=4, expert=1), 64, P.get_device("h100-sxm"), 8)
    assert whole.memory[0].terms["parameters"] > 3 * plan.memory[0].terms["parameters"]  # 8 experts a layer, not 1
    assert ("EP", "all-to-all") not in {(c.group, c.kind) for c in whole.comms[0]}
    qwen = _preset_run("qwen3-30b-a3b", 64, pipeline=4, expert=8)
    n = C.count_parameters(qwen.model)
    assert qwen.model.head_dim == 128 != qwen.model.hidden_size // qwen.model.num_heads
    assert P.flops_per_token(qwen) == 6 * (n["active"] - n["embedding"]) + 12 * 48 * 32 * 128 * 4096
    ranked = P.search(_preset_run("mixtral-8x7b", 64), 64, P.get_device("h100-sxm"), 8)
    best = ranked[0]
    assert best.fits and best.layout.expert > 1, best.settings.describe(best.layout)
    table = P.format_search(ranked, limit=3).splitlines()
    header = [c.strip() for c in table[1].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[3:6]]
    assert header[5:8] == ["DP", "EP", "ZeRO"] and len(table[2].split("|")) == len(header) + 2
    assert all(len(row) == len(header) for row in rows)
    assert [int(row[6]) for row in rows] == [p.layout.expert for p in ranked if p.fits][:3], table


def test_tiny_moe_preset_and_run_config() -> None:
    """The tiny MoE preset builds and starts near the uniform loss; the shipped MoE run config (the CPU demo's data,
    EP2 at ZeRO-1) validates for 2 processes and plans."""
    import math

    import torch

    from megalite.model import build_model

    cfg = C.load(Path(__file__).resolve().parent.parent / "configs/runs/moe-cpu.json", world_size=2)
    assert cfg.parallel.expert == 2 and cfg.model.moe.num_experts == 8 and cfg.zero_stage == 1
    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        loss = model(torch.randint(0, 8192, (1, 16)), labels=torch.randint(0, 8192, (1, 16)))
    assert abs(float(loss) - math.log(8192)) < 0.5
    plan = P.plan(cfg, 2, P.get_device("h100-sxm"), 8)
    assert plan.fits and plan.layout.expert == 2 and any(c.group == "EP" for c in plan.comms[0])


def test_moe_stages_in_closed_form_and_a_deep_search() -> None:
    """Each pipeline stage's parameters and MoE blocks, counted from model.moe's rule in closed form, equal the
    layer-by-layer list cut where DeepSpeed's partition_balanced cuts it (dense first layers, every k-th layer,
    tied and untied embeddings, 1-4 stages); a search over a 100,000-layer MoE model with dense layers among its
    blocks (the closed-form cut over their mean weight) finishes in seconds."""
    import random
    import time

    from megalite.plan.experts import experts_held, experts_split
    from megalite.plan.stages import numel, partition_balanced, pipeline_layers

    rng = random.Random(5)
    for _ in range(12):
        layers, pp = rng.randint(4, 30), rng.choice([1, 2, 3, 4])
        first, every, tied = rng.randint(0, 3), rng.randint(1, 3), rng.random() < 0.5
        raw = {"model": {"vocab_size": 1000, "hidden_size": 64, "num_layers": layers, "num_heads": 4,
                         "tied_embeddings": tied, "moe": {"num_experts": 4, "ffn_hidden_size": 32,
                                                          "first_dense_layers": first, "layer_interval": every}},
               "data": {"prefixes": ["x"], "seq_length": 32}, "parallel": {"pipeline": pp, "expert": 2},
               "deepspeed": {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}}}
        cfg = C.from_dict(raw, world_size=pp * 4)
        listed = pipeline_layers(cfg.model, 1, experts_held(cfg), experts_split(cfg))
        listed = listed[:-1] if pp == 1 and tied else listed
        bounds = partition_balanced([numel(ps) for _, ps in listed], pp) if pp > 1 else [0, len(listed)]
        for st in P.stages(cfg, 1, pp):
            mine = listed[bounds[st.index]:bounds[st.index + 1]]
            assert (st.numel, st.blocks, st.moe_blocks) == (
                sum(numel(ps) for _, ps in mine), sum(k != "embedding" and k != "final_norm" and k != "head"
                                                      for k, _ in mine), sum(k == "moe_block" for k, _ in mine)), raw
    raw = {"model": {"preset": "qwen3-30b-a3b", "num_layers": 100_000,
                     "moe": {"num_experts": 128, "top_k": 8, "ffn_hidden_size": 768, "first_dense_layers": 3,
                             "layer_interval": 2}},
           "data": {"prefixes": ["x"], "seq_length": 4096}, "parallel": {"pipeline": 8, "expert": 8},
           "deepspeed": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 8,
                         "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}}
    cfg = C.from_dict(C.expand_references(raw, None), world_size=1024)
    t0 = time.process_time()  # CPU time (about 7 s; its wall time reached 39 s on a loaded 2-core machine)
    plans = P.search(cfg, 1024, P.get_device("h100-sxm"), 8)
    assert plans and time.process_time() - t0 < 60
    deep = P.stages(cfg, 1, 8)
    assert sum(st.blocks for st in deep) == 100_000 and sum(st.moe_blocks for st in deep) == (100_000 - 3) // 2
