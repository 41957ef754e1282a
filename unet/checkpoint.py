"""Checkpoints: written atomically, read back with a clear error, and turned back into a model.

A checkpoint is a plain dict saved with `torch.save`. It always holds ``"model"`` (the state dict)
and ``"model_config"`` (``UNetConfig.to_dict()``), so `load_model` can rebuild the network without
knowing how it was trained; the trainer adds optimizer, scheduler, scaler, progress, RNG states and
the data config so that ``--resume`` continues exactly.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

REQUIRED_KEYS = ("model", "model_config")
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically: a crash mid-write leaves the previous file untouched.

    The bytes go to a temporary file in the same folder (so `os.replace` stays on one file system,
    where it is atomic), are flushed to disk, and only then replace the old checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; clear errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint: {str(path)!r} is not a readable checkpoint ({error})") from error
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"checkpoint: {str(path)!r} lacks {missing}; expected a file written by unet.train")
    return state


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Turn ``--resume`` into a file: ``"auto"`` is ``<output>/last.pt`` when it exists, else None."""
    if resume is None:
        return None
    if resume == "auto":
        candidate = Path(output_dir) / LAST_NAME
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no such checkpoint {resume!r}")
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the network stored in a checkpoint, in eval mode on `device`; returns (model, state)."""
    from unet.model import AttentionUNet, UNetConfig

    state = load_checkpoint(path)
    model = AttentionUNet(UNetConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only when both sides have CUDA)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
