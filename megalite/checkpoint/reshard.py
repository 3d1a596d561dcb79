"""The whole-model training state of a checkpoint of any layout, read one parameter at a time.

A megalite checkpoint holds DeepSpeed's files for its layout: per tensor-parallel rank (and pipeline stage) the
module's weights, and per data-parallel rank a partition of the optimizer's flat fp32 buffers (ZeRO-1/2: each
parameter a fragment of a flat group; ZeRO-3: each parameter split evenly across the ranks; ZeRO-0: the torch
optimizer's own state). `TrainingState` maps every canonical (TP-independent) parameter name to where its pieces
are and assembles, for one parameter at a time, the full fp32 master weight, its optimizer moments and step:
data-parallel pieces concatenated, tensor-parallel shards merged by the model's own sharding description. Files
are memory-mapped, so a parameter's assembly touches its own bytes only: no process ever holds the whole state.
A piece that is already whole comes back as a view of the mapped file (read-only use; writes would stay private
to the process); joining pieces costs one copy of the parameter.

Experts split over ranks (parallel.expert = ep > 1 at ZeRO-1/2, megalite.engine.moe): each rank holds the experts
of its place in the expert-parallel group (replica index modulo ep), and DeepSpeed's ZeRO-1/2 partitions their flat
groups (its `moe` parameter groups) over the expert-data-parallel ranks (the replicas with the same index modulo
ep) instead of all replicas. Their pieces are put together per expert-parallel rank and the ep local tensors joined
along the expert dimension. (The model-states file holds data-parallel rank 0's local experts only: never read for
weights.) Buffers (the routers' expert bias, the same on every rank) come from the model-states files' modules.

The files are verified against the manifest (sizes, SHA-256, pickle globals) before any of them is deserialised,
and loaded without running code (the safe loader's allowlist).
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from megalite.checkpoint.manifest import checkpoint_config, manifest_layout, read_manifest
from megalite.checkpoint.paths import MANIFEST, resolve_checkpoint
from megalite.checkpoint.safe_load import safe_torch_load
from megalite.checkpoint.verify import verify_checkpoint
from megalite.config import Config, ParallelConfig
from megalite.errors import CheckpointError
from megalite.model.pipeline import canonical_name
from megalite.model.transformer import Transformer
from megalite.model.weights import parameter_groups
from megalite.parallel.experts import GroupedExperts
from megalite.parallel.sharding import unshard_tensors

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
SGD_MOMENTS = ("momentum_buffer",)
MOMENTS = ADAM_MOMENTS + SGD_MOMENTS  # what a checkpoint's optimizer state may hold per parameter


def moment_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The per-parameter state keys of a torch optimizer: SGD's momentum, else Adam's two moments."""
    return SGD_MOMENTS if isinstance(optimizer, torch.optim.SGD) else ADAM_MOMENTS


@dataclass
class ParameterState:
    """One parameter's full (unsharded) training state."""

    fp32: torch.Tensor  # the fp32 master weight
    moments: dict[str, torch.Tensor] = field(default_factory=dict)  # exp_avg, exp_avg_sq (Adam) or momentum_buffer
    step: float | None = None  # the optimizer's step count (Adam)


@dataclass
class _Piece:
    """Where one data-parallel piece of a local (TP-shard) parameter lives."""

    file: str
    kind: str  # "zero12": a fragment of flat group `group`; "zero3": a padded partition; "torch": whole tensors
    group: int = 0
    start: int = 0
    numel: int = 0
    name: str = ""  # the file's own name of the parameter ("torch" pieces)
    index: int = -1  # the torch optimizer's index of the parameter ("torch" pieces)


class TrainingState:
    """Read-only access to a verified checkpoint's full training state, by canonical parameter name."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.step_dir = resolve_checkpoint(path)
        self.manifest = verify_checkpoint(self.step_dir) if verify else read_manifest(self.step_dir)
        self.config: Config = checkpoint_config(self.manifest, self.step_dir)
        self.layout = manifest_layout(self.manifest)
        self.tensor, self.pipeline = self.layout.tensor, self.layout.pipeline
        # ZeRO partitions over every rank holding a replica of the weights: data x context (megalite.parallel.grid).
        self.data = self.layout.replicas
        self.zero_stage = self.layout.zero_stage
        self.ds_dir = self.step_dir / self.manifest.get("deepspeed_tag", "ds")
        self._files: dict[str, Any] = {}
        # The unsharded model on the meta device: how each parameter's TP shards fit together.
        reference = Transformer(self.config.model, ParallelConfig(), None, device="meta")
        self._reference = dict(reference.named_parameters())
        self._buffer_names = [n for n, _ in reference.named_buffers()]
        # Split experts: parameters whose pieces are per expert-parallel rank (module docstring).
        self.expert_split = self.layout.expert if self.layout.experts_split else 1
        self._experts = {f"{prefix}.{n}" for prefix, m in reference.named_modules() if isinstance(m, GroupedExperts)
                         for n, _ in m.named_parameters()} if self.expert_split > 1 else set()
        # canonical name -> per TP rank -> per expert-parallel part (one part unless split) -> DP pieces in order
        self._pieces: dict[str, list[list[list[_Piece]]]] = {}
        self._shapes: dict[str, list[torch.Size]] = {}  # canonical name -> per TP rank local shape (one part's)
        try:
            for stage in range(self.pipeline):
                for tp_rank in range(self.tensor):
                    self._index(stage, tp_rank)
            missing = sorted(set(self._reference) - set(self._pieces))
            if missing:
                raise CheckpointError(f"{self.ds_dir}: no optimizer state for parameters {missing[:4]}")
        except (CheckpointError, KeyError, ValueError, IndexError) as e:
            # The files verified against the manifest, so the stored config (the model it describes) is what is off.
            raise CheckpointError(f"{self.step_dir / MANIFEST}: the stored config does not match the weights: "
                                  f"{e}") from None

    # ------------------------------------------------------------------ public
    def names(self) -> list[str]:
        """Canonical parameter names, in the model's order."""
        return list(self._reference)

    def weight(self, name: str) -> torch.Tensor:
        """The full fp32 master weight of parameter `name`."""
        return self.parameter(name, moments=False).fp32

    def parameter(self, name: str, moments: bool = True) -> ParameterState:
        """The full fp32 weight, moments and step of parameter `name` (assembled from its pieces)."""
        if name not in self._pieces:
            raise CheckpointError(f"{self.step_dir}: no parameter {name!r}")
        shards = [self._tensor_shard(name, tp, moments) for tp in range(self.tensor)]
        ref = self._reference[name]
        merge = (lambda ts: unshard_tensors(ts, ref)) if self.tensor > 1 else (lambda ts: ts[0])
        moments = {k: merge([s.moments[k] for s in shards]) for k in shards[0].moments}
        return ParameterState(merge([s.fp32 for s in shards]), moments, shards[0].step)

    def model_states(self) -> dict:
        """DeepSpeed's model-states file of rank 0 (scheduler state, global step counters)."""
        return self._load(self._model_states_file(0))

    def buffers(self) -> dict[str, torch.Tensor]:
        """The model's buffers (the routers' expert bias) by canonical name, from the first tensor-parallel rank's
        module states (the pipeline engine's per-layer files): buffers are the same on every rank."""
        out: dict[str, torch.Tensor] = {}
        if self.pipeline > 1:  # the pipeline engine saves each layer's state dict in a file of its own
            modules = [(f"{path.name.split('-')[0][6:]}.", self._load(str(path)))
                       for path in sorted(self.ds_dir.glob("layer_*-model_00-model_states.pt"))]
        else:
            modules = [("", self._load(self._model_states_file(0)).get("module") or {})]
        for prefix, module in modules:
            for local, tensor in module.items():
                name = self._canonical(prefix + local)
                if name in self._buffer_names:
                    out.setdefault(name, tensor)
        missing = [n for n in self._buffer_names if n not in out]
        if missing:
            raise CheckpointError(f"{self.ds_dir}: the model-states files hold no buffers {missing[:4]}")
        return out

    # ------------------------------------------------------------------ indexing
    def _mp(self, stage: int, tp_rank: int) -> int:
        # DeepSpeed numbers model-parallel ranks within a data-parallel replica: stage-major, then TP rank.
        return stage * self.tensor + tp_rank

    def _model_states_file(self, mp: int, dp: int = 0) -> str:
        if self.zero_stage == 3:
            return str(self.ds_dir / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt")
        return str(self.ds_dir / f"mp_rank_{mp:02d}_model_states.pt")

    def _optim_files(self, mp: int) -> list[str]:
        files = []
        for dp in range(self.data):
            found = glob.glob(str(self.ds_dir / f"*zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"))
            if len(found) != 1:
                raise CheckpointError(f"{self.ds_dir}: expected one optimizer file of data-parallel rank {dp}, "
                                      f"model-parallel rank {mp}; found {found}")
            files.append(found[0])
        return files

    def _canonical(self, local: str) -> str:
        """The whole model's name of a name in the checkpoint's module (a pipeline stage's, or the whole model's)."""
        return canonical_name(local, self.config.model) if self.pipeline > 1 else local

    def _add(self, canonical: str, tp_rank: int, parts: list[list[_Piece]], shape: torch.Size) -> None:
        entry = self._pieces.setdefault(canonical, [None] * self.tensor)  # type: ignore[list-item]
        if entry[tp_rank] is None:  # the first stage that holds it (the tied embedding: stage 0)
            entry[tp_rank] = parts
            self._shapes.setdefault(canonical, [None] * self.tensor)[tp_rank] = shape  # type: ignore[list-item]

    def _index(self, stage: int, tp_rank: int) -> None:
        mp = self._mp(stage, tp_rank)
        states = self._load(self._model_states_file(mp))
        shapes = states.get("param_shapes") or []
        if self.zero_stage == 0:
            module = states.get("module") or {}
            optimizer = states.get("optimizer") or {}
            order = [i for g in optimizer.get("param_groups", []) for i in g["params"]]
            names = _zero0_parameter_order(self.config, module)
            if len(names) != len(order):
                raise CheckpointError(f"{self._model_states_file(mp)}: {len(order)} optimizer entries for "
                                      f"{len(names)} parameters")
            for index, local in zip(order, names):
                self._add(self._canonical(local), tp_rank,
                          [[_Piece(self._model_states_file(mp), "torch", name=local, index=index)]], module[local].shape)
            return
        files = self._optim_files(mp)
        if self.zero_stage in (1, 2):
            merged_shapes = {k: v for group in shapes for k, v in group.items()}
            ep = self.expert_split
            per_name: dict[str, list[list[_Piece]]] = {}
            for replica, file in enumerate(files):  # in replica order: the order of each group's partitions
                sd = self._load(file)["optimizer_state_dict"]
                counts = sd.get("partition_count") or []
                for group, mapping in enumerate(sd["param_slice_mappings"]):
                    for local, fragment in mapping.items():
                        split = self._canonical(local) in self._experts
                        # Split experts: the group is partitioned over the expert-data-parallel ranks (replicas of
                        # the same index modulo ep), and each part holds expert-parallel rank `replica % ep`'s.
                        want = self.data // ep if split else self.data
                        if group < len(counts) and int(counts[group]) != want:
                            raise CheckpointError(f"{file}: parameter group {group} ({local}) is partitioned over "
                                                  f"{counts[group]} ranks; the layout says {want}")
                        parts = per_name.setdefault(local, [[] for _ in range(ep if split else 1)])
                        parts[replica % ep if split else 0].append(
                            _Piece(file, "zero12", group, int(fragment.start), int(fragment.numel)))
            for local, parts in per_name.items():
                self._add(self._canonical(local), tp_rank, parts, merged_shapes[local])
            return
        # ZeRO-3: parameters in param_shapes order, each split into `data` padded partitions, back to back across
        # the rank's flat groups.
        offset = 0
        group_bounds = _group_bounds(self._load(files[0])["optimizer_state_dict"]["fp32_flat_groups"])
        for local, shape in ((k, v) for group in shapes for k, v in group.items()):
            part = math.ceil(shape.numel() / self.data)
            group_index, start = _locate(group_bounds, offset)
            pieces = [_Piece(f, "zero3", group_index, start, part) for f in files]
            self._add(self._canonical(local), tp_rank, [pieces], shape)
            offset += part

    # ------------------------------------------------------------------ reading
    def _load(self, path: str) -> Any:
        if path not in self._files:
            self._files[path] = safe_torch_load(path, map_location="cpu", mmap=True)
        return self._files[path]

    def _tensor_shard(self, name: str, tp_rank: int, with_moments: bool = True) -> ParameterState:
        """One TP rank's shard of the parameter: split experts' expert-parallel parts joined along the experts."""
        split = self._pieces[name][tp_rank]
        if any(not pieces for pieces in split):
            raise CheckpointError(f"{self.ds_dir}: no optimizer state for some experts of {name}")
        parts = [self._local(pieces, self._shapes[name][tp_rank], with_moments) for pieces in split]
        if len(parts) == 1:
            return parts[0]
        moments = {k: torch.cat([p.moments[k] for p in parts]) for k in parts[0].moments}
        return ParameterState(torch.cat([p.fp32 for p in parts]), moments, parts[0].step)

    def _local(self, pieces: list[_Piece], shape: torch.Size, with_moments: bool = True) -> ParameterState:
        """One part of a TP rank's shard (the whole shard, or one expert-parallel rank's experts): its data-parallel
        pieces put back together."""
        numel = shape.numel()
        if pieces[0].kind == "torch":
            piece = pieces[0]
            sd = self._load(piece.file)
            state = sd["optimizer"]["state"].get(piece.index, {})
            moments = {k: v for k, v in state.items() if k in MOMENTS and with_moments}  # memory-mapped views
            step = float(state["step"]) if "step" in state else None
            return ParameterState(sd["module"][piece.name].float(), moments, step)
        fp32_parts: list[torch.Tensor] = []
        moment_parts: dict[str, list[torch.Tensor]] = {}
        step = None
        for piece in pieces:
            sd = self._load(piece.file)["optimizer_state_dict"]
            if piece.kind == "zero12":
                flat = sd["single_partition_of_fp32_groups"][piece.group]
                state = sd["base_optimizer_state"]["state"][piece.group]
            else:
                flat = sd["fp32_flat_groups"][piece.group]
                state = sd["optimizer_state_dict"]["state"][piece.group]
            fp32_parts.append(flat.narrow(0, piece.start, piece.numel))
            for key, value in state.items():
                if key in MOMENTS and with_moments:
                    moment_parts.setdefault(key, []).append(value.narrow(0, piece.start, piece.numel))
                elif key == "step":
                    step = float(value)

        def whole(parts: list[torch.Tensor]) -> torch.Tensor:
            if len(parts) == 1:  # a view of the memory-mapped file: page cache, no copy
                return parts[0].narrow(0, 0, numel).view(shape)
            # One copy out of the memory-mapped pieces, up to numel (ZeRO-3 pads the last partition).
            out = torch.empty(numel, dtype=parts[0].dtype)
            filled = 0
            for part in parts:
                take = min(part.numel(), numel - filled)
                out.narrow(0, filled, take).copy_(part.narrow(0, 0, take))
                filled += take
            return out.view(shape)

        return ParameterState(whole(fp32_parts), {k: whole(v) for k, v in moment_parts.items()}, step)


def _group_bounds(flat_groups: list[torch.Tensor]) -> list[int]:
    bounds = [0]
    for flat in flat_groups:
        bounds.append(bounds[-1] + flat.numel())
    return bounds


def _locate(bounds: list[int], offset: int) -> tuple[int, int]:
    """(group, offset within it) of a position in the concatenation of a rank's flat groups."""
    for group in range(len(bounds) - 1):
        if bounds[group] <= offset < bounds[group + 1]:
            return group, offset - bounds[group]
    raise CheckpointError(f"ZeRO-3 partition offset {offset} is outside the flat groups ({bounds[-1]} elements)")


def _zero0_parameter_order(cfg: Config, module: dict) -> list[str]:
    """The order in which megalite gave ZeRO-0's torch optimizer its parameters (model.parameter_groups on the
    same model), as names of the checkpoint's module."""
    model = Transformer(cfg.model, ParallelConfig(), None, device="meta")
    ids = {id(p): n for n, p in model.named_parameters()}
    order = [ids[id(p)] for group in parameter_groups(model, 0.0) for p in group["params"]]
    unknown = [n for n in order if n not in module]
    if unknown:
        raise CheckpointError(f"checkpoint module lacks parameters {unknown[:4]}")
    return order

