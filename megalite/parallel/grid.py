"""The process grid: tensor (TP), context (CP), pipeline (PP), data (DP) and expert (EP) ranks and their groups.

Built on DeepSpeed's own `PipeModelDataParallelTopology` and `PipelineParallelGrid`, so one object
is both the `mpu` handed to `deepspeed.initialize` (ZeRO then shards over data x context ranks, the
ranks that hold replicas of the same weights) and the source of the topology a `PipelineModule` is
built with (`grid.topology`).

Rank layout (DeepSpeed's, row-major over axes pipe, data, model), with context parallelism carved out
of DeepSpeed's `data` axis: global rank = ((pipe x data + dp) x context + cp) x tensor + tp. TP ranks are
adjacent global ranks (innermost), then CP, then DP, then PP (outermost), so tensor- and then
context-parallel traffic stays inside a node where they fit. DeepSpeed's `data` axis (size data x context)
is what it calls the sequence-data-parallel group: every rank in it holds the same weights.

The mpu answers DeepSpeed's Ulysses questions (`get_sequence_parallel_*`: the CP group;
`get_sequence_data_parallel_*`: data x context), so ZeRO partitions and reduces gradients over data x
context and, mostly, sums the context ranks' contributions (megalite.engine.build.context_grad_scale says
where DeepSpeed averages them instead); `get_data_parallel_*` is the pure data-parallel group (batch
arithmetic, the sampler, loss averages).

Expert parallelism (`expert` = ep) is folded into the data x context replicas, as DeepSpeed folds it into its data
axis: the expert-parallel group of a rank is ep replicas of consecutive replica index (replica index = data x
context + context rank) with the same pipeline stage and tensor-parallel rank; the expert-data-parallel group holds
the replicas with the same index modulo ep (the ranks that hold the same experts). These are DeepSpeed's E + M + D
groups (`deepspeed.utils.groups._get_expert_parallel_ranks`, tested equal), created here because DeepSpeed's own
constructors take the data-parallel size from the mpu, which excludes the context ranks, and registered in
DeepSpeed's group registry under its name `ep_size_<ep>`: its engine broadcasts and reduces, and its ZeRO-1/2
partition, the parameters marked with that `group_name` over the expert-data-parallel group.
`replicate_experts` tells the model to hold every expert on every rank instead (the engine's choice at ZeRO-0 and
ZeRO-3; megalite.engine.moe).
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

from megalite.errors import ConfigError


def _init_deepspeed_comm() -> None:
    """DeepSpeed's grid talks through deepspeed.comm: wrap the existing torch process group."""
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        # No MPI discovery and no new process group: torch.distributed is already up. On a CPU
        # accelerator this may JIT-build DeepSpeed's shm_comm op unless the caller disabled it
        # (deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False), as the tests do.
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


class ProcessGrid(PipelineParallelGrid):
    """TP x CP x PP x DP process groups with the full DeepSpeed `mpu` interface (Ulysses included)."""

    def __init__(self, tensor: int = 1, pipeline: int = 1, context: int = 1, expert: int = 1,
                 replicate_experts: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGrid needs torch.distributed to be initialised first")
        world = dist.get_world_size()
        if tensor < 1 or pipeline < 1 or context < 1 or world % (tensor * pipeline * context):
            raise ConfigError(
                f"world size {world} is not divisible by parallel.tensor x parallel.context x parallel.pipeline = "
                f"{tensor} x {context} x {pipeline}"
            )
        if expert < 1 or (world // (tensor * pipeline)) % expert:
            raise ConfigError(f"parallel.expert: {expert} does not divide the {world // (tensor * pipeline)} data x "
                              "context replicas")
        _init_deepspeed_comm()
        replicas = world // (tensor * pipeline)  # DeepSpeed's data axis: data x context
        topo = PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=replicas)
        super().__init__(topology=topo)
        # DeepSpeed creates the TP (slice) group; keep its global ranks for broadcasts.
        self.tp_ranks: list[int] = list(self.slice_group)
        self.cp_size = context
        self._build_context_groups(tensor, pipeline, context, replicas // context)
        self.replicate_experts = replicate_experts
        self._build_expert_groups(tensor, pipeline, expert, replicas)

    def _build_context_groups(self, tensor: int, pipeline: int, context: int, data: int) -> None:
        """The context groups and the pure data-parallel groups inside DeepSpeed's data axis (every rank creates
        every group, in the same order, as torch.distributed requires)."""
        coord = self._topo.get_coord(self.global_rank)
        self.cp_rank, self.pure_dp_rank = coord.data % context, coord.data // context
        if context == 1:  # DeepSpeed's data axis is the data-parallel group; no new groups
            self.cp_proc_group, self.cp_ranks = None, [self.global_rank]
            self.pure_dp_proc_group, self.pure_dp_ranks = self.dp_proc_group, list(self.dp_group)
            return

        def rank(pipe: int, replica: int, tp: int) -> int:
            return self._topo.get_rank(pipe=pipe, data=replica, model=tp)

        for pipe in range(pipeline):
            for tp in range(tensor):
                for dp in range(data):
                    ranks = [rank(pipe, dp * context + cp, tp) for cp in range(context)]
                    group = dist.new_group(ranks=ranks)
                    if self.global_rank in ranks:
                        self.cp_proc_group, self.cp_ranks = group, ranks
                for cp in range(context):
                    ranks = [rank(pipe, dp * context + cp, tp) for dp in range(data)]
                    group = dist.new_group(ranks=ranks)
                    if self.global_rank in ranks:
                        self.pure_dp_proc_group, self.pure_dp_ranks = group, ranks

    def _build_expert_groups(self, tensor: int, pipeline: int, expert: int, replicas: int) -> None:
        """The expert-parallel and expert-data-parallel groups (module docstring), registered with DeepSpeed."""
        replica = self._topo.get_coord(self.global_rank).data
        self.ep_size, self.ep_rank = expert, replica % expert
        if expert == 1:
            self.ep_proc_group, self.ep_ranks = None, [self.global_rank]
            self.edp_proc_group, self.edp_ranks = self.dp_proc_group, list(self.dp_group)
            return

        def rank(pipe: int, replica: int, tp: int) -> int:
            return self._topo.get_rank(pipe=pipe, data=replica, model=tp)

        for pipe in range(pipeline):
            for tp in range(tensor):
                for g in range(replicas // expert):
                    ranks = [rank(pipe, g * expert + j, tp) for j in range(expert)]
                    group = dist.new_group(ranks=ranks)
                    if self.global_rank in ranks:
                        self.ep_proc_group, self.ep_ranks = group, ranks
                for j in range(expert):
                    ranks = [rank(pipe, g * expert + j, tp) for g in range(replicas // expert)]
                    group = dist.new_group(ranks=ranks)
                    if self.global_rank in ranks:
                        self.edp_proc_group, self.edp_ranks = group, ranks
        self._register_expert_groups_with_deepspeed()

    def _register_expert_groups_with_deepspeed(self) -> None:
        """Put this grid's groups where DeepSpeed looks them up by name (its constructors would skip a name that a
        grid built earlier in the process registered: the latest grid wins here)."""
        from deepspeed.utils import groups as ds_groups

        name = f"ep_size_{self.ep_size}"  # megalite.parallel.experts.deepspeed_expert_group_name
        ds_groups._EXPERT_PARALLEL_GROUP[name] = self.ep_proc_group
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(self.ep_ranks)
        ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = self.edp_proc_group
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(self.edp_ranks)

    # ---- the names megalite uses
    @property
    def topology(self) -> PipeModelDataParallelTopology:  # type: ignore[override]
        """The DeepSpeed topology, for `PipelineModule(topology=grid.topology)`."""
        return self._topo

    @property
    def tp_rank(self) -> int:
        return self.get_tensor_model_parallel_rank()

    @property
    def tp_size(self) -> int:
        return self.get_tensor_model_parallel_world_size()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.slice_proc_group

    @property
    def dp_rank(self) -> int:
        return self.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self.get_data_parallel_world_size()

    # `dp_group` / `pp_group` stay DeepSpeed's lists of global ranks of its own axes (data x context for
    # `dp_group`); the process groups are `dp_proc_group` / `pp_proc_group` (DeepSpeed's attributes), `tp_group`,
    # `cp_group` (None without context parallelism) and `get_data_parallel_group()` (data only).

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.cp_proc_group

    # ---- data parallelism: the data axis alone (DeepSpeed's `data` axis is data x context)
    def get_data_parallel_rank(self) -> int:
        return self.pure_dp_rank

    def get_data_parallel_world_size(self) -> int:
        return len(self.pure_dp_ranks)

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.pure_dp_proc_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.pure_dp_ranks)

    # ---- DeepSpeed's Ulysses mpu interface: the context group, and data x context (the replicas ZeRO shards over)
    def get_sequence_parallel_group(self) -> dist.ProcessGroup | None:
        return self.cp_proc_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.cp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.cp_rank

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_proc_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.data_parallel_id

    # ---- expert parallelism (inside the data x context replicas)
    def get_expert_parallel_group(self) -> dist.ProcessGroup | None:
        return self.ep_proc_group

    def get_expert_parallel_world_size(self) -> int:
        return self.ep_size

    def get_expert_parallel_rank(self) -> int:
        return self.ep_rank

    def get_expert_data_parallel_group(self) -> dist.ProcessGroup:
        return self.edp_proc_group

    def get_expert_data_parallel_world_size(self) -> int:
        return len(self.edp_ranks)

    @property
    def pp_rank(self) -> int:
        return self.get_pipe_parallel_rank()

    @property
    def pp_size(self) -> int:
        return self.get_pipe_parallel_world_size()

    # ---- mpu names DeepSpeed 0.19 calls that PipelineParallelGrid lacks
    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        """The tensor-parallel group (DeepSpeed's engine, checkpointing and bwc helpers ask for it)."""
        return self.slice_proc_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group."""
        return self.tp_ranks[0]

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        """The pipeline group (Megatron's name)."""
        return self.pp_proc_group

    def __repr__(self) -> str:
        return (
            f"ProcessGrid(rank={self.global_rank}, tp={self.tp_rank}/{self.tp_size}, "
            f"cp={self.cp_rank}/{self.cp_size}, pp={self.pp_rank}/{self.pp_size}, dp={self.dp_rank}/{self.dp_size}, "
            f"ep={self.ep_rank}/{self.ep_size})"
        )
