"""Each collective's cost in the planner (megalite.plan.communication) against the standard bus-bandwidth factors and
NCCL's own latency model, one collective at a time, at several group sizes and on both links; and every collective a
plan charges, as the step time adds them up.

References (written here, not taken from the planner): nccl-tests' doc/PERFORMANCE.md, which defines the bus
bandwidth of each collective as its algorithm bandwidth (payload / time) times a factor of the group size n:
all-reduce 2(n-1)/n, all-gather (n-1)/n, reduce-scatter (n-1)/n, all-to-all (n-1)/n, send/recv 1. So at a link's
bandwidth B per GPU and direction, a collective over a payload of S bytes takes S x factor / B. NCCL 2.8's tuning model
(src/graph/tuning.cc) for rings with the Simple protocol: each call costs 8.4 us plus 3.4 us per NVLink hop and 9.6 us
per network hop of the ring (n - 1 steps, twice for an all-reduce, nodes - 1 of them between nodes), and a ring's bus
bandwidth over the network is that of its channels, which NCCL spreads over the NICs of the group's GPUs on a node.
A group of one rank moves nothing. End-to-end step times (tests/test_plan.py, within 25%) cannot see a factor off by 2
in one kind: the all-reduce at (n-1)/n moves those predictions by 3-9% only.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from megalite import config as C
from megalite import plan as P
from megalite.plan.communication import Collective, transfer_seconds

REFERENCE = {
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "send/recv": lambda n: 1.0,
}
NVLINK_GBPS, NETWORK_GBPS = 317.0, 23.0  # odd values: a swapped link or a unit slip shows
DEVICE = P.Device("test", {"bf16": 500.0}, 80.0, 3.0, NVLINK_GBPS, NETWORK_GBPS)


def reference_seconds(kind: str, payload: float, n: int, link: str, calls: float = 1, per_node: int = 1) -> float:
    """NCCL's model: calls x latency + payload x factor / bus bandwidth; over the network a ring's channels use the
    NICs of the group's GPUs on each node (at most NVLink's bandwidth); all-to-all and send/recv one NIC each."""
    if n == 1:
        return 0.0
    if link == "NVLink":
        gbps, nodes = NVLINK_GBPS, 1
    else:
        nics = per_node if kind in ("all-reduce", "all-gather", "reduce-scatter") else 1
        gbps, nodes = min(NVLINK_GBPS, nics * NETWORK_GBPS), -(-n // per_node)
    if kind == "send/recv":
        latency = 8.4e-6 + (9.6e-6 if link == "network" else 3.4e-6)
    else:
        steps, between = (n - 1, nodes - 1) if kind != "all-reduce" else (2 * (n - 1), 2 * (nodes - 1))
        latency = 8.4e-6 + (steps - between) * 3.4e-6 + between * 9.6e-6
    return calls * latency + payload * REFERENCE[kind](n) / (gbps * 1e9)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 64])
def test_each_collective_costs_its_bus_factor(n: int) -> None:
    payload = 3_000_000_007
    for kind in REFERENCE:
        for link in ("NVLink", "network"):
            got = transfer_seconds(Collective("any", kind, payload, n, link), DEVICE)
            assert got == pytest.approx(reference_seconds(kind, payload, n, link), rel=1e-12, abs=0), (kind, n, link)


def test_worked_values() -> None:
    """A few by hand: 1 GB at 100 GB/s is 10 ms of payload; a call's latency is 8.4 us plus 3.4 us per NVLink hop
    and 9.6 us per network hop; a network ring of a group with 4 GPUs on each node uses 4 NICs."""
    dev = dataclasses.replace(DEVICE, intra_node_gbps=100.0, inter_node_gbps=10.0)
    cases = [("all-reduce", 2, "NVLink", 1, 1, 0.010 + 8.4e-6 + 2 * 3.4e-6),
             ("all-reduce", 4, "NVLink", 1, 1, 0.015 + 8.4e-6 + 6 * 3.4e-6),
             ("all-reduce", 8, "network", 1, 1, 0.175 + 8.4e-6 + 14 * 9.6e-6),  # one GPU per node: 8 nodes
             ("all-reduce", 8, "network", 3, 4, 0.175 / 4 + 3 * (8.4e-6 + 12 * 3.4e-6 + 2 * 9.6e-6)),  # 2 nodes of 4
             ("all-gather", 2, "NVLink", 1, 1, 0.005 + 8.4e-6 + 3.4e-6),
             ("reduce-scatter", 4, "network", 1, 1, 0.075 + 8.4e-6 + 3 * 9.6e-6),
             ("all-to-all", 8, "NVLink", 1, 1, 0.00875 + 8.4e-6 + 7 * 3.4e-6),
             ("send/recv", 2, "network", 2, 1, 0.100 + 2 * (8.4e-6 + 9.6e-6)), ("all-reduce", 1, "NVLink", 5, 1, 0.0)]
    for kind, n, link, calls, per_node, seconds in cases:
        got = transfer_seconds(Collective("any", kind, 1e9, n, link, calls, per_node), dev)
        assert got == pytest.approx(seconds, rel=1e-12), (kind, n, link, calls, per_node)


def test_unknown_kind_or_link_is_an_error() -> None:
    """A misspelt kind was charged as a point-to-point send (factor 1) without a word."""
    with pytest.raises(ValueError, match="unknown collective kind 'allreduce'"):
        transfer_seconds(Collective("TP", "allreduce", 1e6, 4, "NVLink"), DEVICE)
    with pytest.raises(ValueError, match="unknown link 'infiniband'"):
        transfer_seconds(Collective("TP", "all-reduce", 1e6, 4, "infiniband"), DEVICE)


def _members(layout: C.Layout, group: str) -> list[int]:
    """Rank 0's group, from DeepSpeed's placement (global rank = ((pipe x data + data index) x context + context
    index) x tensor + tensor index), enumerated."""
    tp, cp, dp, pp = layout.tensor, layout.context, layout.data, layout.pipeline

    def rank(t: int = 0, c: int = 0, d: int = 0, p: int = 0) -> int:
        return ((p * dp + d) * cp + c) * tp + t

    return {"TP": [rank(t=i) for i in range(tp)], "CP": [rank(c=i) for i in range(cp)],
            "DP": [rank(c=i, d=j) for i in range(cp) for j in range(dp)],
            "PP": [rank(p=i) for i in range(pp)], "tied embedding": [rank(p=0), rank(p=pp - 1)]}[group]


def _node_spread(layout: C.Layout, group: str, gpus_per_node: int) -> bool:
    """Whether rank 0's group crosses nodes."""
    return len({r // gpus_per_node for r in _members(layout, group)}) > 1


def _per_node(layout: C.Layout, group: str, gpus_per_node: int) -> int:
    """The most members of rank 0's group that share one node (the tied embedding's two ends: never the same)."""
    members = _members(layout, group)
    return 1 if group == "tied embedding" else max(
        sum(1 for r in members if r // gpus_per_node == node) for node in {r // gpus_per_node for r in members})


LAYOUTS = [  # (parallel, deepspeed zero stage, micro-batch x accumulation, world, gpus per node)
    ({"tensor": 4, "sequence_parallel": True}, 1, (1, 4), 16, 8),
    ({"tensor": 2, "pipeline": 4}, 1, (1, 8), 16, 4),
    ({"tensor": 1, "context": 2}, 3, (2, 2), 8, 8),
    ({"tensor": 8}, 2, (1, 2), 32, 4),
    ({"tensor": 1, "pipeline": 2}, 1, (2, 4), 4, 8),
]


def _plan(case: tuple) -> P.Plan:
    parallel, zero, (micro, accum), world, per_node = case
    raw = {"model": {"vocab_size": 1000, "hidden_size": 256, "num_layers": 8, "num_heads": 8, "num_kv_heads": 8,
                     "norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False, "tied_embeddings": True,
                     "max_position_embeddings": 1024},
           "parallel": parallel, "data": {"prefixes": ["x"], "seq_length": 1024},
           "deepspeed": {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                         "bf16": {"enabled": True}, "zero_optimization": {"stage": zero}}}
    return P.plan(C.from_dict(raw, world_size=world), world, DEVICE, per_node)


@pytest.mark.parametrize("case", LAYOUTS, ids=[json.dumps(c[0]) + f"-zero{c[1]}-{c[3]}gpus" for c in LAYOUTS])
def test_every_charged_collective_is_costed_by_its_factor(case: tuple) -> None:
    """Every collective a plan lists is one of the five kinds, over its group's ranks and link, and the step time's
    TP/CP and PP parts and the exposed data-parallel time are those collectives at the reference factors."""
    plan = _plan(case)
    per_node = case[4]
    lay = plan.layout
    sizes = {"TP": lay.tensor, "CP": lay.context, "DP": lay.data * lay.context, "PP": 2, "tied embedding": 2}
    kinds = set()
    for stage, (collectives, times) in enumerate(zip(plan.comms, plan.times)):
        critical = {"TP": 0.0, "PP": 0.0}
        for c in collectives:
            kinds.add(c.kind)
            assert c.kind in REFERENCE and c.ranks == sizes[c.group], (stage, c)
            assert c.link == ("network" if _node_spread(lay, c.group, per_node) else "NVLink"), (stage, c)
            if c.group != "PP":  # a pipeline transfer is point to point whatever the group
                assert c.per_node == _per_node(lay, c.group, per_node), (stage, c)
            seconds = reference_seconds(c.kind, c.bytes, c.ranks, c.link, c.calls, c.per_node)
            assert transfer_seconds(c, DEVICE) == pytest.approx(seconds, rel=1e-12, abs=0), (stage, c)
            if c.group in ("TP", "CP", "PP"):
                critical["PP" if c.group == "PP" else "TP"] += seconds
        assert times.tp_comm == pytest.approx(critical["TP"] / lay.accumulation, rel=1e-12, abs=0), stage
        assert times.pp_comm == pytest.approx(critical["PP"] / lay.accumulation, rel=1e-12, abs=0), stage
    if plan.settings.path != "zero" or not plan.settings.overlap_comm:  # no bucket overlap: charged in full
        exposed = max(sum(reference_seconds(c.kind, c.bytes, c.ranks, c.link, c.calls, c.per_node) for c in cs
                          if c.group in ("DP", "tied embedding")) for cs in plan.comms)
        assert plan.dp_exposed_s == pytest.approx(exposed, rel=1e-12, abs=0)
    assert kinds, "the layout charges no collective"


def test_the_cases_cover_every_kind_and_both_links() -> None:
    seen_kinds, seen_links = set(), set()
    for case in LAYOUTS:
        plan = _plan(case)
        for cs in plan.comms:
            seen_kinds |= {c.kind for c in cs}
            seen_links |= {c.link for c in cs}
    assert seen_kinds == set(REFERENCE) and seen_links == {"NVLink", "network"}
