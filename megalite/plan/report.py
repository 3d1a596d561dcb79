"""The human-readable reports of `megalite plan`: one plan in full, and the `--search` table."""

from __future__ import annotations

from megalite.plan.communication import transfer_seconds
from megalite.plan.devices import GiB
from megalite.plan.estimate import Plan
from megalite.plan.layout import PATH_NAMES
from megalite.plan.memory import FRAGMENTATION
from megalite.plan.timing import attention_fraction


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _bytes(x: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _shown_stages(p: Plan) -> list[int]:
    worst = p.worst_stage().stage
    picks = sorted({0, len(p.memory) - 1, worst})
    return picks


def format_plan(p: Plan, source: str = "") -> str:
    """The human-readable report of one plan."""
    lay, s, dev = p.layout, p.settings, p.device
    world = lay.world
    nodes = max(1, world // p.gpus_per_node)
    lines = [f"megalite plan{': ' + source if source else ''}",
             f"cluster: {world} x {dev.name} ({nodes} node{'s' if nodes > 1 else ''} of "
             f"{min(world, p.gpus_per_node)}), {dev.memory_gib:.1f} GiB each",
             f"layout:  {s.describe(lay)}"
             + (f", pipeline schedule {p.cfg.parallel.pipeline_schedule}" if lay.pipeline > 1 else ""),
             f"         global batch {lay.micro_batch * lay.accumulation * lay.data} x {p.cfg.data.seq_length} tokens; "
             f"{s.optimizer}; DeepSpeed holds model states in {PATH_NAMES[s.path]}"]
    shown = _shown_stages(p)
    header = "".join(f"{'stage ' + str(i):>10}" for i in shown)
    lines += ["", f"memory per GPU (GiB)                      {header}"]
    keys: list[str] = []
    for i in shown:
        for k in p.memory[i].terms:
            if k not in keys:
                keys.append(k)
    for k in keys:
        row = "".join(f"  {_gib(p.memory[i].terms.get(k, 0.0))}" for i in shown)
        label = k if k != "activations" else "activations (all in flight)"
        lines.append(f"  {label:<40}{row}")
    lines.append(f"  {'micro-batches in flight':<40}" + "".join(f"  {p.memory[i].in_flight:8d}" for i in shown))
    lines.append(f"  {'allocated peak':<40}" + "".join(f"  {_gib(p.memory[i].allocated)}" for i in shown))
    lines.append(f"  {'+ allowance ' + str(p.allowance_gib) + ' GiB + ' + str(int(FRAGMENTATION * 100)) + '%':<40}"
                 + "".join(f"  {_gib(p.memory[i].total(p.allowance_gib) - p.memory[i].allocated)}" for i in shown))
    lines.append(f"  {'total':<40}" + "".join(f"  {_gib(p.memory[i].total(p.allowance_gib))}" for i in shown))
    lines.append(f"  {'headroom on ' + f'{dev.memory_gib:.1f} GiB':<40}"
                 + "".join(f"  {_gib(dev.memory_gib * GiB - p.memory[i].total(p.allowance_gib))}" for i in shown))
    host = p.memory[0].host
    if host:
        lines.append("  offloaded to host memory: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in host.items()))
    worst = p.worst_stage()
    detail = ", ".join(f"{k} {v / GiB:.2f}" if v >= 0.005 * GiB else f"{k} <0.01"
                       for k, v in worst.activations_per_micro_batch.items())
    lines.append(f"  activations of one micro-batch on stage {worst.stage} (GiB): {detail}")
    if not p.fits:
        lines.append("  " + not_fitting_line(p))

    lines += ["", "communication per step, per GPU (stage with the most traffic)",
              f"  {'group':<16}{'collective':<16}{'payload':>12}{'ranks':>7}  {'link':<8}{'time':>10}"]
    busiest = max(range(len(p.comms)), key=lambda i: sum(transfer_seconds(c, dev) for c in p.comms[i]))
    for c in sorted(p.comms[busiest], key=lambda c: -c.bytes):
        lines.append(f"  {c.group:<16}{c.kind:<16}{_bytes(c.bytes):>12}{c.ranks:>7}  {c.link:<8}"
                     f"{transfer_seconds(c, dev) * 1e3:>8.1f} ms")
    if not p.comms[busiest]:
        lines.append("  (none: a single GPU)")
    lines.append("  TP and PP transfers are on the critical path; DP traffic waits for the backward, except ZeRO-1/2's "
                 "gradient buckets with overlap_comm")

    t = max(p.times, key=lambda t: t.total)
    m = lay.accumulation
    eff = dev.efficiency
    name = p.cfg.parallel.pipeline_schedule
    if lay.pipeline == 1:
        bubble = "no pipeline bubble"
    elif name == "1f1b":
        bubble = f"pipeline bubble (1f1b) (p - 1)/(m + p - 1) = {lay.pipeline - 1}/{m + lay.pipeline - 1} = {p.bubble:.1%}"
    else:
        bubble = f"pipeline bubble ({name}, simulated) {p.bubble:.1%} of the step"
    lines += ["", f"time per step (slowest stage's passes in the {name if lay.pipeline > 1 else 'plain'} schedule, plus "
              "optimizer and DP)",
              f"  matmul {t.matmul * 1e3:.1f} ms, attention {t.attention * 1e3:.1f} ms, memory-bound "
              f"{t.memory_bound * 1e3:.1f} ms, {'TP+CP' if lay.context > 1 else 'TP'} {t.tp_comm * 1e3:.1f} ms, "
              f"PP {t.pp_comm * 1e3:.1f} ms "
              + (f"+ pipeline engine's host work beyond them {t.host_exposed * 1e3:.1f} ms " if t.host_exposed else "")
              + f"= {t.total * 1e3:.1f} ms per micro-batch",
              f"  {bubble}; optimizer {p.optimizer_s * 1e3:.1f} ms; exposed DP {p.dp_exposed_s * 1e3:.1f} ms",
              f"  step {p.step_s:.3f} s: {p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s / world:,.0f} per GPU), "
              f"{p.model_tflops_per_gpu:.0f} model TFLOP/s per GPU, MFU {p.mfu:.1%} of {dev.peak_tflops[s.precision]:.0f}"
              + (f" ({s.precision} peak), {p.mfu_fp8_peak:.1%} of {dev.peak_tflops['fp8']:.0f} (FP8 peak)"
                 if p.mfu_fp8_peak is not None else ""),
              "  (model FLOPs as the training log counts them: 6N + 12*L*d*T per token; the time model charges "
              "the output layer, recompute and attention as executed)",
              "", f"constants of {dev.name}:"] + [f"  {k}: {v}" for k, v in dev.sources] + [
              f"efficiencies of {dev.name} (sources above): matmul {eff['matmul']:.3f} of peak, copy "
              f"{eff['copy']:.3f} of HBM bandwidth, norms {eff['norm_forward']:.2f} forward and "
              f"{eff['norm_backward']:.2f} backward, flash attention "
              f"{attention_fraction(p.cfg.data.seq_length, p.cfg.model.head_dim, eff):.3f}"
              f" at {p.cfg.data.seq_length} tokens"]
    lines += [f"note: {note}" for note in p.notes]
    return "\n".join(lines)


def not_fitting_line(p: Plan) -> str:
    """What the report says of a layout that does not fit, with how sure it is: certain when even the lower bound
    (`memory.floor_memory`) exceeds the device, otherwise only as megalite (DeepSpeed 0.19) would run it."""
    worst = p.worst_stage()
    name, value = worst.biggest()
    need = f"stage {worst.stage} needs {worst.total(p.allowance_gib) / GiB:.1f} GiB of {p.device.memory_gib:.1f}"
    floor = p.floor_memory / GiB
    if p.verdict == "does not fit":
        return (f"DOES NOT FIT: {need}; the biggest term is {name} ({value / GiB:.1f} GiB); no implementation of this "
                f"layout fits (lower bound {floor:.1f} GiB)")
    return (f"DOES NOT FIT AS MEGALITE RUNS IT: {need}; the biggest term is {name} ({value / GiB:.1f} GiB). Not "
            f"certain: the lower bound for this layout is {floor:.1f} GiB (no gradient buckets or fp32 gradient copies, "
            "sequence-parallel inputs kept as shards, no allowance), so another implementation may fit")


def format_search(plans: list[Plan], limit: int = 10) -> str:
    """The best `limit` layouts as a table."""
    fitting = [p for p in plans if p.fits]
    cp = plans[0].layout.context if plans else 1
    # An MoE model's layouts differ in expert parallelism too (EP splits the data-parallel ranks' experts)
    experts = bool(plans) and plans[0].cfg.model.moe is not None
    columns = ["rank", "TP", "SP", "PP", "schedule", "DP", *(["EP"] if experts else []), "ZeRO", "micro x acc",
               "recompute", "loss chunks", "memory GiB", "step s", "tokens/s/GPU", "MFU"]
    lines = [f"{len(plans)} layouts planned, {len(fitting)} fit in memory; the best {min(limit, len(fitting))} by "
             "predicted throughput" + (f" (all at the config's context parallelism {cp})" if cp > 1 else "") + ":",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for rank, p in enumerate(fitting[:limit], 1):
        lay = p.layout
        cells = [rank, lay.tensor, "yes" if lay.sequence_parallel else "no", lay.pipeline,
                 p.cfg.parallel.pipeline_schedule if lay.pipeline > 1 else "-", lay.data,
                 *([lay.expert] if experts else []), lay.zero_stage, f"{lay.micro_batch} x {lay.accumulation}",
                 "yes" if p.settings.recompute else "no", p.settings.loss_chunk_tokens or "no",
                 f"{p.peak_memory / GiB:.1f}", f"{p.step_s:.3f}", f"{p.tokens_per_s / lay.world:,.0f}", f"{p.mfu:.1%}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not fitting:
        lines.append("| - | no layout fits in memory |" + " |" * (len(columns) - 2))
    notes = dict.fromkeys(note for p in plans for note in p.notes)  # each once, in order
    if notes:
        lines.append("")
        lines += [f"note{'' if all(note in p.notes for p in plans) else ' (some layouts)'}: {note}" for note in notes]
    return "\n".join(lines)
