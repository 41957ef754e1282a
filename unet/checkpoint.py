"""Checkpoints: their format, written atomically, read back with a clear error, turned back into a model.

A checkpoint is a plain dict saved with `torch.save`: the fields of `Checkpoint` plus
``"format_version"``. `load_model` needs only ``"model"`` and ``"model_config"``, so it rebuilds the
network without knowing how it was trained; ``--resume`` needs every field to continue exactly.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet.model import AttentionUNet, UNetConfig

# 1: the fields of `Checkpoint`, without "format_version" (files written before it was added).
# 2: the same fields, and "format_version".
FORMAT_VERSION = 2
MODEL_KEYS = ("model", "model_config")
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


@dataclass
class Checkpoint:
    """Everything a training checkpoint holds: the whole format, version `FORMAT_VERSION`.

    Every value is a tensor or a built-in type, so ``torch.load(weights_only=True)`` reads it back.
    """

    model: dict[str, torch.Tensor]  # the network's state dict
    model_config: dict[str, Any]  # UNetConfig.to_dict()
    data_config: dict[str, Any]  # the keyword arguments of unet.data.build_datasets
    args: dict[str, Any]  # the training flags, vars(argparse.Namespace)
    optimizer: dict[str, Any]  # state dicts of the optimizer, learning-rate scheduler and gradient scaler
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    epoch: int  # epochs finished
    step_in_epoch: int  # optimizer steps done in the epoch under way (0 at an epoch end)
    global_step: int  # optimizer steps done in all
    best_miou: float  # the best validation mean IoU so far (-1 before the first evaluation)
    rng: list[dict[str, Any]]  # `rng_state()` of each process, by rank

    def to_dict(self) -> dict[str, Any]:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {"format_version": FORMAT_VERSION, **fields}

    @classmethod
    def from_dict(cls, state: dict[str, Any], source: str = "checkpoint") -> "Checkpoint":
        """Read what `to_dict` wrote, of this or an earlier format version; `source` names it in errors."""
        version = state.get("format_version", 1)
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"{source} has checkpoint format version {version!r}; this unet reads versions "
                             f"1 to {FORMAT_VERSION}: update unet to resume from it")
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in state]
        if missing:
            raise ValueError(f"{source} (checkpoint format version {version}) lacks {missing}, "
                             f"which resuming a training run needs; expected a file written by unet.train")
        return cls(**{name: state[name] for name in names})


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
    missing = [key for key in MODEL_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"checkpoint: {str(path)!r} lacks {missing}; expected a file written by unet.train")
    return state


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint to resume from: `load_checkpoint`, and every field of `Checkpoint` present."""
    state = load_checkpoint(path)
    Checkpoint.from_dict(state, source=repr(str(path)))
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
