"""Evaluate a checkpoint the way the paper does: per-label intersection, union, IoU and mass; or
tune its post-processing settings.

    python -m unet.evaluate --checkpoint runs/tiny/best.pt
    python -m unet.evaluate --checkpoint runs/small/best.pt --data /data/DeepFashion-MultiModal --output eval/
    python -m unet.evaluate --checkpoint runs/tiny/best.pt --tune --trials 200 --interior 1

Both label maps are scored side by side: the plain ``argmax`` of the label probabilities and the
paper's post-processing (``dust_fill``: boundary segmentation, per-region vote, DUST_FILL) with the
settings of ``--postprocess-config`` (by default ``postprocess.json`` beside the checkpoint if there
is one, else the library's defaults). The table is printed and written to
``<output>/evaluation.csv`` and ``<output>/evaluation.json``.

``--tune`` instead searches the post-processing settings (`unet.tuning`): seeded random trials
scored on part of the split, the settings kept (the search's best if it beats argmax and the
defaults in cross-validation, else the better of those), and argmax, the defaults and the kept
settings scored on the rest. The kept settings are written to ``postprocess.json`` beside the
checkpoint (``--tune-output``), where ``unet.predict`` and ``unet.evaluate`` find them, and every
trial to ``<output>/tuning.csv``. Ctrl-C ends the search early and still writes what it would keep
of the trials so far.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from unet import postprocess_config, tuning
from unet.checkpoint import load_model
from unet.cli import AMP_DTYPES, non_negative_int, number_type, positive_int
from unet.data import build_datasets
from unet.distributed import resolve_device
from unet.inference import POSTPROCESS_METHODS, confusion_matrices, crop
from unet.labels import LABELS
from unet.metrics import format_table

PER_LABEL_FIELDS = ("intersection", "union", "iou", "predicted_mass", "true_mass")


def summary(matrix) -> dict:
    """One method's results as plain numbers: per label, then pixel accuracy and mean IoU."""
    columns = {field: getattr(matrix, field)().tolist() for field in PER_LABEL_FIELDS}
    return {
        "labels": {name: {field: columns[field][i] for field in PER_LABEL_FIELDS} for i, name in enumerate(LABELS)},
        "pixel_accuracy": float(matrix.pixel_accuracy()),
        "mean_iou": float(matrix.mean_iou()),
    }


def write_results(results: dict[str, dict], output_dir: Path, settings: dict | None = None) -> tuple[Path, Path]:
    """The methods' `summary`s as CSV and JSON; the JSON also holds the `settings` they were scored with."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output_dir / "evaluation.json", output_dir / "evaluation.csv"
    record = results if settings is None else {**results, "settings": settings}
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "label", *PER_LABEL_FIELDS])
        for method, result in results.items():
            for name, row in result["labels"].items():
                writer.writerow([method, name, *(row[field] for field in PER_LABEL_FIELDS)])
            for key in ("pixel_accuracy", "mean_iou"):
                writer.writerow([method, key, "", "", result[key], "", ""])
    return csv_path, json_path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a trained attention UNet, or tune its post-processing",
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by unet.train")
    parser.add_argument("--data", default=None, help="dataset (default: the one the checkpoint was trained on)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--image-size", type=positive_int, default=None, help="default: the training image size")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--workers", type=non_negative_int, default=0, help="data-loading processes")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none")
    parser.add_argument("--methods", default=",".join(POSTPROCESS_METHODS), help="comma list of post-processing methods")
    parser.add_argument("--postprocess-config", default=None, metavar="PATH",
                        help=postprocess_config.FLAG_HELP)
    parser.add_argument("--interior", type=non_negative_int, default=0, metavar="N",
                        help="leave a frame N pixels wide out of the scores (default 0: whole images)")
    parser.add_argument("--output", default=None,
                        help="folder for evaluation.csv/.json, or tuning.csv (default: the checkpoint's)")
    tune = parser.add_argument_group("tuning the post-processing (--tune)")
    tune.add_argument("--tune", action="store_true",
                      help="search the post-processing settings instead of evaluating (see unet.tuning)")
    tune.add_argument("--trials", type=positive_int, default=200, help="settings tried, the defaults first (200)")
    tune.add_argument("--seed", type=non_negative_int, default=0, help="seeds the settings drawn and the held-out images")
    tune.add_argument("--holdout", type=number_type(float, 0.0, True, "a fraction in [0, 1)", maximum=0.999),
                      default=0.5, help="share of the images held out of the search and scored after it "
                                        "(default 0.5; 0: score on the tuning images)")
    tune.add_argument("--processes", type=non_negative_int, default=None,
                      help="processes scoring trials (default: one per CPU, at most 8, at least 20 trials each; "
                           "0: in this process)")
    tune.add_argument("--tune-output", default=None, metavar="PATH",
                      help=f"where the best settings go (default: {postprocess_config.CONFIG_NAME} beside the checkpoint)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in args.methods if m not in POSTPROCESS_METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: expected a comma list of {POSTPROCESS_METHODS}, got {','.join(args.methods)!r}")
    if args.tune and args.postprocess_config is not None:
        parser.error("--postprocess-config: --tune searches the settings itself; leave it out")
    if args.processes is None:
        args.processes = tuning.default_processes(args.trials)


def write_trials(trials: list[tuning.Trial], output_dir: Path) -> Path:
    """Every trial's settings and scores, one row each, to ``<output>/tuning.csv``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "tuning.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *postprocess_config.PostprocessConfig().to_dict(), "mean_iou", "pixel_accuracy"])
        for trial in trials:
            writer.writerow([trial.index, *trial.config.to_dict().values(), trial.mean_iou,
                             trial.matrix.pixel_accuracy()])
    return path


def run_tuning(args: argparse.Namespace, model, state: dict, loader, device, output_dir: Path) -> int:
    """--tune: search, write the kept settings (as soon as the search ends), score, report."""
    report = tuning.tune(model, loader, device, trials=args.trials, seed=args.seed, holdout=args.holdout,
                         interior=args.interior, processes=args.processes, amp=args.amp)
    searched = report.search
    if not searched.trials:
        print("interrupted before any trial was scored; nothing written", file=sys.stderr)
        return 130
    settings_path = Path(args.tune_output) if args.tune_output else postprocess_config.beside(args.checkpoint)
    provenance = {"checkpoint": Path(args.checkpoint).name, "global_step": state.get("global_step"),
                  "data": state.get("data_config", {}).get("data") if args.data is None else args.data,
                  "split": args.split}
    report.best.config.save(settings_path, tuning=report.record(**provenance))
    stopped = " (interrupted)" if searched.interrupted else ""
    print(f"{len(searched.trials)} of {searched.planned} trials scored{stopped} on {len(report.parts['tuning'])} images; "
          f"the best by the objective (the mean of mean IoU and pixel accuracy):")
    print(tuning.format_trials(searched.trials))
    tuning.score_parts(report)
    report.best.config.save(settings_path, tuning=report.record(**provenance))
    print(tuning.format_report(report))
    part = "held_out" if "held_out" in report.matrices else "tuning"
    print(f"per label, on the {'held-out' if part == 'held_out' else 'tuning'} images:")
    print(format_table({method: report.matrices[part][method] for method in ("argmax", "tuned")}))
    print(f"wrote the best settings to {settings_path} and every trial to {write_trials(searched.trials, output_dir)}")
    return 130 if searched.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        device = resolve_device(args.device)
        model, state = load_model(args.checkpoint, device)
        if not args.tune:
            config, config_line = postprocess_config.resolve(args.postprocess_config, args.checkpoint,
                                                             global_step=state.get("global_step"))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    data_config = dict(state.get("data_config", {}), augment=False)
    if args.data is not None:
        data_config["data"] = args.data
    if args.image_size is not None:
        data_config["image_size"] = args.image_size
    train_ds, val_ds = build_datasets(**data_config)
    dataset = val_ds if args.split == "val" else train_ds
    try:
        crop(dataset[0]["labels"], args.interior)
    except ValueError as error:
        print(f"error: --{error}", file=sys.stderr)
        return 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    frame = f", scored without a {args.interior}-pixel frame" if args.interior else ""
    print(f"{args.split} split of {data_config.get('data')!r}: {len(dataset)} images{frame}")
    output_dir = Path(args.output) if args.output else Path(args.checkpoint).parent
    if args.tune:
        return run_tuning(args, model, state, loader, device, output_dir)

    print(config_line)
    matrices = confusion_matrices(model, loader, device, methods=args.methods, amp=args.amp,
                                  postprocess_config=config, interior=args.interior)
    results = {method: summary(matrix) for method, matrix in matrices.items()}
    print(format_table(matrices))
    settings = {"postprocess": config.to_dict(), "interior": args.interior}
    csv_path, json_path = write_results(results, output_dir, settings)
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
