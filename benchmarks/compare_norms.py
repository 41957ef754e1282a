"""Compare the model's normalization options on the built-in data (README: Normalization).

    python benchmarks/compare_norms.py --epochs 6 --output runs/compare_norms
    python benchmarks/compare_norms.py --epochs 6 --output runs/compare_norms --options batch,subbatch

Each option is trained by ``python -m unet.train`` with the same flags otherwise: the tiny preset on
the CPU, the same seed, data and number of optimizer steps, batches of 8 as 4 sub-batches of 2
(``--batch-size 2 --accum-steps 4``). A run already in ``<output>/<option>`` is continued or, when
finished, only measured (``--resume auto``; its training time and load average are then those of
the resumed part, while seconds per step come from the whole run's log). Then, on the validation split:

* eval-mode mean IoU and pixel accuracy: the trainer's validation (`unet.inference.confusion_matrices`);
* training-mode mean IoU: the same images through ``model.train()`` in batches of 2, the size of a
  training sub-batch (BatchNorm then normalizes with the batch's own statistics, sub-batch norm
  blends them with the last step's), on a copy of the model whose recorded statistics are discarded
  after each batch, so nothing the trained model holds changes; the gap is training- minus eval-mode;
* seconds per optimizer step: the median interval between the TensorBoard events of consecutive
  steps of one epoch (the evaluations and checkpoints between epochs left out), and the load
  average over the run, since other processes on the machine slow it down.

The table is printed in Markdown and written with the exact commands to ``<output>/results.json``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from unet.checkpoint import load_model
from unet.data import build_datasets
from unet.inference import confusion_matrices, predict_probabilities
from unet.labels import NUM_LABELS
from unet.metrics import ConfusionMatrix
from unet.normalization import discard_step

OPTIONS = {
    "group": ["--norm", "group"],
    "batch": ["--norm", "batch"],
    "subbatch": ["--norm", "subbatch"],
    "subbatch-extrapolate": ["--norm", "subbatch", "--subbatch-extrapolate"],
}
SUB_BATCH = 2  # images per forward in training and in the training-mode measurement
ACCUM_STEPS = 4  # sub-batches per optimizer step: batches of 8
LOAD_SAMPLE_SECONDS = 10


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--output", default="runs/compare_norms", help="one run folder per option in here")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma list of {', '.join(OPTIONS)}")
    parser.add_argument("--epochs", type=int, default=13)
    parser.add_argument("--num-images", type=int, default=2560, help="training images (validation: a tenth more)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def train_command(option: str, run_dir: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "unet.train", "--preset", "tiny", "--device", "cpu", "--seed", str(args.seed),
            "--epochs", str(args.epochs), "--num-images", str(args.num_images), "--image-size", str(args.image_size),
            "--batch-size", str(SUB_BATCH), "--accum-steps", str(ACCUM_STEPS), *OPTIONS[option],
            "--output", str(run_dir), "--resume", "auto",
            "--tune-trials", "0"]  # the comparison scores the network alone: no post-processing to tune


def train_and_sample_load(command: list[str]) -> tuple[float, float]:
    """Run the training command; its wall seconds and the mean 1-minute load average during it."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    samples = [os.getloadavg()[0]]
    while process.poll() is None:
        time.sleep(LOAD_SAMPLE_SECONDS)
        samples.append(os.getloadavg()[0])
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return time.perf_counter() - started, statistics.mean(samples)


def training_log(run_dir: Path) -> list[dict]:
    with (run_dir / "train.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def last_epoch_loss(run_dir: Path) -> float:
    """The mean training loss of the last epoch's steps (the epoch line's loss)."""
    rows = training_log(run_dir)
    return statistics.mean(float(row["loss"]) for row in rows if row["epoch"] == rows[-1]["epoch"])


def seconds_per_step(run_dir: Path) -> float:
    """The median interval between consecutive optimizer steps of the same epoch (TensorBoard wall times)."""
    epoch_of = {int(row["step"]): int(row["epoch"]) for row in training_log(run_dir)}
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    wall_time = {event.step: event.wall_time for event in events.Scalars("train/loss")}
    intervals = [wall_time[step] - wall_time[step - 1] for step in sorted(wall_time)
                 if step - 1 in wall_time and epoch_of.get(step) == epoch_of.get(step - 1)]
    return statistics.median(intervals)


@torch.no_grad()
def training_mode_matrix(model: torch.nn.Module, loader) -> ConfusionMatrix:
    """Argmax confusion matrix of `model` in training mode, on a copy: the trained buffers stay as they are."""
    model = copy.deepcopy(model).train()
    matrix = ConfusionMatrix(NUM_LABELS)
    for batch in loader:
        probs, _ = predict_probabilities(model, batch["image"])
        matrix.update(probs.argmax(1), batch["labels"])
        discard_step(model)  # no optimizer step follows: the next batch blends with the same last step
    return matrix


def measure(run_dir: Path) -> dict:
    model, state = load_model(run_dir / "last.pt")
    _, val_ds = build_datasets(**dict(state["data_config"], augment=False))
    loader = torch.utils.data.DataLoader(val_ds, batch_size=SUB_BATCH)
    evaluation = confusion_matrices(model, loader, torch.device("cpu"), progress=False)["argmax"]
    training = training_mode_matrix(model, loader)
    return {
        "steps": state["global_step"],
        "last_epoch_loss": last_epoch_loss(run_dir),
        "eval_mean_iou": float(evaluation.mean_iou()),
        "eval_pixel_accuracy": float(evaluation.pixel_accuracy()),
        "train_mode_mean_iou": float(training.mean_iou()),
        "train_mode_pixel_accuracy": float(training.pixel_accuracy()),
        "seconds_per_step": seconds_per_step(run_dir),
    }


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| `--norm` | val mean IoU | val pixel accuracy | training-mode mean IoU | gap (training - eval) "
             "| last epoch's training loss | s / step (median) | mean load average |",
             "|---|---|---|---|---|---|---|---|"]
    for option, r in results.items():
        gap = r["train_mode_mean_iou"] - r["eval_mean_iou"]
        lines.append(f"| `{' '.join(OPTIONS[option][1:])}` | {r['eval_mean_iou']:.4f} | {r['eval_pixel_accuracy']:.4f} "
                     f"| {r['train_mode_mean_iou']:.4f} | {gap:+.4f} | {r['last_epoch_loss']:.4f} "
                     f"| {r['seconds_per_step']:.3f} | {r['load_average']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    options = [option.strip() for option in args.options.split(",") if option.strip()]
    unknown = [option for option in options if option not in OPTIONS]
    if unknown or not options:
        parser.error(f"--options: expected a comma list of {', '.join(OPTIONS)}, got {args.options!r}")
    torch.set_num_threads(1)  # the measurement, like the training runs on the 2 shared cores
    output = Path(args.output)
    results = {}
    for option in options:
        run_dir = output / option
        command = train_command(option, run_dir, args)
        print("$ " + " ".join(command[1:]), flush=True)
        seconds, load = train_and_sample_load(command)
        results[option] = {"command": "python " + " ".join(command[1:]), **measure(run_dir),
                           "training_seconds": round(seconds, 1), "load_average": round(load, 2)}
        print(json.dumps(results[option]), flush=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
