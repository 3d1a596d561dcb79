"""`megalite plan --search`: every layout of the same global batch on the same GPUs, planned and ranked."""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megalite.config import Config, Layout, context_errors
from megalite.errors import ConfigError
from megalite.plan.devices import Device
from megalite.plan.estimate import Plan, assumed, evaluate
from megalite.plan.experts import expert_degrees
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
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def candidates(cfg: Config, world_size: int, gpus_per_node: int, global_batch: int | None = None) -> list[Candidate]:
    """Every layout of `world_size` GPUs with the config's global batch (or `global_batch` sequences): TP (within a
    node, dividing heads, KV heads, FFN and vocabulary), sequence parallelism, PP and its schedule (1F1B, ZB-H1,
    DualPipeV where their rules allow: `pipeline_schedules`), ZeRO stage (as DeepSpeed allows it), micro-batch and
    accumulation, recompute on/off, chunked loss on/off, and for an MoE model the expert-parallel degree."""
    m = cfg.model
    base = layout_of(cfg, world_size)
    if global_batch is None:
        global_batch = base.micro_batch * base.accumulation * base.data
    cp = base.context  # the search keeps the config's context-parallel degree
    chunk = m.loss_chunk_tokens or 4096
    precision = cfg.precision
    accum = settings(with_layout(cfg, dataclasses.replace(base, zero_stage=1), False, 0)).grad_accum  # any stage
    out = []
    for tp in _divisors(min(world_size // cp, gpus_per_node)):
        if any(x % tp for x in (m.num_heads, m.kv_heads, m.ffn_size, m.padded_vocab_size)):
            continue
        if m.moe is not None and (m.expert_ffn_size % tp or m.shared_ffn_size % tp):
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
                    for sp, ep in itertools.product((False, True) if tp > 1 else (False,),
                                                    expert_degrees(cfg, dp * cp)):
                        layout = Layout(tensor=tp, pipeline=pp, context=cp, expert=ep, data=dp, zero_stage=zero,
                                        micro_batch=micro, accumulation=accumulation,
                                        precision=precision, sequence_parallel=sp)
                        for name in pipeline_schedules(cfg, pp, accumulation):
                            out.append(Candidate(layout, rec, chunk if chunked else 0, name))
    return out


def pipeline_schedules(cfg: Config, pp: int, accumulation: int) -> list[str]:
    """The schedules a layout of `pp` stages and `accumulation` micro-batches may run (config.validate's rules:
    DualPipeV needs 2 x pp micro-batches, blocks and evaluation micro-batches; ZB-H1 no fp16). The search tries ZB-H1
    where it is meant to run, at least as many micro-batches as stages (its closed form then prices it at once; a
    config with fewer is still planned, by simulation)."""
    if pp == 1:
        return ["1f1b"]
    out = ["1f1b"]
    if cfg.precision != "fp16" and accumulation >= pp:
        out.append("zb-h1")
    if min(accumulation, cfg.model.num_layers, cfg.train.eval_steps) >= 2 * pp:
        out.append("dualpipev")
    return out


def search(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8,
           allowance_gib: float = ALLOWANCE_GIB, progress: Callable[[int, int], None] | None = None,
           global_batch: int | None = None, assume: dict[str, Any] | None = None) -> list[Plan]:
    """Every candidate layout (`candidates`), planned, ranked: layouts that fit first, by predicted tokens/s.
    `progress(done, total)` is called after each candidate."""
    plans = []
    todo = candidates(cfg, world_size, gpus_per_node, global_batch)
    for done, c in enumerate(todo, 1):
        new = with_layout(cfg, c.layout, c.recompute, c.loss_chunk_tokens, c.pipeline_schedule)
        try:
            s = assumed(settings(new), assume)
        except ConfigError:
            continue
        finally:
            if progress is not None:
                progress(done, len(todo))
        plans.append(evaluate(new, c.layout, s, device, gpus_per_node, allowance_gib))
    # Throughput to 4 significant digits, then the least memory: of layouts the model cannot tell apart in speed
    # (micro-batch sizes, which it does not charge for), the one with the most headroom first.
    plans.sort(key=lambda p: (not p.fits, -float(f"{p.tokens_per_s:.4g}"), p.peak_memory))
    return plans


def stderr_progress(label: str = "megalite plan --search", after_s: float = 2.0,
                    every_s: float = 2.0) -> Callable[[int, int], None]:
    """A `search` progress callback for a terminal: silent for a search shorter than `after_s`, then a line on stderr
    every `every_s` seconds and at the end."""
    start = time.perf_counter()
    last = [start]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - start < after_s or (now - last[0] < every_s and done < total):
            return
        last[0] = now
        print(f"{label}: {done}/{total} layouts planned ({now - start:.0f} s)", file=sys.stderr, flush=True)

    return report
