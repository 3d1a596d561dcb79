"""`megalite plan --search`: every layout of the same global batch on the same GPUs, planned and ranked."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from megalite.config import Config, Layout, context_errors
from megalite.errors import ConfigError
from megalite.plan.devices import Device
from megalite.plan.estimate import Plan, evaluate
from megalite.plan.layout import layout_of, settings, with_layout
from megalite.plan.memory import ALLOWANCE_GIB


@dataclass(frozen=True)
class Candidate:
    """One point of the search: a layout, and the choices only the planner varies besides it."""

    layout: Layout
    recompute: bool
    loss_chunk_tokens: int
    pipeline_schedule: str = "1f1b"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: Config, world_size: int, gpus_per_node: int) -> list[Candidate]:
    """Every layout of `world_size` GPUs with the config's global batch: TP (within a node, dividing heads, KV
    heads, FFN and vocabulary), sequence parallelism, PP and its schedule (1F1B, ZB-H1, DualPipeV where their rules
    allow: `pipeline_schedules`), ZeRO stage (as DeepSpeed allows it), micro-batch and accumulation, recompute on/off,
    chunked loss on/off."""
    m = cfg.model
    base = layout_of(cfg, world_size)
    global_batch = base.micro_batch * base.accumulation * base.data
    cp = base.context  # the search keeps the config's context-parallel degree
    chunk = m.loss_chunk_tokens or 4096
    precision = cfg.precision
    accum = settings(cfg).grad_accum
    out = []
    for tp in _divisors(min(world_size // cp, gpus_per_node)):
        if any(x % tp for x in (m.num_heads, m.kv_heads, m.ffn_size, m.padded_vocab_size)):
            continue
        if context_errors(m, tp, cp, cfg.data.seq_length):
            continue
        for pp in _divisors(world_size // (tp * cp)):
            if pp > m.num_layers:
                continue
            dp = world_size // (tp * pp * cp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            if pp > 1:
                zeros = [1]  # DeepSpeed refuses ZeRO-2/3 with a pipeline; megalite refuses ZeRO-0
            else:
                zeros = [z for z in (0, 1, 2, 3) if z or (4 if precision == "fp32" else 2) == accum]
            for micro in _divisors(per_replica):
                if (cfg.data.seq_length // cp) % tp:
                    continue
                accumulation = per_replica // micro
                for zero, rec, chunked in itertools.product(zeros, (False, True), (False, True)):
                    for sp in ((False, True) if tp > 1 else (False,)):
                        layout = Layout(tensor=tp, pipeline=pp, context=cp, data=dp, zero_stage=zero,
                                        micro_batch=micro, accumulation=accumulation,
                                        precision=precision, sequence_parallel=sp)
                        for name in pipeline_schedules(cfg, pp, accumulation):
                            out.append(Candidate(layout, rec, chunk if chunked else 0, name))
    return out


def pipeline_schedules(cfg: Config, pp: int, accumulation: int) -> list[str]:
    """The schedules a layout of `pp` stages and `accumulation` micro-batches may run (config.validate's rules:
    DualPipeV needs 2 x pp micro-batches, blocks and evaluation micro-batches; ZB-H1 no fp16)."""
    if pp == 1:
        return ["1f1b"]
    out = ["1f1b"]
    if cfg.precision != "fp16":
        out.append("zb-h1")
    if min(accumulation, cfg.model.num_layers, cfg.train.eval_steps) >= 2 * pp:
        out.append("dualpipev")
    return out


def search(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8,
           allowance_gib: float = ALLOWANCE_GIB) -> list[Plan]:
    """Every candidate layout, planned, ranked: layouts that fit first, by predicted tokens/s."""
    plans = []
    for c in candidates(cfg, world_size, gpus_per_node):
        new = with_layout(cfg, c.layout, c.recompute, c.loss_chunk_tokens, c.pipeline_schedule)
        try:
            s = settings(new)
        except ConfigError:
            continue
        plans.append(evaluate(new, c.layout, s, device, gpus_per_node, allowance_gib))
    # Throughput to 4 significant digits, then the least memory: of layouts the model cannot tell apart in speed
    # (micro-batch sizes, which it does not charge for), the one with the most headroom first.
    plans.sort(key=lambda p: (not p.fits, -float(f"{p.tokens_per_s:.4g}"), p.peak_memory))
    return plans
