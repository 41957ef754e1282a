"""The run's logs: ``train.csv`` (one row per optimizer step), ``eval.csv`` (one row per
evaluation) and TensorBoard (``tb/``) when it imports.

On resume, rows and events past the checkpoint's step are dropped, so the logs read as if the run
had never stopped.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

from unet.labels import LABELS
from unet.metrics import ConfusionMatrix


class CsvLog:
    """Rows appended to a CSV file; on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None) -> None:
        self.path, self.fields = path, fields
        rows = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


class RunLog:
    """The run's CSV files, and TensorBoard when it imports (only rank 0 keeps one)."""

    def __init__(self, output: Path, resume_step: int | None) -> None:
        self.train = CsvLog(output / "train.csv", ["step", "epoch", "lr", "loss"], resume_step)
        self.eval = CsvLog(output / "eval.csv", ["step", "epoch", "mean_iou", "pixel_accuracy", *LABELS], resume_step)
        try:  # an optional dependency: the CSV files are enough to follow a run
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            warnings.warn(f"TensorBoard unavailable ({error}); logging to CSV only")
            self.tensorboard = None
        else:
            # purge_step drops the events an interrupted run logged after its last checkpoint.
            purge_step = None if resume_step is None else resume_step + 1
            self.tensorboard = SummaryWriter(log_dir=str(output / "tb"), purge_step=purge_step)

    def step(self, step: int, epoch: int, lr: float, loss: float, parts: dict) -> None:
        self.train.write({"step": step, "epoch": epoch, "lr": lr, "loss": loss})
        if self.tensorboard is not None:
            scalars = {"loss": loss, "lr": lr, **{name: float(value) for name, value in parts.items()}}
            for name, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{name}", value, step)

    def evaluation(self, step: int, epoch: int, matrix: ConfusionMatrix) -> None:
        miou, accuracy = float(matrix.mean_iou()), float(matrix.pixel_accuracy())
        self.eval.write({"step": step, "epoch": epoch, "mean_iou": miou, "pixel_accuracy": accuracy,
                         **dict(zip(LABELS, matrix.iou().tolist()))})
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("val/mean_iou", miou, step)
            self.tensorboard.add_scalar("val/pixel_accuracy", accuracy, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
