"""When the training run saves a checkpoint (`Checkpointer.due`). Evaluation is megalite.engine.evaluation, the
metric window and the profiler megalite.engine.metrics, the batch stream megalite.data.stream."""

from __future__ import annotations

from megalite.checkpoint import CheckpointManager
from megalite.config import Config


class Checkpointer:
    """When to save: every `train.checkpoint_interval` steps and at the end. It only decides; the checkpoint state
    and the saving are the trainer's `CheckpointManager` (`manager`, held here but not used)."""

    def __init__(self, cfg: Config, manager: CheckpointManager) -> None:
        self.cfg, self.manager = cfg, manager

    def due(self, step: int) -> bool:
        every = self.cfg.train.checkpoint_interval
        return bool(every and step % every == 0) or step == self.cfg.train.steps
