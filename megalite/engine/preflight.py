"""Preflight: the checks that need the job's hardware, before a long run (`megalite preflight`).

`config.validate` covers what a login node can check. Here, on the ranks themselves: the world
size against tensor x context x pipeline x data, the batch arithmetic, GPUs per node against the
ranks started there, fp16/bf16 support of the device, the plan's memory per GPU on it, free disk
for checkpoints against an estimate of their size, a timed all_reduce across all ranks, and that every rank reaches
the hang watchdog's store. Every problem is one line naming what to change. `megalite train` calls `run_preflight`
on every rank at start, with the config it validated and the plan it built (`plan_this_run`).

Run it on every rank of the job (e.g. `srun megalite preflight run.json`) to test the network;
on a login node (`megalite preflight run.json --world-size 16`) it checks what it can.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from pathlib import Path

from megalite import launch
from megalite.config import Config, count_parameters, validate
from megalite.distributed import all_gather_objects
from megalite.distributed import rank as global_rank
from megalite.engine import watchdog
from megalite.errors import ConfigError
from megalite.plan import LocalPlan, memory_summary, memory_warning, model_states_overflow, plan_locally


@dataclasses.dataclass
class Check:
    """One preflight check: its name, whether it passed, and what was seen (or what to do)."""

    name: str
    ok: bool
    message: str


# ----------------------------------------------------------------------------- environment


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node notation, e.g. `8(x2),4` -> [8, 8, 4]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return []
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def local_world_size(env: dict[str, str] | None = None) -> int | None:
    """Ranks started on this node, from torchrun/deepspeed (LOCAL_WORLD_SIZE) or srun; None if unknown."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun, the deepspeed launcher
        if env.get(key, "").isdigit():
            return int(env[key])
    # srun with one task per rank (RANK absent, or mapped from SLURM_PROCID by launch.py).
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec and env.get("RANK", env.get("SLURM_PROCID")) == env.get("SLURM_PROCID"):
        counts = expand_tasks_per_node(spec)
        node = int(env.get("SLURM_NODEID", "0") or 0)
        if counts and node < len(counts):
            return counts[node]
    return None


# ----------------------------------------------------------------------------- estimates


# Files every checkpoint carries besides the tensors: DeepSpeed's zero_to_fp32.py/zero_to_torch.py (40 KB at
# ZeRO >= 1), the manifest (about 20 KB, more with many ranks and tensors) and each file's pickle framing.
CHECKPOINT_OVERHEAD_BYTES = 64 << 10


def checkpoint_bytes(cfg: Config) -> int:
    """Estimated size of one checkpoint, as DeepSpeed 0.19 writes it (measured for ZeRO 0-3, fp32 and bf16):
    the module's weights in the training dtype (ZeRO-0/1/2; at ZeRO-3 they live only in the optimizer
    partitions), the fp32 master weights DeepSpeed's ZeRO optimizers keep at every stage >= 1 (also when
    training in fp32), and the optimizer's fp32 state (Adam: two moments, SGD: momentum)."""
    params = count_parameters(cfg.model)["total"]
    stage = cfg.zero_stage
    opt = cfg.deepspeed.get("optimizer") if isinstance(cfg.deepspeed.get("optimizer"), dict) else {}
    module = 0 if stage == 3 else (2 if cfg.precision in ("bf16", "fp16") else 4)
    master = 4 if stage >= 1 else 0
    state = 4 if opt.get("type") == "SGD" else 8
    return params * (module + master + state) + CHECKPOINT_OVERHEAD_BYTES


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while walking (pruning by a running job)
    return total


def existing_ancestor(path: Path) -> Path:
    """The nearest existing directory at or above `path` (where a new file there would live)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- checks


def check_layout(cfg: Config, world_size: int, validated: bool = False) -> list[Check]:
    """World size against tensor x context x pipeline x data, and the batch arithmetic (config.validate's rules;
    `validated`: the caller has validated `cfg` at `world_size` already, as `megalite train` has)."""
    p = cfg.parallel
    if not validated:
        try:
            validate(cfg, world_size)
        except ConfigError as e:
            return [Check("layout", False, msg) for msg in e.problems]
    dp = cfg.dp_size(world_size)
    return [
        Check("layout", True, f"world size {world_size} = tensor {p.tensor} x "
                              + (f"context {p.context} x " if p.context > 1 else "") + f"pipeline {p.pipeline} x data {dp}"),
        Check("batch", True, f"global batch {cfg.global_batch_size(world_size)} = micro {cfg.micro_batch_size} x "
                             f"gradient accumulation {cfg.gradient_accumulation_steps} x data parallel {dp}"),
    ]


def fp8_device_problem(capability: tuple[int, int], name: str) -> str | None:
    """model.fp8 on a CUDA device: float8 matmuls need compute capability 8.9 (Ada) or newer (Hopper, Blackwell)."""
    if tuple(capability) >= (8, 9):
        return None
    major, minor = capability
    return (f"model.fp8: {name} (sm_{major}{minor}) has no float8 matmuls; FP8 needs compute capability 8.9 or newer "
            "(L40S, H100, H200, B200): set model.fp8 to null")


def check_devices(cfg: Config, env: dict[str, str] | None = None) -> list[Check]:
    """GPUs on this node against the ranks started here, and fp16/bf16 support of the device."""
    import torch

    env = os.environ if env is None else env
    checks: list[Check] = []
    local = local_world_size(env)
    local_rank = int(env.get("LOCAL_RANK", "0") or 0)
    wanted = env.get("MEGALITE_GPUS_PER_NODE", "")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        name = torch.cuda.get_device_name(min(local_rank, n - 1))
        if local is not None and local > n:
            checks.append(Check("gpus", False, f"{local} ranks on this node but {n} GPUs visible "
                                f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one rank "
                                f"per GPU (--ntasks-per-node={n} / --nproc-per-node={n}) or request more GPUs"))
        elif local_rank >= n:
            checks.append(Check("gpus", False, f"LOCAL_RANK {local_rank} but only {n} GPUs visible on this node"))
        else:
            checks.append(Check("gpus", True, f"{n} x {name}; {local if local is not None else '?'} ranks on this node"))
        if local is not None and local < n:
            checks.append(Check("gpus", True, f"note: {n - local} of {n} GPUs on this node stay idle"))
        if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
            checks.append(Check("precision", False, f"deepspeed.bf16.enabled: {name} has no bf16 support; "
                                "use fp16 (deepspeed.fp16.enabled) instead"))
        else:
            checks.append(Check("precision", True, f"{cfg.precision} on {name}"))
        fp8 = cfg.model.fp8 and fp8_device_problem(torch.cuda.get_device_capability(min(local_rank, n - 1)), name)
        if fp8:
            checks.append(Check("fp8", False, fp8))
    else:
        if wanted.isdigit() and int(wanted) > 0:
            checks.append(Check("gpus", False, f"MEGALITE_GPUS_PER_NODE={wanted} but torch sees no GPU on "
                                f"{env.get('SLURMD_NODENAME', 'this node')} (torch {torch.__version__}: CPU build, "
                                "no driver, or no GPUs allocated: request them with --gpus-per-node)"))
        else:
            ranks = f"{local} CPU ranks on this node" if local is not None else "CPU ranks"
            checks.append(Check("gpus", True, f"no GPU: {ranks}"))
        if cfg.precision == "fp16":
            checks.append(Check("precision", False, "deepspeed.fp16.enabled: fp16 training is not supported on CPU "
                                "(DeepSpeed refuses it); use bf16 or fp32"))
        else:
            checks.append(Check("precision", True, f"{cfg.precision} on CPU"))
    return checks


def check_disk(cfg: Config) -> list[Check]:
    """Free space where checkpoints go against keep_checkpoints + 1 checkpoints of the estimated size."""
    ckpt_dir = cfg.checkpoint_root
    base = existing_ancestor(ckpt_dir)
    if not base.is_dir():  # os.access below says yes to a writable file (and to anything for root)
        return [Check("disk", False, f"train.checkpoint_dir: cannot create {ckpt_dir}: {base} is a file, not a directory")]
    if not os.access(base, os.W_OK):
        return [Check("disk", False, f"train.checkpoint_dir: cannot create or write {ckpt_dir} ({base} is not writable)")]
    size = checkpoint_bytes(cfg)
    # At peak `keep` committed checkpoints plus one being written; what is already there counts.
    used = _dir_bytes(ckpt_dir) if ckpt_dir.is_dir() else 0
    needed = max(size, size * (cfg.train.keep_checkpoints + 1) - used)
    free = shutil.disk_usage(base).free
    if free < needed:
        return [Check("disk", False, f"train.checkpoint_dir: {_gib(free)} free on {base} but about {_gib(needed)} "
                      f"needed ({cfg.train.keep_checkpoints} + 1 checkpoints of about {_gib(size)} for "
                      f"{count_parameters(cfg.model)['total'] / 1e6:,.1f}M parameters); free space, "
                      "lower train.keep_checkpoints or point train.checkpoint_dir elsewhere")]
    return [Check("disk", True, f"{_gib(free)} free on {base}; a checkpoint is about {_gib(size)}")]


def check_collective(world_size: int, size_mb: float = 4.0, iters: int = 3,
                     min_bandwidth_gbps: float = 0.0) -> list[Check]:
    """A timed all_reduce over every rank of the running process group; checks the sum and the bandwidth."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return [Check("collective", True, "skipped: no process group (a single process)")]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    numel = max(1, int(size_mb * 2**20 / 4))
    try:
        x = torch.ones(numel, dtype=torch.float32, device=device)
        dist.all_reduce(x)  # warm-up: connections are set up lazily
        if not torch.allclose(x[:16], torch.full_like(x[:16], float(world_size))):
            return [Check("collective", False, f"all_reduce across {world_size} ranks returned {x[0].item()}, "
                          f"expected {world_size}: the ranks do not form one group (check MASTER_ADDR/PORT)")]
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / iters
    except Exception as e:  # noqa: BLE001 - any transport error is the finding itself
        return [Check("collective", False, f"all_reduce across {world_size} ranks failed: {type(e).__name__}: {e} "
                      "(check MASTER_ADDR/MASTER_PORT, GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME and firewalls)")]
    nbytes = numel * 4
    # Bus bandwidth as nccl-tests reports it: what each link carries in a ring all-reduce.
    busbw = 2 * (world_size - 1) / world_size * nbytes / seconds / 1e9
    msg = (f"all_reduce of {_gib(nbytes)} across {world_size} ranks ({dist.get_backend()}): "
           f"{seconds * 1e3:.2f} ms, bus bandwidth {busbw:.2f} GB/s")
    if min_bandwidth_gbps and busbw < min_bandwidth_gbps:
        return [Check("collective", False, f"{msg}, below the required {min_bandwidth_gbps} GB/s "
                      "(slow interconnect or wrong interface: set NCCL_SOCKET_IFNAME / check InfiniBand)")]
    return [Check("collective", True, msg)]


def check_watchdog_store(cfg: Config, rank: int) -> list[Check]:
    """The hang watchdog's store (the rendezvous TCPStore every rank publishes its progress in) answers this rank."""
    import torch.distributed as dist

    if not cfg.train.watchdog:
        return [Check("watchdog store", True, "skipped: train.watchdog is false")]
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [Check("watchdog store", True, "skipped: one rank (the watchdog is off)")]
    ok, message = watchdog.check_store(rank)
    return [Check("watchdog store", ok, message)]


def plan_this_run(cfg: Config, world_size: int, env: dict[str, str] | None = None) -> LocalPlan:
    """The run's plan on this node's GPU (`megalite plan`'s cost model, for the ranks started on this node), built
    once: preflight's memory check, the start-up report and the training log's MFU peak all read it. `cfg` must be
    valid at `world_size`."""
    return plan_locally(cfg, world_size, launch.local_gpu(), local_world_size(env) or world_size)


def check_memory(cfg: Config, world_size: int, env: dict[str, str] | None = None,
                 local: LocalPlan | None = None) -> list[Check]:
    """The plan's memory per GPU on this node's GPU (`megalite plan`), with a warning naming the biggest term when
    it exceeds the GPU's memory (a warning: activations are an estimate), and a failure when the model states alone
    cannot fit (they are known exactly: a certain out-of-memory, often a typo in the model's size). `local`: the
    run's plan when it has one already (`plan_this_run`)."""
    local = local if local is not None else plan_this_run(cfg, world_size, env)
    if local.device is None:
        return [Check("memory", True, "plan: skipped, no GPU in megalite's device table here "
                                      "(`megalite plan RUN.json --world-size N --device ...` plans for one)")]
    if local.plan is None:  # an estimate never stops a job; it says why it is missing
        return [Check("memory", True, f"plan: skipped ({local.error})")]
    overflow = model_states_overflow(local.plan)
    if overflow:
        return [Check("memory", False, overflow)]
    warning = memory_warning(local.plan)
    return [Check("memory", True, f"warning: {warning}" if warning else memory_summary(local.plan))]


def _agree(checks: list[Check]) -> list[Check]:
    """Tell every rank which ranks failed, so all of them stop together instead of hanging in a collective."""
    failed = all_gather_objects(sum(not c.ok for c in checks))
    me = global_rank()
    others = [r for r, n in enumerate(failed) if n > 0 and r != me]
    if others:
        checks = checks + [Check("ranks", False, f"preflight failed on rank(s) {', '.join(map(str, others[:16]))}"
                                 f"{' ...' if len(others) > 16 else ''}; see their messages")]
    return checks


def run_checks(cfg: Config, world_size: int, rank: int, *, collective: bool = True, collective_mb: float = 4.0,
               min_bandwidth_gbps: float = 0.0, env: dict[str, str] | None = None, validated: bool = False,
               local: LocalPlan | None = None) -> list[Check]:
    """Every check on this rank; collective (all ranks must call it) when a process group exists. `validated` and
    `local`: what `megalite train` has done already (validated the config at the world size, planned the run)."""
    env = os.environ if env is None else env
    checks = check_layout(cfg, world_size, validated)
    layout_ok = all(c.ok for c in checks)
    checks += check_devices(cfg, env)
    if layout_ok:  # issue 16: the plan's memory per GPU (a layout that does not divide has none)
        checks += check_memory(cfg, world_size, env, local)
    else:
        checks.append(Check("memory", True, "plan: skipped (the layout above is invalid)"))
    if int(env.get("LOCAL_RANK", "0") or 0) == 0:  # one disk check per node is enough
        checks += check_disk(cfg)
    if collective:
        checks += check_collective(world_size, collective_mb, min_bandwidth_gbps=min_bandwidth_gbps)
        checks += check_watchdog_store(cfg, rank)
    return _agree(checks)


def run_preflight(cfg: Config, world_size: int, rank: int, *, collective: bool = True, collective_mb: float = 1.0,
                  min_bandwidth_gbps: float = 0.0, validated: bool = False,
                  local: LocalPlan | None = None) -> list[str]:
    """The problems found (empty: all good). Call on every rank once the process group exists: it runs
    collectives, and every rank gets a non-empty list when any rank has a problem."""
    return [f"preflight {c.name}: {c.message}" for c in run_checks(
        cfg, world_size, rank, collective=collective, collective_mb=collective_mb,
        min_bandwidth_gbps=min_bandwidth_gbps, validated=validated, local=local) if not c.ok]
