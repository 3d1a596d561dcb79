"""Pipeline schedules: the order in which each pipeline rank runs its passes, and what that order costs.

One description serves the planner and the engine: `rank_order` is the sequence of passes a rank runs in a step,
and megalite's ZB-H1 engine (megalite.engine.pipeline_schedules) executes exactly the order given here; the 1F1B and
DualPipeV orders are DeepSpeed's (`TrainSchedule`, `DualPipeVSchedule`), reproduced pass for pass
(tests/test_pipeline_schedules.py compares them with DeepSpeed's instruction streams). `simulate` runs the orders
with a time per pass and gives the step time, each rank's idle fraction and the activations each rank holds; the
planner's bubble, step time and in-flight memory come from it.

Passes: F (forward), B (backward: input and weight gradients), I (input gradients only) and W (weight gradients
only; zero bubble). Chunks: DualPipeV puts two of its 2p chunks on each of p ranks, chunk 0 (virtual stage r, the
way out) and chunk 1 (virtual stage 2p - 1 - r, the way back); the other schedules have one chunk per rank.

Closed forms, for p stages, m >= p micro-batches and uniform stages with pass times F, I (input gradients) and W:
- 1f1b:  step = (m + p - 1)(F + I + W); idle fraction (p - 1)/(m + p - 1), bubble (p - 1)/m of the useful work;
- zb-h1: step = m(F + I + W) + (p - 1)(F + I - W) when W <= F and W <= I (the simulation otherwise); with
  F = I = W, bubble (p - 1)/(3m);
  rank s holds the activations of at most p - s micro-batches awaiting I (1F1B's) plus the weight-gradient inputs
  of at most s awaiting W, p in all: 1F1B's peak;
- dualpipev (DeepSpeed's, weight gradients inside B, no overlap of forward and backward): from the simulation; with
  F = I = W per stage it is m(F + I + W) + (2p - 2.5)F, for example a bubble of 5.5/24 of the useful work at p = 4,
  m = 8 against 9/24 for 1F1B and 3/24 for ZB-H1. Rank 0 holds the embedding and the output layer (both chunks'
  ends); each rank holds two chunks' activations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megalite.plan.stages import Param, ParamSet, Stage, stages

if TYPE_CHECKING:
    from megalite.config import Config, Layout
    from megalite.plan.layout import Settings

SCHEDULES = ("1f1b", "zb-h1", "dualpipev")

Pass = tuple[str, int, int]  # (kind: F | B | I | W, micro-batch, chunk)


def chunks(name: str) -> int:
    """Model chunks per rank."""
    return 2 if name == "dualpipev" else 1


def virtual_stage(name: str, stages: int, rank: int, chunk: int) -> int:
    """The position in the model of `rank`'s `chunk` (DualPipeV's V: chunk 1 of rank r is stage 2p - 1 - r)."""
    return rank if chunk == 0 else 2 * stages - 1 - rank


# ----------------------------------------------------------------------------- the orders


def _one_f_one_b(stages: int, m: int, s: int) -> list[Pass]:
    """DeepSpeed's TrainSchedule: p - s - 1 warm-up forwards, then forward/backward pairs, then the backwards."""
    warm = min(stages - s - 1, m)
    order: list[Pass] = [("F", j, 0) for j in range(warm)]
    forward = warm
    for backward in range(m):
        if forward < m:
            order.append(("F", forward, 0))
            forward += 1
        order.append(("B", backward, 0))
    return order


def _zb_h1(stages: int, m: int, s: int) -> list[Pass]:
    """ZB-H1 (Qi et al. 2024): 1F1B's in-flight depth (p - s forwards before the first input-gradient pass), then
    I, W, F in turn, with stage s keeping its W passes s micro-batches behind its I passes; the last W passes fill
    the end of the step, where 1F1B's earlier stages wait for the later ones."""
    warm = min(stages - s, m)
    order: list[Pass] = [("F", j, 0) for j in range(warm)]
    forward, weight = warm, 0
    for backward in range(m):
        order.append(("I", backward, 0))
        if backward + 1 - weight > s:
            order.append(("W", weight, 0))
            weight += 1
        if forward < m:
            order.append(("F", forward, 0))
            forward += 1
    order += [("W", j, 0) for j in range(weight, m)]
    return order


def _dualpipev(stages: int, m: int, r: int) -> list[Pass]:
    """DeepSpeed's DualPipeVSchedule, its passes only (its steps 1-8; weight gradients inside B)."""
    if m < 2 * stages:
        raise ValueError(f"DualPipeV needs at least 2 x {stages} micro-batches, got {m}")
    count = {("F", 0): 0, ("F", 1): 0, ("B", 0): 0, ("B", 1): 0}
    order: list[Pass] = []

    def run(kind: str, chunk: int) -> None:
        order.append((kind, count[kind, chunk], chunk))
        count[kind, chunk] += 1

    for _ in range((stages - r - 1) * 2):  # 1: forwards of chunk 0
        run("F", 0)
    for _ in range(r + 1):  # 2: chunk 0 and chunk 1 forwards in turn
        run("F", 0)
        run("F", 1)
    for _ in range(stages - r - 1):  # 3: chunk 1's backward, then its forward
        run("B", 1)
        run("F", 1)
    for _ in range(m - stages * 2 + r + 1):  # 4: F0 B1 F1 B0
        run("F", 0)
        run("B", 1)
        run("F", 1)
        run("B", 0)
    for _ in range(stages - r - 1):  # 5: B1 F1 B0
        run("B", 1)
        run("F", 1)
        run("B", 0)
    for _ in range(r + 1):  # 6: B1 B0
        run("B", 1)
        run("B", 0)
    for _ in range(stages - r - 1):  # 7: the remaining B0
        run("B", 0)
    return order


_ORDERS = {"1f1b": _one_f_one_b, "zb-h1": _zb_h1, "dualpipev": _dualpipev}


def rank_order(name: str, stages: int, micro_batches: int, rank: int) -> list[Pass]:
    """The passes pipeline rank `rank` runs in one training step, in order."""
    if name not in _ORDERS:
        raise ValueError(f"pipeline schedule {name!r} is not one of {', '.join(SCHEDULES)}")
    if stages == 1:
        return [(kind, j, 0) for j in range(micro_batches) for kind in (("F", "I", "W") if name == "zb-h1"
                                                                         else ("F", "B"))]
    return _ORDERS[name](stages, micro_batches, rank)


# ----------------------------------------------------------------------------- simulation


@dataclass
class Timeline:
    """One simulated step: its length, each rank's busy time and the most micro-batch chunks whose activations
    (awaiting their input-gradient pass) and weight-gradient inputs (awaiting W) each rank held at once."""

    step: float
    busy: list[float]
    activations: list[int]
    deferred: list[int]

    def idle(self, rank: int) -> float:
        """Rank `rank`'s idle fraction of the step."""
        return 1.0 - self.busy[rank] / self.step if self.step else 0.0

    @property
    def bubble(self) -> float:
        """Idle fraction of the busiest rank (the planner's 'pipeline bubble')."""
        return 1.0 - max(self.busy) / self.step if self.step else 0.0


def simulate(name: str, stages: int, micro_batches: int,
             times: list[list[tuple[float, float, float]]] | tuple[float, float, float]) -> Timeline:
    """Run every rank's order with pass times `times[rank][chunk] = (F, I, W)` seconds (one triple: every rank and
    chunk alike). A pass starts when its rank is free and its inputs exist: a forward after the previous virtual
    stage's forward of that micro-batch, a backward after the next virtual stage's backward and its own forward,
    W after its I. Transfers take no time here (the planner charges them inside the passes)."""
    n_chunks = chunks(name)
    if isinstance(times, tuple):
        times = [[times] * n_chunks for _ in range(stages)]
    orders = [rank_order(name, stages, micro_batches, r) for r in range(stages)]
    last_virtual = stages * n_chunks - 1
    owner = {virtual_stage(name, stages, r, c): r for r in range(stages) for c in range(n_chunks)}
    finished: dict[tuple[str, int, int], float] = {}  # (F | G (input gradients done), virtual stage, micro)
    free, busy = [0.0] * stages, [0.0] * stages
    position = [0] * stages
    activations, deferred = [0] * stages, [0] * stages
    held, waiting = [0] * stages, [0] * stages
    # A worklist: a rank runs its passes in order until one waits for another rank's pass; a finished pass wakes the
    # ranks of the neighbouring virtual stages (each pass is visited a bounded number of times).
    todo, queued = list(range(stages)), [True] * stages
    while todo:
        r = todo.pop()
        queued[r] = False
        while position[r] < len(orders[r]):
            kind, j, c = orders[r][position[r]]
            v = virtual_stage(name, stages, r, c)
            if kind == "F":
                needs = [("F", v - 1, j)] if v > 0 else []
            elif kind == "W":
                needs = [("G", v, j)]
            else:
                needs = [("F", v, j)] + ([("G", v + 1, j)] if v < last_virtual else [])
            if any(k not in finished for k in needs):
                break
            f, i, w = times[r][c]
            seconds = {"F": f, "I": i, "W": w, "B": i + w}[kind]
            start = max([free[r]] + [finished[k] for k in needs])
            free[r] = start + seconds
            busy[r] += seconds
            wake = ()
            if kind == "F":
                finished["F", v, j] = free[r]
                held[r] += 1
                activations[r] = max(activations[r], held[r])
                wake = (v + 1,)
            elif kind in ("B", "I"):
                finished["G", v, j] = free[r]
                held[r] -= 1
                if kind == "I":
                    waiting[r] += 1
                    deferred[r] = max(deferred[r], waiting[r])
                wake = (v - 1,)
            else:
                waiting[r] -= 1
            position[r] += 1
            for u in wake:
                other = owner.get(u)
                if other is not None and other != r and not queued[other]:
                    queued[other] = True
                    todo.append(other)
    if any(position[r] < len(orders[r]) for r in range(stages)):
        raise RuntimeError(f"pipeline schedule {name!r} deadlocks at p={stages}, m={micro_batches}")
    return Timeline(max(free), busy, activations, deferred)


# ----------------------------------------------------------------------------- what the planner reads


def split_passes(t: Any, recompute: bool) -> tuple[float, float, float]:
    """(F, I, W) seconds of one micro-batch on a stage from its `megalite.plan.timing.StageTime` `t`: W is the
    blocks' weight-gradient matmuls (`t.weight_grad`); F the blocks' forward matmuls (as many FLOPs as W), a third of
    the other matmuls (the output layer's forward of its three), the forward's share of attention (1 of 3.5 flash
    attention passes, 1 of 4.5 with recompute) and of the rest (memory-bound kernels and transfers: half, a third
    with recompute); I everything else (input gradients, and the recomputed forward)."""
    fwd = 2 if recompute else 1
    blocks = t.weight_grad * (2 + fwd)
    forward = (t.weight_grad + (t.matmul - blocks) / 3 + t.attention / (2.5 + fwd)
               + (t.memory_bound + t.tp_comm + t.pp_comm) / (1 + fwd))
    return forward, t.total - forward - t.weight_grad, t.weight_grad


@functools.lru_cache(maxsize=4096)
def _unit(name: str, stages: int, micro_batches: int) -> Timeline:
    """The simulation with unit pass times (the planner asks for it once per stage of every layout it plans)."""
    return simulate(name, stages, micro_batches, (1.0, 1.0, 1.0))


def in_flight(stage: int, stages: int, micro_batches: int, name: str = "1f1b") -> int:
    """Micro-batches whose activations rank `stage` holds at once, in units of the rank's whole layers: 1F1B's
    warm-up depth min(p - s, m), ZB-H1's the same, DualPipeV's the peak of its two chunks' micro-batches (each chunk
    half the rank's layers), rounded up."""
    if stages == 1:
        return 1
    if name in ("1f1b", "zb-h1"):  # ZB-H1 keeps 1F1B's warm-up depth (tests compare with the simulation)
        return min(stages - stage, micro_batches)
    return -(-_unit(name, stages, micro_batches).activations[stage] // chunks(name))


def deferred_weight_inputs(stage: int, stages: int, micro_batches: int, name: str = "1f1b") -> int:
    """Micro-batches whose weight-gradient inputs (each deferred linear's input and output gradient) rank `stage`
    holds after their input-gradient pass, awaiting W: up to `stage` under ZB-H1, none otherwise."""
    if name != "zb-h1" or stages == 1:
        return 0
    # W runs s input-gradient passes late: s micro-batches wait beside the one whose I just ran (fewer when m <= s)
    return min(stage, micro_batches - 1)


def point_to_point_links(name: str, stage: int, stages: int) -> int:
    """Neighbour exchanges per micro-batch of rank `stage` (each: an activation one way, its gradient the other):
    one per neighbour, and DualPipeV's two chunks exchange twice with each."""
    links = (stage > 0) + (stage < stages - 1)
    return links * chunks(name)


def step_slots(stages: int, micro_batches: int) -> int:
    """A 1F1B step's length in micro-batch times of the slowest stage: m + p - 1."""
    return micro_batches + stages - 1


def step_seconds(name: str, stages: int, micro_batches: int, passes: tuple[float, float, float]) -> Timeline:
    """A step of `stages` ranks that each take `passes` = (F, I, W) seconds per micro-batch of their layers (the
    planner gives every rank its slowest stage's: the 1F1B step is then (m + p - 1) x (F + I + W)). DualPipeV's chunks
    take half of each."""
    if name == "1f1b" or stages == 1:  # the closed form (what the simulation gives, without its rounding)
        total = sum(passes)
        step = step_slots(stages, micro_batches) * total if stages > 1 else micro_batches * total
        return Timeline(step, [micro_batches * total] * stages, [], [])
    total = sum(passes)
    if not total:
        return Timeline(0.0, [0.0] * stages, [], [])
    f, i, w = passes
    if name == "zb-h1" and micro_batches >= stages and w <= min(f, i):
        # ZB-H1's closed form, what the simulation gives in this range (tests/test_pipeline_schedules.py)
        step = micro_batches * total + (stages - 1) * (f + i - w)
        return Timeline(step, [micro_batches * total] * stages, [], [])
    # The simulation scales with the pass times: run it on their proportions (to 3 decimals, so that the layouts of a
    # search share runs) and scale the result.
    unit = _proportional(name, stages, micro_batches, round(f / total, 3), round(i / total, 3))
    return Timeline(unit.step * total, [b * total for b in unit.busy], unit.activations, unit.deferred)


@functools.lru_cache(maxsize=65536)
def _proportional(name: str, stages: int, micro_batches: int, forward: float, input_grad: float) -> Timeline:
    passes = (forward, input_grad, max(1.0 - forward - input_grad, 0.0))
    if name == "dualpipev":  # each chunk has half the rank's layers
        passes = (passes[0] / 2, passes[1] / 2, passes[2] / 2)
    return simulate(name, stages, micro_batches, passes)


def chunk_stages(cfg: Config, tp: int, pp: int, rank: int) -> list[Stage]:
    """The stages (layers) of each of `rank`'s chunks: its stage, or DualPipeV's virtual stages r and 2p - 1 - r."""
    if cfg.parallel.pipeline_schedule != "dualpipev" or pp == 1:
        return [stages(cfg, tp, pp)[rank]]
    cut = stages(cfg, tp, 2 * pp)
    return [cut[rank], cut[2 * pp - 1 - rank]]


def peak_activation_bytes(name: str, stages: int, micro_batches: int, rank: int, per_chunk: list[float]) -> float:
    """The most activation bytes `rank` holds at once, its chunks' micro-batches costing `per_chunk` bytes each: a
    chunk's micro-batch is held from its forward to its (input-)gradient pass, so the peak follows from the rank's
    own order, whatever the timing."""
    if stages == 1:
        return per_chunk[0]
    held = [0] * len(per_chunk)
    peak = 0.0
    for kind, _, chunk in rank_order(name, stages, micro_batches, rank):
        if kind == "F":
            held[chunk] += 1
            peak = max(peak, sum(h * b for h, b in zip(held, per_chunk)))
        elif kind in ("B", "I"):
            held[chunk] -= 1
    return peak


def rank_stages(cfg: Config, tp: int, pp: int) -> list[Stage]:
    """What each pipeline rank holds under the config's schedule: DeepSpeed's stages, or under DualPipeV the two
    stages r and 2p - 1 - r of its 2p-stage partition (rank 0: the embedding and the output layer; a tied embedding
    is one module there, counted once)."""
    if cfg.parallel.pipeline_schedule != "dualpipev" or pp == 1:
        return stages(cfg, tp, pp)
    out = []
    for r in range(pp):
        a, b = chunk_stages(cfg, tp, pp, r)
        shared = a.embedding and b.head and cfg.model.tied_embeddings  # the tied output layer is the embedding
        held = ParamSet(a.params.groups + tuple((ps, n) for ps, n in b.params.groups
                                                if not (shared and _embedding_only(ps))))
        out.append(Stage(r, a.blocks + b.blocks, a.embedding or b.embedding, a.head or b.head, held, held.numel,
                         a.exact and b.exact))
    return out


def _embedding_only(params: tuple[Param, ...]) -> bool:
    return all(p.name.startswith("embedding.") for p in params)


def weight_grad_input_bytes(cfg: Config, layout: Layout, stage: Stage, s: Settings) -> float:
    """What one micro-batch's deferred weight gradients keep on a rank of `stage` after its input-gradient pass:
    each block linear's input (sequence-gathered with sequence parallelism) and output gradient."""
    m = cfg.model
    tp = layout.tensor
    n = layout.micro_batch * cfg.data.seq_length // layout.context
    q, kv, f = m.num_heads * m.head_dim, m.kv_heads * m.head_dim, m.ffn_size
    fc = 2 * f if m.mlp == "swiglu" else f
    inputs = m.hidden_size + q // tp + m.hidden_size + f // tp
    grads = (q + 2 * kv) // tp + m.hidden_size + fc // tp + m.hidden_size
    return float(stage.blocks * n * (inputs + grads) * s.element)


def bubble(stages: int, micro_batches: int, name: str = "1f1b") -> float:
    """The idle fraction of a step of uniform stages with equal forward, input-gradient and weight-gradient passes
    ((p - 1)/(m + p - 1) under 1F1B)."""
    if stages == 1:
        return 0.0
    return _unit(name, stages, micro_batches).bubble
