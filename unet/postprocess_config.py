"""The post-processing settings as data: `PostprocessConfig`, read from and written to JSON.

    config = PostprocessConfig.load("runs/tiny/postprocess.json")
    labels = unet.postprocess.postprocess(probs, boundary, **config.kwargs())

A settings file is a JSON object with any of the fields of `PostprocessConfig` (a missing field
keeps its default) and, optionally, a ``"tuning"`` object, the record `unet.tuning` leaves of the
search that found the settings (read by people, ignored by the loader):

    {"boundary_threshold": 0.35, "gap_iterations": 3, "min_size": 10, "new_threshold": 0.5,
     "join_threshold": 0.05, "impatience": 1.5, "boundary_method": "paper", "tuning": {...}}

`resolve` picks the settings a tool runs with: a file named on the command line (or ``defaults``,
or ``paper`` for `PAPER_CONFIG`, the paper's settings), else ``postprocess.json`` beside the
checkpoint (where ``python -m unet.evaluate --tune`` writes it), else the defaults of
`unet.postprocess`. `ARGMAX_EQUIVALENT` is the setting whose labels are the plain argmax's, one
that tuning may keep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unet import postprocess

CONFIG_NAME = "postprocess.json"  # the settings file beside a checkpoint
DEFAULTS = "defaults"  # --postprocess-config defaults: ignore any file beside the checkpoint
PAPER = "paper"  # --postprocess-config paper: the paper's settings
FLAG_HELP = (f"post-processing settings (JSON); '{DEFAULTS}' for the library's, '{PAPER}' for the paper's "
             f"(default: {CONFIG_NAME} beside the checkpoint if there is one)")
TUNING_KEY = "tuning"


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"field {name!r}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(name: str, value, what: str, accept) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not accept(value):
        raise ValueError(f"field {name!r}: expected {what}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PostprocessConfig:
    """The keyword arguments of `unet.postprocess.postprocess` that shape its result, checked.

    Defaults are the library's (see `unet.postprocess`; `PAPER_CONFIG` holds the paper's settings).
    """

    boundary_threshold: float = postprocess.BOUNDARY_THRESHOLD  # boundary where its probability >= this
    gap_iterations: int = postprocess.GAP_ITERATIONS  # radius of the gap-closing step
    min_size: int = postprocess.MIN_SIZE  # regions of more than this many pixels are kept
    new_threshold: float = postprocess.NEW_THRESHOLD  # leftover pixels this confident are promoted
    join_threshold: float = postprocess.JOIN_THRESHOLD  # L1 distance for a pixel to join a mask
    impatience: float = postprocess.IMPATIENCE  # the join threshold's growth per round
    boundary_method: str = postprocess.BOUNDARY_METHOD  # "paper" or "close_gaps"

    def __post_init__(self) -> None:
        checked = {
            "boundary_threshold": _number("boundary_threshold", self.boundary_threshold, "a number in [0, 1]",
                                          lambda v: 0 <= v <= 1),
            "gap_iterations": _integer("gap_iterations", self.gap_iterations, 0),
            "min_size": _integer("min_size", self.min_size, 0),
            "new_threshold": _number("new_threshold", self.new_threshold, "a number >= 0", lambda v: v >= 0),
            "join_threshold": _number("join_threshold", self.join_threshold, "a number > 0", lambda v: v > 0),
            "impatience": _number("impatience", self.impatience, "a number > 1", lambda v: v > 1),
        }
        if self.boundary_method not in postprocess.BOUNDARY_METHODS:
            raise ValueError(f"field 'boundary_method': expected one of {list(postprocess.BOUNDARY_METHODS)}, "
                             f"got {self.boundary_method!r}")
        for name, value in checked.items():  # a frozen dataclass: store the normalized values directly
            object.__setattr__(self, name, value)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `unet.postprocess.postprocess`."""
        return dataclasses.asdict(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line, ``name=value`` for every field."""
        return ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                         for name, value in self.to_dict().items())

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "postprocess config") -> "PostprocessConfig":
        """Settings from a mapping of field names (missing ones keep their defaults; a ``"tuning"``
        record is ignored); ``ValueError`` naming `source` and the field for anything else."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object of post-processing settings, "
                             f"got {type(values).__name__}")
        unknown = sorted(set(values) - _FIELDS - {TUNING_KEY})
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; expected some of {sorted(_FIELDS)}")
        try:
            return cls(**{name: value for name, value in values.items() if name in _FIELDS})
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PostprocessConfig":
        return cls.from_dict(read_settings_file(path), source=str(path))

    def save(self, path: str | os.PathLike, tuning: dict[str, Any] | None = None) -> Path:
        """Write the settings (and the `tuning` record, when given) as JSON, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = self.to_dict() if tuning is None else {**self.to_dict(), TUNING_KEY: tuning}
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(partial, path)
        return path


_FIELDS = frozenset(field.name for field in dataclasses.fields(PostprocessConfig))

PAPER_CONFIG = PostprocessConfig(**postprocess.PAPER_SETTINGS)

# Labels identical to `unet.postprocess.argmax_labels` (tested): no region is kept (min_size above any
# image's pixel count) and every pixel is promoted (new_threshold 0) to its most probable label (the
# first on ties, as argmax). No gap closing: it would be wasted work.
ARGMAX_EQUIVALENT = PostprocessConfig(gap_iterations=0, min_size=2**31 - 1, new_threshold=0.0)


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in a settings file; ``FileNotFoundError``/``ValueError`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"postprocess config: no such file {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the post-processing settings ({error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def beside(checkpoint: str | os.PathLike) -> Path:
    """Where the settings of a checkpoint live: ``postprocess.json`` in the checkpoint's folder."""
    return Path(checkpoint).parent / CONFIG_NAME


def resolve(config_path: str | None, checkpoint: str | os.PathLike,
            global_step: int | None = None) -> tuple[PostprocessConfig, str]:
    """The settings a tool runs with, and one line saying where they come from.

    `config_path`: a settings file, ``"defaults"``, ``"paper"`` (the paper's settings), or None for
    ``postprocess.json`` beside the checkpoint if there is one, else the defaults. With the checkpoint's `global_step`, the line
    warns when the file beside it records tuning on a checkpoint of another step.
    """
    if config_path == DEFAULTS:
        return PostprocessConfig(), "post-processing settings: the defaults (--postprocess-config defaults)"
    if config_path == PAPER:
        return PAPER_CONFIG, "post-processing settings: the paper's (--postprocess-config paper)"
    if config_path is not None:
        return PostprocessConfig.load(config_path), f"post-processing settings from {config_path}"
    path = beside(checkpoint)
    if not path.is_file():
        return PostprocessConfig(), f"post-processing settings: the defaults (no {CONFIG_NAME} beside the checkpoint)"
    values = read_settings_file(path)
    config = PostprocessConfig.from_dict(values, source=str(path))
    line = f"post-processing settings from {path} (found beside the checkpoint)"
    tuned_step = values.get(TUNING_KEY, {}).get("global_step") if isinstance(values.get(TUNING_KEY), dict) else None
    if global_step is not None and tuned_step is not None and tuned_step != global_step:
        line += (f"; note: they were tuned on a checkpoint at step {tuned_step}, this one is at step "
                 f"{global_step} (tune again: python -m unet.evaluate --tune)")
    return config, line
