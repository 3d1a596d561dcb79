"""`megalite plan`'s step time against the published runs its constants were set from: Narayanan et al. 2021,
Tables 1 and 2 (Megatron-LM on A100); torchtitan's Llama 3.1 8B on 8 H100; megalite's own H200 step
(kernels/results/h200-2026-11-30). Runs the plan was not tuned on are in tests/test_plan_published.py."""

from __future__ import annotations

import pytest

from megalite import plan as P
from tests.helpers.plan_configs import from_dict_on_paper, plan_config, preset_model

GiB = 2**30

# Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"),
# A100 80GB (312 TFLOP/s), V = 51,200, s = 2048, fp16, activation recomputation. Table 1: (params, heads, hidden,
# layers, TP, PP, GPUs, batch, TFLOP/s per GPU); its micro-batch is not printed: 1 is assumed, the setting of
# the paper's Table 2 PTD-P runs (it matters only through the pipeline bubble).
TABLE_1 = [(1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
           (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
           (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
           (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
           (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163)]
# Table 2: ZeRO-3 without model parallelism and PTD-P (TP8 x PP12 / PP35), with their micro-batch sizes.
TABLE_2 = [("ZeRO-3", 174.6, 96, 12288, 96, 1, 1, 384, 1536, 4, 144), ("ZeRO-3", 174.6, 96, 12288, 96, 1, 1, 768, 1536, 2, 88),
           ("ZeRO-3", 174.6, 96, 12288, 96, 1, 1, 1536, 1536, 1, 44), ("ZeRO-3", 529.6, 128, 20480, 105, 1, 1, 640, 2560, 4, 138),
           ("ZeRO-3", 529.6, 128, 20480, 105, 1, 1, 1120, 2240, 2, 98), ("ZeRO-3", 529.6, 128, 20480, 105, 1, 1, 2240, 2240, 1, 48),
           ("PTD-P", 174.6, 96, 12288, 96, 8, 12, 384, 1536, 1, 153), ("PTD-P", 174.6, 96, 12288, 96, 8, 12, 768, 1536, 1, 149),
           ("PTD-P", 174.6, 96, 12288, 96, 8, 12, 1536, 1536, 1, 141), ("PTD-P", 529.6, 128, 20480, 105, 8, 35, 560, 2240, 1, 171),
           ("PTD-P", 529.6, 128, 20480, 105, 8, 35, 1120, 2240, 1, 167), ("PTD-P", 529.6, 128, 20480, 105, 8, 35, 2240, 2240, 1, 159)]


def megatron_prediction(heads: int, h: int, layers: int, tp: int, pp: int, gpus: int, batch: int, micro: int,
                        zero3: bool = False) -> float:
    """The plan's TFLOP/s per GPU for one of the paper's runs, counted as the paper counts (its equation 3:
    96 B s l h^2 (1 + s/6h + V/16lh), recomputation included) over the plan's step time. Megatron-LM of 2021 is
    modelled as what it ran: fp16, a stored T x T softmax with dropout 0.1 on it and on the hidden states,
    recomputation, no overlap of the data-parallel reduction (ZeRO-1's extra parameter all-gather at PP > 1, where
    megalite requires ZeRO-1, is under 1% of these steps), Megatron-LM's engine (`--engine megatron`)."""
    dp = gpus // (tp * pp)
    stage = 3 if zero3 else (0 if pp == 1 else 1)
    raw = {"model": {"vocab_size": 51200, "hidden_size": h, "num_layers": layers, "num_heads": heads,
                     "max_position_embeddings": 2048, "hidden_dropout": 0.1, "attention_dropout": 0.1,
                     "activation_checkpointing": True},
           "parallel": {"tensor": tp, "pipeline": pp, "pipeline_partition": "uniform"},
           "data": {"prefixes": ["x"], "seq_length": 2048},
           "deepspeed": {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": batch // (dp * micro),
                         "fp16": {"enabled": True}, "zero_optimization": {"stage": stage}}}
    plan = P.plan(from_dict_on_paper(raw), gpus, P.get_device("a100-80g"), 8, attention="materialized",
                  assume={"engine": "megatron"})
    flops = 96 * batch * 2048 * layers * h * h * (1 + 2048 / (6 * h) + 51200 / (16 * layers * h))
    return flops / plan.step_s / gpus / 1e12


@pytest.mark.parametrize("row", TABLE_1, ids=[f"{r[0]}B-{r[6]}gpus" for r in TABLE_1])
def test_megatron_table_1_within_25_percent(row: tuple) -> None:
    _, heads, h, layers, tp, pp, gpus, batch, published = row
    predicted = megatron_prediction(heads, h, layers, tp, pp, gpus, batch, 1)
    assert abs(predicted / published - 1) < 0.25, (row, predicted)


# The ZeRO-3 rows ran DeepSpeed's ZeRO-3 of 2021: their TFLOP/s fall in proportion to the micro-batch (144, 88, 44
# at micro-batch 4, 2, 1 for 175B), a cost per micro-batch about 2.5x its compute at micro-batch 1 that NCCL's own cost
# model of its rings (every NIC of a node, a latency per hop) does not produce. The plan models today's DeepSpeed 0.19
# on NCCL, which MosaicML's multi-node FSDP runs match within 2% (tests/test_plan_published.py); it predicts these rows
# 34-132% too fast (docs/plan.md).
ZERO3_2021 = "DeepSpeed's ZeRO-3 of 2021 is far slower than NCCL's cost model of its traffic (see ZERO3_2021 above)"
TABLE_2_CASES = [pytest.param(r, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=ZERO3_2021))
                 if r[0] == "ZeRO-3" else r for r in TABLE_2]


@pytest.mark.parametrize("row", TABLE_2_CASES, ids=[f"{r[0]}-{r[1]}B-{r[7]}gpus" for r in TABLE_2])
def test_megatron_table_2_within_25_percent(row: tuple) -> None:
    scheme, _, heads, h, layers, tp, pp, gpus, batch, micro, published = row
    predicted = megatron_prediction(heads, h, layers, tp, pp, gpus, batch, micro, zero3=scheme == "ZeRO-3")
    assert abs(predicted / published - 1) < 0.25, (row, predicted)


def torchtitan_prediction() -> float:
    """torchtitan's docs/performance.md, Table 1: Llama 3.1 8B on 8 H100 (96 GB HBM2e at 2.4 TB/s, 500 W power
    limit), FSDP, bf16, local batch 2 x 8192 tokens, selective activation checkpointing: 5,762 tokens/s per GPU.
    Modelled as ZeRO-3 on SDPA flash attention without recompute (megalite has no selective recompute), on an
    H100 SXM entry with their memory and bandwidth."""
    cfg = plan_config("llama-8b", data={"seq_length": 8192}, train={"kernels": "torch"},
                  deepspeed={"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                             "zero_optimization": {"stage": 3}})
    device = P.get_device("h100-sxm").with_overrides(memory_gib=96e9 / GiB, hbm_tbps=2.4)
    return P.plan(cfg, 8, device, 8).tokens_per_s / 8


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="the plan predicts about 9,500 tokens/s/GPU (+64%): it models neither the 500 W power limit "
                   "of those H100s nor torch eager's unfused norms, RoPE and SwiGLU nor selective recompute; no "
                   "constant is fitted to close the gap")
def test_torchtitan_llama3_8b_within_25_percent() -> None:
    assert abs(torchtitan_prediction() / 5762 - 1) < 0.25


def h200_gpt3_1p3b() -> P.Plan:
    """kernels/results/h200-2026-11-30/model-triton.json: gpt3-1.3b, seq 2048, micro-batch 4, bf16, ZeRO-1, one
    H200, Triton kernels: 183 ms per step, torch.cuda.max_memory_allocated 38.04 GiB."""
    model = {**preset_model("gpt3-1.3b"), "max_position_embeddings": 2048}
    cfg = plan_config(model, train={"kernels": "triton"},
                  deepspeed={"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                             "zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {}}})
    return P.plan(cfg, 1, P.get_device("h200"), 1)


def test_measured_h200_step() -> None:
    """megalite's own GPU measurement: allocated memory within 5% (the plan's peak, before its allowance, is what
    max_memory_allocated shows), step time within 25%."""
    plan = h200_gpt3_1p3b()
    assert abs(plan.memory[0].allocated / GiB / 38.04 - 1) < 0.05, plan.memory[0].allocated / GiB
    assert abs(plan.step_s / 0.183 - 1) < 0.25, plan.step_s
