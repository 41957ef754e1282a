"""Tune the post-processing settings on labelled images: a seeded random search.

Section 5.2 of the paper: "our post processing algorithm has a number of parameters that can be
tuned". `tune` runs the network once over a data loader (`collect_probabilities`), splits the
images into a tuning part and a held-out part (`TuningData.split`), scores seeded random settings
(`sample_configs`, drawn from `SEARCH_SPACE`; trial 0 is the library's defaults, trial 1
`ARGMAX_EQUIVALENT`, whose labels are argmax's) on the tuning part, `select`s the settings to keep,
and scores argmax, the defaults and the kept settings on both parts. Trials run in a pool of
processes that read the probabilities from shared memory, so the network's work is never repeated;
Ctrl-C stops the search and keeps the trials already scored.

    report = tune(model, loader, device, trials=200, holdout=0.5, interior=1)
    score_parts(report)
    print(format_report(report))
    report.best.config.save("runs/tiny/postprocess.json", tuning=report.record())

Scores are the mean IoU over the labels present in the target (`ConfusionMatrix.mean_iou`); with
``interior=n``, an ``n``-pixel frame is left out of every image when counting (the image is
post-processed whole). On a hundred images that score is noisy (a rare label, present in a few
images, weighs as much as the background), and the best of many random trials beats the defaults
on the images it was picked on more often than on others. So the search ranks trials by `objective`,
the mean of mean IoU and pixel accuracy, and `select` keeps its best trial only when the search,
cross-validated over `FOLDS` folds of the tuning images, beats both the defaults and argmax in mean
IoU; otherwise it keeps the better of those two.
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
from unet.postprocess_config import ARGMAX_EQUIVALENT, PostprocessConfig

IMAGES_PER_CALL = 64  # images post-processed per call: bounds the memory of one trial
TRIALS_PER_PROCESS = 20  # a worker's start-up (it imports torch) costs seconds: worth it over tens of trials
MAX_PROCESSES = 8  # each worker holds its own torch; the probabilities are shared
FOLDS = 4  # cross-validation folds of the tuning images, for `select`


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
    """`trials` settings: the defaults, `ARGMAX_EQUIVALENT`, then draws from `SEARCH_SPACE` (and either
    boundary method with equal chance) by a generator seeded with `seed`."""
    trials = check_int("trials", trials)
    rng = np.random.default_rng(seed)
    configs = [PostprocessConfig(), ARGMAX_EQUIVALENT][:trials]
    for _ in range(trials - len(configs)):
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
    return _confusion(score_folds(config, data, interior).sum(0))


def score_folds(config: PostprocessConfig | None, data: TuningData, interior: int = 0,
                folds: torch.Tensor | None = None) -> torch.Tensor:
    """Confusion counts (K, L, L) of the post-processing with `config` (None: argmax) on `data`, one
    matrix per fold: `folds` gives each image's fold in [0, K) (None: one fold of every image)."""
    folds = torch.zeros(len(data), dtype=torch.int64) if folds is None else folds
    matrices = [ConfusionMatrix(NUM_LABELS) for _ in range(int(folds.max()) + 1 if len(folds) else 1)]
    for start in range(0, len(data), IMAGES_PER_CALL):
        stop = start + IMAGES_PER_CALL
        labels = label_map("argmax" if config is None else "dust_fill", data.probs[start:stop],
                           data.boundary[start:stop], postprocess_config=config)
        predicted, target = crop(labels, interior), crop(data.labels[start:stop], interior)
        for fold in folds[start:stop].unique().tolist():
            chosen = folds[start:stop] == fold
            matrices[fold].update(predicted[chosen], target[chosen])
    return torch.stack([matrix.matrix for matrix in matrices])


def fold_ids(images: int, seed: int = 0, folds: int = FOLDS) -> torch.Tensor:
    """Each of `images` images' fold, in [0, min(folds, images)): a seeded shuffle dealt round."""
    order = torch.as_tensor(np.random.default_rng(seed).permutation(images), dtype=torch.int64)
    ids = torch.empty(images, dtype=torch.int64)
    ids[order] = torch.arange(images) % max(1, min(folds, images))
    return ids


def _confusion(counts: torch.Tensor) -> ConfusionMatrix:
    matrix = ConfusionMatrix(NUM_LABELS)
    matrix.matrix += counts
    return matrix


def objective(matrix: ConfusionMatrix) -> float:
    """What the search ranks trials by: the mean of mean IoU and pixel accuracy (steadier on a few
    hundred images than mean IoU alone, which a rare label in a few images sways); -inf if NaN."""
    return _sortable((matrix.mean_iou() + matrix.pixel_accuracy()) / 2)


@dataclass
class Trial:
    index: int
    config: PostprocessConfig
    fold_counts: torch.Tensor  # (K, L, L) confusion counts per fold of the images it was scored on

    @property
    def matrix(self) -> ConfusionMatrix:
        return _confusion(self.fold_counts.sum(0))

    @property
    def mean_iou(self) -> float:
        return self.matrix.mean_iou()

    @property
    def objective(self) -> float:
        return objective(self.matrix)


@dataclass
class SearchResult:
    trials: list[Trial]  # those scored, by index
    planned: int
    interrupted: bool = False

    @property
    def best(self) -> Trial:
        """The highest `objective`; on a tie the earliest trial (so the defaults win ties)."""
        if not self.trials:
            raise ValueError("tuning: no trial was scored")
        return _best(self.trials, lambda trial: trial.objective)


def _best(trials: Sequence[Trial], key) -> Trial:
    return max(trials, key=lambda trial: (key(trial), -trial.index))


def _sortable(value: float) -> float:
    return -math.inf if math.isnan(value) else value


# The pool's workers score trials on the data the parent placed in shared memory.
_WORKER_DATA: dict[str, Any] = {}


def _start_worker(data: TuningData, interior: int, folds: torch.Tensor | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)  # the pool is the parallelism
    _WORKER_DATA.update(data=data, interior=interior, folds=folds)


def _score_in_worker(index: int, config: PostprocessConfig) -> tuple[int, torch.Tensor]:
    return index, score_folds(config, _WORKER_DATA["data"], _WORKER_DATA["interior"], _WORKER_DATA["folds"])


def _scored_trials(configs: Sequence[PostprocessConfig], data: TuningData, interior: int, processes: int,
                   folds: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, confusion counts per fold) of each trial as it finishes: in a pool, or in this process
    (also for the trials left when a worker dies: the search goes on, slower, rather than failing)."""
    done: set[int] = set()
    if processes > 1:
        try:
            for index, counts in _scored_in_pool(configs, data, interior, processes, folds):
                done.add(index)
                yield index, counts
        except BrokenProcessPool as error:
            warnings.warn(f"tuning: a worker process failed ({error}); the other trials run in this process",
                          RuntimeWarning, stacklevel=2)
    for index, config in enumerate(configs):
        if index not in done:
            yield index, score_folds(config, data, interior, folds)


def _scored_in_pool(configs: Sequence[PostprocessConfig], data: TuningData, interior: int, processes: int,
                    folds: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
    for tensor in (data.probs, data.boundary, data.labels):
        tensor.share_memory_()  # the workers map these pages instead of receiving copies
    context = torch.multiprocessing.get_context("spawn")  # no fork of a process running torch threads
    with ProcessPoolExecutor(min(processes, len(configs)), mp_context=context,
                             initializer=_start_worker, initargs=(data, interior, folds)) as pool:
        futures = [pool.submit(_score_in_worker, index, config) for index, config in enumerate(configs)]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:  # stopped early: drop the trials not started, let the running ones end
            for future in futures:
                future.cancel()


def search(configs: Sequence[PostprocessConfig], data: TuningData, *, interior: int = 0, processes: int = 0,
           progress: bool = True, folds: torch.Tensor | None = None) -> SearchResult:
    """Score every config on `data`, `processes` at a time (0 or 1: in this process), per fold of the
    images (`folds`: each image's fold, as `score_folds`; None: one fold).

    Ctrl-C (KeyboardInterrupt) ends the search early: the result holds the trials scored so far and
    ``interrupted=True``.
    """
    result = SearchResult(trials=[], planned=len(configs))
    scored = _scored_trials(configs, data, interior, processes, folds)
    with tqdm(total=len(configs), desc="tune", unit="trial", dynamic_ncols=True, disable=not progress) as bar:
        try:
            for index, counts in scored:
                result.trials.append(Trial(index, configs[index], counts))
                bar.update()
                bar.set_postfix(best=f"{result.best.objective:.4f}")
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            scored.close()
    result.trials.sort(key=lambda trial: trial.index)
    return result


SOURCES = ("argmax", "defaults", "search")  # what `select` may keep; on a tie, the earlier


@dataclass
class Selection:
    """The settings `select` keeps: `trial`, taken from `source` ("argmax": `ARGMAX_EQUIVALENT`,
    "defaults", or "search": the search's best), and the cross-validated mean IoU on the tuning
    images of each source it weighed (the search's is NaN with fewer than 2 folds)."""

    trial: Trial
    source: str
    estimates: dict[str, float]


def cross_validated_mean_iou(trials: Sequence[Trial]) -> float:
    """Mean IoU of the search run on all folds but one, its best trial scored on the fold left out,
    in turn for each fold, the counts pooled: what picking the best trial is worth on unseen images.
    NaN with fewer than 2 folds."""
    num_folds = trials[0].fold_counts.shape[0]
    if num_folds < 2:
        return math.nan
    pooled = torch.zeros_like(trials[0].fold_counts[0])
    for fold in range(num_folds):
        best = _best(trials, lambda trial: objective(_confusion(trial.fold_counts.sum(0) - trial.fold_counts[fold])))
        pooled += best.fold_counts[fold]
    return _confusion(pooled).mean_iou()


def select(result: SearchResult) -> Selection:
    """The settings to keep: the search's best trial if the search, cross-validated, beats the
    defaults and `ARGMAX_EQUIVALENT` (trials scored with the search, found by their settings) in mean
    IoU; otherwise the better of those two. On a tie the simpler wins: argmax, then the defaults."""
    candidates = {"search": result.best}
    for source, config in (("argmax", ARGMAX_EQUIVALENT), ("defaults", PostprocessConfig())):
        candidates.update({source: trial for trial in result.trials if trial.config == config}.items())
    estimates = {source: trial.mean_iou for source, trial in candidates.items()}
    estimates["search"] = cross_validated_mean_iou(result.trials)
    source = max(candidates, key=lambda name: (_sortable(estimates[name]), -SOURCES.index(name)))
    return Selection(candidates[source], source, {name: estimates[name] for name in SOURCES if name in estimates})


@dataclass
class TuningReport:
    """A search, the images it used, the settings kept (`selection`), and (after `score_parts`) the
    scores of argmax, the defaults and the kept settings on the tuning and the held-out images."""

    search: SearchResult
    selection: Selection | None  # None when no trial was scored
    parts: dict[str, TuningData]  # "tuning", and "held_out" unless holdout is 0
    interior: int
    holdout: float
    seed: int
    matrices: dict[str, dict[str, ConfusionMatrix]] = field(default_factory=dict)  # part -> method -> matrix

    @property
    def best(self) -> Trial:
        """The kept settings' trial."""
        return self.selection.trial

    def record(self, **extra) -> dict[str, Any]:
        """The JSON-able account of the search, saved beside the tuned settings; `extra` leads."""
        scores = {part: {method: {"mean_iou": matrix.mean_iou(), "pixel_accuracy": matrix.pixel_accuracy()}
                         for method, matrix in methods.items()} for part, methods in self.matrices.items()}
        return {
            **extra,
            "objective": "trials ranked by the mean of mean IoU (labels present) and pixel accuracy on the "
                         "tuning images; the search's best kept if, cross-validated, it beats argmax and the "
                         "defaults in mean IoU",
            "interior": self.interior, "seed": self.seed, "holdout": self.holdout,
            "images": {part: len(data) for part, data in self.parts.items()},
            "trials_planned": self.search.planned, "trials_scored": len(self.search.trials),
            "interrupted": self.search.interrupted, "best_trial": self.best.index,
            "kept": self.selection.source, "folds": int(self.best.fold_counts.shape[0]),
            "cross_validated_mean_iou": {name: _json_number(value) for name, value in self.selection.estimates.items()},
            "scores": scores,
        }


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def tune(model, loader, device, *, trials: int = 200, seed: int = 0, holdout: float = 0.5, interior: int = 0,
         processes: int = 0, amp: str = "none", progress: bool = True) -> TuningReport:
    """Collect the probabilities once, hold out a `holdout` share of the images, search on the rest
    (in `FOLDS` folds), `select` the settings to keep."""
    configs = sample_configs(trials, seed)
    data = collect_probabilities(model, loader, device, amp=amp, progress=progress)
    crop(data.labels, interior)  # a frame too wide fails here, before the search
    tuning_part, held_out = data.split(holdout, seed)
    parts = {"tuning": tuning_part, "held_out": held_out} if holdout else {"tuning": tuning_part}
    result = search(configs, tuning_part, interior=interior, processes=processes, progress=progress,
                    folds=fold_ids(len(tuning_part), seed))
    selection = select(result) if result.trials else None
    return TuningReport(result, selection, parts, interior, holdout, seed)


def score_parts(report: TuningReport) -> None:
    """Fill `report.matrices`: argmax, the defaults and the kept settings on each part of the images."""
    for part, data in report.parts.items():
        report.matrices[part] = {
            "argmax": score(None, data, report.interior),
            "defaults": score(PostprocessConfig(), data, report.interior),
            "tuned": score(report.best.config, data, report.interior),
        }


KEPT = {"search": "the search's best", "defaults": "the defaults (the search did not beat them)",
        "argmax": "argmax's labels (neither the search nor the defaults beat argmax)"}

SHORT_NAMES = {"boundary_threshold": "boundary", "gap_iterations": "gaps", "min_size": "min size",
               "new_threshold": "promote", "join_threshold": "join", "impatience": "impatience",
               "boundary_method": "method"}


def format_trials(trials: Sequence[Trial], top: int = 5) -> str:
    """The `top` trials by `objective`, one row each with their mean IoU and settings."""
    ranked = sorted(trials, key=lambda trial: (-trial.objective, trial.index))[:top]
    header = f"{'trial':>5} {'objective':>9} {'mean IoU':>8}  " + " ".join(f"{name:>10}" for name in SHORT_NAMES.values())
    rows = [header, "-" * len(header)]
    for trial in ranked:
        cells = [f"{value:>10.4g}" if isinstance(value, float) else f"{value!s:>10}"
                 for value in trial.config.to_dict().values()]
        rows.append(f"{trial.index:>5} {trial.objective:>9.4f} {trial.mean_iou:>8.4f}  " + " ".join(cells))
    return "\n".join(rows)


def format_report(report: TuningReport) -> str:
    """Which settings were kept and why, then the mean IoU and pixel accuracy of argmax, the defaults
    and the kept settings, per part of the images."""
    names = {"tuning": f"tuning images ({len(report.parts['tuning'])})",
             "held_out": f"held-out images ({len(report.parts.get('held_out', ()))})"}
    parts = list(report.matrices)
    widths = [max(19, len(names[part])) for part in parts]
    estimates = ", ".join(f"{name} {value:.4f}" for name, value in report.selection.estimates.items())
    lines = [f"kept: {KEPT[report.selection.source]} (trial {report.best.index}); cross-validated mean IoU on the "
             f"tuning images: {estimates}",
             f"{'':<22}" + " | ".join(f"{names[part]:<{width}}" for part, width in zip(parts, widths)),
             f"{'method':<22}" + " | ".join(f"{'mean IoU':>8} {'pixel acc':>10}".ljust(width) for width in widths)]
    labels = {"argmax": "argmax", "defaults": "defaults",
              "tuned": f"tuned (trial {report.best.index})"}
    for method, label in labels.items():
        cells = [f"{report.matrices[part][method].mean_iou():>8.4f} "
                 f"{report.matrices[part][method].pixel_accuracy():>10.4f}".ljust(width)
                 for part, width in zip(parts, widths)]
        lines.append(f"{label:<22}" + " | ".join(cells))
    return "\n".join(lines)
