"""Every RNG state of a process as JSON-serialisable data, for the checkpoint manifest."""

from __future__ import annotations

import base64
import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger("megalite.checkpoint")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, current CUDA device), JSON-serialisable."""
    version, words, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": _b64(np.asarray(words, dtype=np.uint32).tobytes()), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": _b64(np.asarray(np_keys, dtype=np.uint32).tobytes()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "cuda": None,
    }
    # Only the current device, and only once CUDA is in use: get_rng_state_all() would create a context
    # (and reserve memory) on every visible GPU of the node.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_state = torch.cuda.get_rng_state().numpy().tobytes()
        state["cuda"] = {"device": torch.cuda.current_device(), "state": _b64(cuda_state)}
    return state


def set_rng_state(d: dict) -> None:
    """Restore RNG states produced by `rng_state()` (CUDA only when present on both sides)."""
    py = d["python"]
    words = tuple(int(w) for w in np.frombuffer(_unb64(py["state"]), dtype=np.uint32))
    random.setstate((py["version"], words, py["gauss"]))
    nps = d["numpy"]
    keys = np.frombuffer(_unb64(nps["keys"]), dtype=np.uint32).copy()
    np.random.set_state((nps["name"], keys, nps["pos"], nps["has_gauss"], nps["gauss"]))
    torch.set_rng_state(torch.frombuffer(bytearray(_unb64(d["torch"])), dtype=torch.uint8))
    cuda = d.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(_unb64(cuda["state"])), dtype=torch.uint8))
    elif cuda:
        log.warning("checkpoint holds a CUDA RNG state but CUDA is not available here: not restored")

