"""Evaluate a checkpoint the way the paper does: per-label intersection, union, IoU and mass.

    python -m unet.evaluate --checkpoint runs/tiny/best.pt
    python -m unet.evaluate --checkpoint runs/small/best.pt --data /data/DeepFashion-MultiModal --output eval/

Both label maps are scored side by side: the plain ``argmax`` of the label probabilities and the
paper's post-processing (``dust_fill``: boundary segmentation, per-region vote, DUST_FILL). The
table is printed and written to ``<output>/evaluation.csv`` and ``<output>/evaluation.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from unet.checkpoint import load_model
from unet.cli import AMP_DTYPES, non_negative_int, positive_int
from unet.data import build_datasets
from unet.distributed import resolve_device
from unet.inference import POSTPROCESS_METHODS, confusion_matrices
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


def write_results(results: dict[str, dict], output_dir: Path) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output_dir / "evaluation.json", output_dir / "evaluation.csv"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
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
    parser = argparse.ArgumentParser(description="Evaluate a trained attention UNet", allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by unet.train")
    parser.add_argument("--data", default=None, help="dataset (default: the one the checkpoint was trained on)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--image-size", type=positive_int, default=None, help="default: the training image size")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none")
    parser.add_argument("--methods", default=",".join(POSTPROCESS_METHODS), help="comma list of post-processing methods")
    parser.add_argument("--output", default=None, help="folder for evaluation.csv/.json (default: the checkpoint's)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in args.methods if m not in POSTPROCESS_METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: expected a comma list of {POSTPROCESS_METHODS}, got {','.join(args.methods)!r}")


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        device = resolve_device(args.device)
        model, state = load_model(args.checkpoint, device)
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
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)

    matrices = confusion_matrices(model, loader, device, methods=args.methods, amp=args.amp)
    results = {method: summary(matrix) for method, matrix in matrices.items()}
    print(f"{args.split} split of {data_config.get('data')!r}: {len(dataset)} images")
    print(format_table(matrices))
    output_dir = Path(args.output) if args.output else Path(args.checkpoint).parent
    csv_path, json_path = write_results(results, output_dir)
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
