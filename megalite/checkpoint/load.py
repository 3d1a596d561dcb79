"""Loading a verified checkpoint into a DeepSpeed engine of the same layout, without running code from it.

DeepSpeed reads the files through `SafeCheckpointEngine` (megalite.checkpoint.ds_engine), which calls
torch.load(weights_only=True) with an explicit allowlist of DeepSpeed's own types; each rank gets back its own RNG
and client state. A checkpoint of another layout is resharded instead (megalite.engine.elastic).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from megalite.checkpoint.ds_engine import install_safe_loading
from megalite.checkpoint.manifest import read_manifest
from megalite.checkpoint.paths import DS_TAG, MANIFEST
from megalite.checkpoint.rng import set_rng_state
from megalite.checkpoint.verify import listed_files, verify_share
from megalite.distributed import all_gather_objects, broadcast_object, scatter_objects
from megalite.distributed import rank as global_rank
from megalite.distributed import world_size as global_world_size
from megalite.errors import CheckpointError

log = logging.getLogger("megalite.checkpoint")


class EngineLoad:
    """Loading half of `CheckpointManager` (megalite.checkpoint.manager): expects `_verified` (the manifests
    find_resume verified, by body hash)."""

    _verified: dict[str, str]

    def load(self, engine: Any, path: str) -> dict:
        """Load a verified checkpoint into `engine` safely and restore this rank's RNG (collective)."""
        rank, world = global_rank(), global_world_size()
        mpath = os.path.join(path, MANIFEST)
        shared: dict[str, Any] = {}
        per_rank: list[Any] = [None] * world
        if rank == 0:
            try:
                manifest = read_manifest(path)
                rngs = manifest.pop("rng", [])
                clients = manifest.pop("client_state_per_rank", None)
                per_rank = [
                    {"rng": rngs[r] if len(rngs) == world else None,
                     "client_state": clients[r] if clients is not None and r < len(clients) else None}
                    for r in range(world)
                ]
                shared = {"manifest": manifest, "error": None, "saved_ranks": len(rngs),
                          "has_per_rank_client": clients is not None}
            except CheckpointError as e:
                shared = {"manifest": None, "error": str(e)}
            except (KeyError, TypeError) as e:
                shared = {"manifest": None, "error": f"{mpath}: cannot read manifest: {e}"}
        shared = broadcast_object(shared)
        if shared["error"]:
            raise CheckpointError(shared["error"])
        mine_state = scatter_objects(per_rank)  # each rank gets only its own RNG/client state, not everyone's
        manifest = shared["manifest"]
        if self._verified.get(path) != manifest["body_sha256"]:
            # Not verified by find_resume: at least make sure no file can run code, agreed by all ranks.
            mine = verify_share(path, listed_files(manifest), rank, world, hashes=False)
            problems = sorted({p for ps in all_gather_objects(mine) for p in ps})
            if problems:
                raise CheckpointError(f"{path}: refusing to load:\n" + "\n".join(problems))

        install_safe_loading(engine)
        load_path, _ = engine.load_checkpoint(path, tag=manifest.get("deepspeed_tag", DS_TAG),
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed did not load the checkpoint (tag {DS_TAG!r} missing?)")

        client = mine_state["client_state"] if shared["has_per_rank_client"] else manifest.get("client_state")
        rng = mine_state["rng"]
        if rng is not None:
            set_rng_state(rng)
        else:
            log.warning("%s: saved with %d ranks, running with %d: RNG states not restored",
                        mpath, shared["saved_ranks"], world)
        return {
            "step": manifest["step"],
            "client_state": client,
            "rng": rng,
            "config": manifest.get("config", {}),
            "layout": manifest.get("layout", {}),
            "path": path,
        }

