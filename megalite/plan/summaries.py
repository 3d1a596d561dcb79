"""What other commands show of a plan: preflight's memory check, the lines `megalite train` prints at start, the
MFU peak of the training log, and `config show`'s memory breakdown.

A run plans once: `plan_locally` builds this run's `LocalPlan` on the machine's GPU (the engine asks torch which GPU
that is and hands over its name), and preflight, the start-up report and the metrics read that one value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megalite.config import Config, count_parameters
from megalite.plan.devices import Device, GiB, device_named, peak_tflops_of
from megalite.plan.estimate import Plan, plan
from megalite.plan.memory import MODEL_STATE_TERMS


def memory_plan(cfg: Config, world_size: int, device: Device, gpus_per_node: int = 8) -> Plan:
    """The plan other commands summarise: `world_size` GPUs of `device`, fewer than a node when the run is smaller."""
    return plan(cfg, world_size, device, min(gpus_per_node, world_size) if world_size <= gpus_per_node
                else gpus_per_node)


def model_states_overflow(p: Plan) -> Optional[str]:
    """A message when the model states alone (weights, gradients, master weights, optimizer states: known exactly,
    unlike activations) of the fullest stage exceed the device's memory: a certain out-of-memory, often a typo in the
    model's size. None when they fit."""
    device = p.device
    worst = max(p.memory, key=lambda sm: sum(sm.terms.get(k, 0.0) for k in MODEL_STATE_TERMS))
    states = sum(worst.terms.get(k, 0.0) for k in MODEL_STATE_TERMS)
    if states <= device.memory_gib * GiB:
        return None
    params = count_parameters(p.cfg.model)["total"]
    return (f"the model states alone need {states / GiB:.1f} GiB per GPU ({params / 1e9:.3g}B parameters at "
            f"{p.settings.describe(p.layout)}) but {device.name} has {device.memory_gib:.1f} GiB: check the model's "
            "size (model.hidden_size, num_layers, vocab_size) or shard it further (`megalite plan --search`)")


def memory_summary(p: Plan) -> str:
    """One line for preflight, `train` start-up and `config show`: the plan's memory per GPU on its device."""
    worst = p.worst_stage()
    name, value = worst.biggest()
    where = f" (stage {worst.stage} of {len(p.memory)})" if len(p.memory) > 1 else ""
    return (f"plan: {worst.total(p.allowance_gib) / GiB:.1f} GiB per GPU{where} of {p.device.memory_gib:.1f} GiB on "
            f"{p.device.name}; biggest term {name} {value / GiB:.1f} GiB")


def memory_warning(p: Plan) -> Optional[str]:
    """A warning naming the biggest term when the plan's memory per GPU exceeds the device's; None when it fits."""
    if p.fits:
        return None
    worst = p.worst_stage()
    name, value = worst.biggest()
    sure = "" if p.verdict == "does not fit" else " (as megalite runs it; the layout's lower bound is " \
        f"{p.floor_memory / GiB:.1f} GiB)"
    return (f"the plan needs {worst.total(p.allowance_gib) / GiB:.1f} GiB per GPU on stage {worst.stage} but "
            f"{p.device.name} has {p.device.memory_gib:.1f} GiB{sure}; the biggest term is {name} "
            f"({value / GiB:.1f} GiB): see `megalite plan` for the breakdown and `megalite plan --search` for layouts "
            "that fit")


def memory_breakdown(p: Plan) -> dict:
    """The plan's memory terms of the fullest stage in GiB, for `config show`."""
    worst = p.worst_stage()
    return {"device": p.device.name, "stage": worst.stage, "total_gib": round(worst.total(p.allowance_gib) / GiB, 3),
            "allocated_gib": round(worst.allocated / GiB, 3), "fits": p.fits, "verdict": p.verdict,
            "lower_bound_gib": round(p.floor_memory / GiB, 3),
            "terms_gib": {k: round(v / GiB, 3) for k, v in worst.terms.items()}}


@dataclass(frozen=True)
class LocalPlan:
    """This run's plan on this machine's GPU, built once at start: preflight's memory check, the start-up report and
    the training log's MFU peak read it."""

    gpu: Optional[str]  # the GPU's name as torch reports it; None on a machine without one
    device: Optional[Device]  # its entry in the device table; None when the table does not know it
    plan: Optional[Plan]  # None without a device, or when the cost model cannot model the config (`error` says why)
    error: str = ""

    def peak_tflops(self, precision: str) -> tuple[Optional[float], str]:
        """The MFU denominator for `precision` (the peak table knows more GPUs than the device table), and its source."""
        return peak_tflops_of(self.gpu, precision)


def plan_locally(cfg: Config, world_size: int, gpu: Optional[tuple[str, float]], gpus_per_node: int) -> LocalPlan:
    """The `LocalPlan` of a config valid at `world_size` on `gpu` (its name as torch reports it and its memory in GiB;
    None without one), `gpus_per_node` ranks to a node. Never raises: an estimate never stops a run."""
    if gpu is None:
        return LocalPlan(None, None, None)
    name, memory_gib = gpu
    device = device_named(name, memory_gib)
    if device is None:
        return LocalPlan(name, None, None)
    try:
        return LocalPlan(name, device, memory_plan(cfg, world_size, device, gpus_per_node))
    except Exception as e:  # noqa: BLE001 - an estimate never stops a run; it says why it is missing
        return LocalPlan(name, device, None, str(e))


def startup_report(local: LocalPlan) -> list[str]:
    """What `megalite train` prints at start: the memory summary for this machine's GPU and any warning (nothing
    without a GPU megalite's device table knows; a line saying why when the plan cannot model the config)."""
    if local.device is None:
        return []
    if local.plan is None:
        return [f"plan: not available for this config ({local.error})"]
    warning = memory_warning(local.plan)
    return [memory_summary(local.plan)] + ([f"warning: {warning}"] if warning else [])
