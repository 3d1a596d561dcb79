"""The process grid: tensor (TP), pipeline (PP) and data (DP) ranks and their groups.

Built on DeepSpeed's own `PipeModelDataParallelTopology` and `PipelineParallelGrid`, so one object
is both the `mpu` handed to `deepspeed.initialize` (ZeRO then shards over data-parallel ranks only)
and the source of the topology a `PipelineModule` is built with (`grid.topology`).

Rank layout (DeepSpeed's, row-major over axes pipe, data, model): TP ranks are adjacent global
ranks, so tensor-parallel traffic stays inside a node.
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
    """TP x PP x DP process groups with the full DeepSpeed `mpu` interface."""

    def __init__(self, tensor: int = 1, pipeline: int = 1) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGrid needs torch.distributed to be initialised first")
        world = dist.get_world_size()
        if tensor < 1 or pipeline < 1 or world % (tensor * pipeline):
            raise ConfigError(
                f"world size {world} is not divisible by parallel.tensor x parallel.pipeline = {tensor} x {pipeline}"
            )
        _init_deepspeed_comm()
        topo = PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=world // (tensor * pipeline))
        super().__init__(topology=topo)
        # DeepSpeed creates the TP (slice) group; keep its global ranks for broadcasts.
        self.tp_ranks: list[int] = list(self.slice_group)

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

    # `dp_group` / `pp_group` stay DeepSpeed's lists of global ranks; the process groups are
    # `dp_proc_group` / `pp_proc_group` (DeepSpeed's attributes) and `tp_group`.

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
            f"pp={self.pp_rank}/{self.pp_size}, dp={self.dp_rank}/{self.dp_size})"
        )
