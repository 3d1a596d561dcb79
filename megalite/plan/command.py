"""What `megalite plan --search` prints: the ranked table (or every layout as JSON) and the config's own layout,
planned, or said to be invalid at this world size and why (the search goes on: a search is how to find a layout)."""

from __future__ import annotations

import json
import time

from megalite.errors import ConfigError
from megalite.plan.devices import Device
from megalite.plan.estimate import check_cluster, plan
from megalite.plan.inputs import PlanInput
from megalite.plan.layout import layout_of
from megalite.plan.memory import ALLOWANCE_GIB
from megalite.plan.report import format_search
from megalite.plan.search import search, stderr_progress


def search_output(inputs: PlanInput, world_size: int, device: Device, gpus_per_node: int = 8,
                  allowance_gib: float = ALLOWANCE_GIB, top: int = 10, as_json: bool = False,
                  source: str = "") -> str:
    """The `--search` report of `inputs` (see `megalite.plan.inputs.load_for_plan`)."""
    start = time.perf_counter()
    check_cluster(world_size, gpus_per_node)
    cfg, problems, own = inputs.cfg, list(inputs.own_layout_problems), None
    if not problems:
        try:
            own = plan(cfg, world_size, device, gpus_per_node, allowance_gib=allowance_gib)
        except ConfigError as e:  # e.g. ZeRO-0 with fp32 gradient accumulation, which DeepSpeed refuses
            problems = e.problems
    plans = search(cfg, world_size, device, gpus_per_node, allowance_gib, stderr_progress(), inputs.global_batch)
    seconds = time.perf_counter() - start
    batch = inputs.global_batch or layout_of(cfg, world_size).global_batch
    if as_json:
        return json.dumps({"config": source, "world_size": world_size, "device": device.name, "seconds": seconds,
                           "global_batch": batch, "own_layout_problems": problems,
                           "layouts": [p.to_dict() for p in plans]})
    if own is not None:
        verdict = (f"the config's own layout: {own.layout.describe()}, {own.tokens_per_s / own.layout.world:,.0f} "
                   f"tokens/s/GPU, {'fits' if own.fits else 'does not fit'}")
    else:
        verdict = f"the config's own layout is not valid at {world_size} GPUs: {'; '.join(problems)}"
    lines = [f"megalite plan --search: {source}, {world_size} x {device.name}, global batch {batch} x "
             f"{cfg.data.seq_length}"]
    if own is None:
        lines.append(f"({verdict}; every valid layout of this global batch is searched)")
    lines += [format_search(plans, top), f"({seconds:.1f} s; {verdict})"]
    return "\n".join(lines)
