"""Tune the post-processing settings on labelled images: a seeded random search.

Section 5.2 of the paper: "our post processing algorithm has a number of parameters that can be
tuned". `tune` runs the network once over a data loader (`collect_probabilities`), splits the
images into a tuning part and a held-out part (`TuningData.split`), scores seeded random settings
(`sample_configs`, drawn from `SEARCH_SPACE`; trial 0 is the library's defaults) on the tuning
part, and scores argmax, the defaults and the best trial on both parts. Trials run in a pool of
processes that read the probabilities from shared memory, so the network's work is never repeated;
Ctrl-C stops the search and keeps the trials already scored.

    report = tune(model, loader, device, trials=200, holdout=0.5, interior=1)
    score_parts(report)
    print(format_report(report))
    report.best.config.save("runs/tiny/postprocess.json", tuning=report.record())

Scores are the mean IoU over the labels present in the target (`ConfusionMatrix.mean_iou`); with
``interior=n``, an ``n``-pixel frame is left out of every image when counting (the image is
post-processed whole).
"""

from __future__ import annotations

import math
import signal
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.multiprocessing
from tqdm import tqdm

from unet import postprocess
from unet.checks import check_int
from unet.distributed import available_cpus
from unet.inference import crop, label_map, predict_probabilities
from unet.labels import NUM_LABELS
from unet.metrics import ConfusionMatrix
from unet.postprocess_config import PostprocessConfig

IMAGES_PER_CALL = 64  # images post-processed per call: bounds the memory of one trial
TRIALS_PER_PROCESS = 20  # a worker's start-up (it imports torch) costs seconds: worth it over tens of trials
MAX_PROCESSES = 8  # each worker holds its own torch; the probabilities are shared


def default_processes(trials: int) -> int:
    """Processes for a search of `trials`: one per CPU, at most `MAX_PROCESSES`, each with at least
    `TRIALS_PER_PROCESS` trials; 0 (this process, whose post-processing is parallel over images on
    torch's threads) when that leaves fewer than 2."""
    processes = min(available_cpus(), MAX_PROCESSES, trials // TRIALS_PER_PROCESS)
    return processes if processes >= 2 else 0


@dataclass(frozen=True)
class Range:
    """Where a setting is drawn from: uniform in [low, high], or log-uniform; rounded for integers."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def sample(self, rng: np.random.Generator):
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return int(round(value)) if self.integer else float(value)


# The paper used boundary thresholds of 0.1-0.7, a 5-pixel expand-contract, masks of more than 10
# pixels, promotion at 0.5, join threshold 0.05 and impatience 1.5; the ranges reach well past
# each. min_size is drawn log-uniformly in [1, 100] and 1 is subtracted, so 0 (keep every region)
# is possible. A promotion threshold near 0 promotes every leftover pixel to its own argmax label.
SEARCH_SPACE: dict[str, Range] = {
    "boundary_threshold": Range(0.05, 0.95),
    "gap_iterations": Range(0, 8, integer=True),
    "min_size": Range(1, 101, log=True, integer=True),
    "new_threshold": Range(0.0, 1.0),
    "join_threshold": Range(0.005, 0.5, log=True),
    "impatience": Range(1.05, 4.0, log=True),
}


def sample_configs(trials: int, seed: int = 0) -> list[PostprocessConfig]:
    """`trials` settings: the defaults first, then draws from `SEARCH_SPACE` (and either boundary
    method with equal chance) by a generator seeded with `seed`."""
    trials = check_int("trials", trials)
    rng = np.random.default_rng(seed)
    configs = [PostprocessConfig()]
    for _ in range(trials - 1):
        values = {name: space.sample(rng) for name, space in SEARCH_SPACE.items()}
        values["min_size"] -= 1
        values["boundary_method"] = postprocess.BOUNDARY_METHODS[int(rng.integers(len(postprocess.BOUNDARY_METHODS)))]
        configs.append(PostprocessConfig(**values))
    return configs


@dataclass
class TuningData:
    """The network's outputs on labelled images, on the CPU: probabilities (N, L, H, W) float32,
    boundary probability (N, 1, H, W) and true labels (N, H, W) int64."""

    probs: torch.Tensor
    boundary: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "TuningData":
        index = torch.as_tensor(indices, dtype=torch.int64)
        return TuningData(self.probs[index], self.boundary[index], self.labels[index])

    def split(self, holdout: float, seed: int = 0) -> tuple["TuningData", "TuningData"]:
        """(tuning part, held-out part): a seeded random `holdout` share of the images is held out.

        With ``holdout=0`` both parts are all the images (scores are then measured on the images
        the settings were tuned on).
        """
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout: expected a fraction in [0, 1), got {holdout!r}")
        if holdout == 0:
            return self, self
        held_out = round(len(self) * holdout)
        if held_out == 0 or held_out == len(self):
            raise ValueError(f"holdout: {holdout} of {len(self)} images leaves one part empty")
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(np.sort(order[held_out:])), self.subset(np.sort(order[:held_out]))


@torch.no_grad()
def collect_probabilities(model, loader, device, *, amp: str = "none", progress: bool = True) -> TuningData:
    """The network run once over `loader` (batches of "image" and "labels"), kept on the CPU."""
    model.eval()
    probs, boundary, labels = [], [], []
    for batch in tqdm(loader, desc="probabilities", unit="batch", leave=False, dynamic_ncols=True,
                      disable=not progress):
        batch_probs, batch_boundary = predict_probabilities(model, batch["image"].to(device), amp=amp)
        probs.append(batch_probs.cpu())
        boundary.append(batch_boundary.cpu())
        labels.append(batch["labels"].to(torch.int64))
    if not labels:
        raise ValueError("tuning: the data loader gave no images")
    return TuningData(torch.cat(probs), torch.cat(boundary), torch.cat(labels))


def score(config: PostprocessConfig | None, data: TuningData, interior: int = 0) -> ConfusionMatrix:
    """The confusion matrix of the post-processing with `config` (None: argmax) on `data`."""
    matrix = ConfusionMatrix(NUM_LABELS)
    for start in range(0, len(data), IMAGES_PER_CALL):
        labels = label_map("argmax" if config is None else "dust_fill", data.probs[start : start + IMAGES_PER_CALL],
                           data.boundary[start : start + IMAGES_PER_CALL], postprocess_config=config)
        matrix.update(crop(labels, interior), crop(data.labels[start : start + IMAGES_PER_CALL], interior))
    return matrix


@dataclass
class Trial:
    index: int
    config: PostprocessConfig
    matrix: ConfusionMatrix

    @property
    def mean_iou(self) -> float:
        return self.matrix.mean_iou()


@dataclass
class SearchResult:
    trials: list[Trial]  # those scored, by index
    planned: int
    interrupted: bool = False

    @property
    def best(self) -> Trial:
        """The highest mean IoU; on a tie the earliest trial (so the defaults win ties)."""
        if not self.trials:
            raise ValueError("tuning: no trial was scored")
        return max(self.trials, key=lambda trial: (_sortable(trial.mean_iou), -trial.index))


def _sortable(value: float) -> float:
    return -math.inf if math.isnan(value) else value


# The pool's workers score trials on the data the parent placed in shared memory.
_WORKER_DATA: dict[str, Any] = {}


def _start_worker(data: TuningData, interior: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)  # the pool is the parallelism
    _WORKER_DATA.update(data=data, interior=interior)


def _score_in_worker(index: int, config: PostprocessConfig) -> tuple[int, torch.Tensor]:
    return index, score(config, _WORKER_DATA["data"], _WORKER_DATA["interior"]).matrix


def _scored_trials(configs: Sequence[PostprocessConfig], data: TuningData, interior: int,
                   processes: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, confusion counts) of each trial as it finishes: in a pool, or in this process (also
    for the trials left when a worker dies: the search goes on, slower, rather than failing)."""
    done: set[int] = set()
    if processes > 1:
        try:
            for index, counts in _scored_in_pool(configs, data, interior, processes):
                done.add(index)
                yield index, counts
        except BrokenProcessPool as error:
            warnings.warn(f"tuning: a worker process failed ({error}); the other trials run in this process",
                          RuntimeWarning, stacklevel=2)
    for index, config in enumerate(configs):
        if index not in done:
            yield index, score(config, data, interior).matrix


def _scored_in_pool(configs: Sequence[PostprocessConfig], data: TuningData, interior: int,
                    processes: int) -> Iterator[tuple[int, torch.Tensor]]:
    for tensor in (data.probs, data.boundary, data.labels):
        tensor.share_memory_()  # the workers map these pages instead of receiving copies
    context = torch.multiprocessing.get_context("spawn")  # no fork of a process running torch threads
    with ProcessPoolExecutor(min(processes, len(configs)), mp_context=context,
                             initializer=_start_worker, initargs=(data, interior)) as pool:
        futures = [pool.submit(_score_in_worker, index, config) for index, config in enumerate(configs)]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:  # stopped early: drop the trials not started, let the running ones end
            for future in futures:
                future.cancel()


def search(configs: Sequence[PostprocessConfig], data: TuningData, *, interior: int = 0, processes: int = 0,
           progress: bool = True) -> SearchResult:
    """Score every config on `data`, `processes` at a time (0 or 1: in this process).

    Ctrl-C (KeyboardInterrupt) ends the search early: the result holds the trials scored so far and
    ``interrupted=True``.
    """
    result = SearchResult(trials=[], planned=len(configs))
    scored = _scored_trials(configs, data, interior, processes)
    with tqdm(total=len(configs), desc="tune", unit="trial", dynamic_ncols=True, disable=not progress) as bar:
        try:
            for index, counts in scored:
                matrix = ConfusionMatrix(NUM_LABELS)
                matrix.matrix += counts
                result.trials.append(Trial(index, configs[index], matrix))
                bar.update()
                bar.set_postfix(best=f"{result.best.mean_iou:.4f}")
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            scored.close()
    result.trials.sort(key=lambda trial: trial.index)
    return result


@dataclass
class TuningReport:
    """A search, the images it used, and (after `score_parts`) the scores of argmax, the defaults and
    the best settings on the tuning and the held-out images."""

    search: SearchResult
    parts: dict[str, TuningData]  # "tuning", and "held_out" unless holdout is 0
    interior: int
    holdout: float
    seed: int
    matrices: dict[str, dict[str, ConfusionMatrix]] = field(default_factory=dict)  # part -> method -> matrix

    @property
    def best(self) -> Trial:
        return self.search.best

    def record(self, **extra) -> dict[str, Any]:
        """The JSON-able account of the search, saved beside the tuned settings; `extra` leads."""
        scores = {part: {method: {"mean_iou": matrix.mean_iou(), "pixel_accuracy": matrix.pixel_accuracy()}
                         for method, matrix in methods.items()} for part, methods in self.matrices.items()}
        return {
            **extra,
            "objective": "mean IoU over the labels present, on the tuning images",
            "interior": self.interior, "seed": self.seed, "holdout": self.holdout,
            "images": {part: len(data) for part, data in self.parts.items()},
            "trials_planned": self.search.planned, "trials_scored": len(self.search.trials),
            "interrupted": self.search.interrupted, "best_trial": self.best.index, "scores": scores,
        }


def tune(model, loader, device, *, trials: int = 200, seed: int = 0, holdout: float = 0.5, interior: int = 0,
         processes: int = 0, amp: str = "none", progress: bool = True) -> TuningReport:
    """Collect the probabilities once, hold out a `holdout` share of the images, search on the rest."""
    configs = sample_configs(trials, seed)
    data = collect_probabilities(model, loader, device, amp=amp, progress=progress)
    crop(data.labels, interior)  # a frame too wide fails here, before the search
    tuning_part, held_out = data.split(holdout, seed)
    parts = {"tuning": tuning_part, "held_out": held_out} if holdout else {"tuning": tuning_part}
    result = search(configs, tuning_part, interior=interior, processes=processes, progress=progress)
    return TuningReport(result, parts, interior, holdout, seed)


def score_parts(report: TuningReport) -> None:
    """Fill `report.matrices`: argmax, the defaults and the best trial on each part of the images."""
    for part, data in report.parts.items():
        report.matrices[part] = {
            "argmax": score(None, data, report.interior),
            "defaults": score(PostprocessConfig(), data, report.interior),
            "tuned": score(report.best.config, data, report.interior),
        }


SHORT_NAMES = {"boundary_threshold": "boundary", "gap_iterations": "gaps", "min_size": "min size",
               "new_threshold": "promote", "join_threshold": "join", "impatience": "impatience",
               "boundary_method": "method"}


def format_trials(trials: Sequence[Trial], top: int = 5) -> str:
    """The `top` trials by mean IoU, one row each with their settings."""
    ranked = sorted(trials, key=lambda trial: (-_sortable(trial.mean_iou), trial.index))[:top]
    header = f"{'trial':>5} {'mean IoU':>8}  " + " ".join(f"{name:>10}" for name in SHORT_NAMES.values())
    rows = [header, "-" * len(header)]
    for trial in ranked:
        cells = [f"{value:>10.4g}" if isinstance(value, float) else f"{value!s:>10}"
                 for value in trial.config.to_dict().values()]
        rows.append(f"{trial.index:>5} {trial.mean_iou:>8.4f}  " + " ".join(cells))
    return "\n".join(rows)


def format_report(report: TuningReport) -> str:
    """Mean IoU and pixel accuracy of argmax, the defaults and the best trial, per part of the images."""
    names = {"tuning": f"tuning images ({len(report.parts['tuning'])})",
             "held_out": f"held-out images ({len(report.parts.get('held_out', ()))})"}
    parts = list(report.matrices)
    widths = [max(19, len(names[part])) for part in parts]
    lines = [f"{'':<22}" + " | ".join(f"{names[part]:<{width}}" for part, width in zip(parts, widths)),
             f"{'method':<22}" + " | ".join(f"{'mean IoU':>8} {'pixel acc':>10}".ljust(width) for width in widths)]
    labels = {"argmax": "argmax", "defaults": "defaults",
              "tuned": f"tuned (trial {report.best.index})"}
    for method, label in labels.items():
        cells = [f"{report.matrices[part][method].mean_iou():>8.4f} "
                 f"{report.matrices[part][method].pixel_accuracy():>10.4f}".ljust(width)
                 for part, width in zip(parts, widths)]
        lines.append(f"{label:<22}" + " | ".join(cells))
    return "\n".join(lines)
