"""Train the attention UNet.

    python -m unet.train                                  # tiny preset, built-in data, CPU, a few minutes
    python -m unet.train --preset small --data /data/DeepFashion-MultiModal --amp bf16
    torchrun --nproc_per_node 8 -m unet.train --preset paper --batch-size 4 --resume auto

One plain loop: AdamW (no weight decay on norms, biases and other 1-d parameters), linear warmup
then cosine decay per optimizer step, gradient accumulation and clipping, optional AMP,
channels-last, torch.compile and gradient checkpointing. Each epoch ends with an evaluation whose
per-label IoU table is printed. Logs go to ``<output>/train.csv``, ``<output>/eval.csv`` and
TensorBoard (``<output>/tb``). ``<output>/last.pt`` is written atomically every
``--checkpoint-every`` optimizer steps, at the end of each epoch and on SIGINT/SIGTERM;
``<output>/best.pt`` holds the best mean IoU so far. ``--resume auto`` continues from ``last.pt``
exactly where the interrupted run stood (same batches, same RNG states, same losses).

Under torchrun every process trains on its shard (DistributedDataParallel), the confusion matrices
are summed across processes, and only rank 0 prints, logs and writes checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from unet import distributed
from unet.checkpoint import (
    BEST_NAME, LAST_NAME, load_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state,
)
from unet.inference import confusion_matrices
from unet.labels import LABELS
from unet.cli import AMP_DTYPES, autocast, non_negative_int, number_type, positive_int


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without writing the broken state."""


# ----------------------------------------------------------------------------- flags


positive_float = number_type(float, 0.0, False, "a positive number")
non_negative_float = number_type(float, 0.0, True, "a number >= 0")


def level_list(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1); ``""`` or ``"none"`` -> () (no local attention)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of decoder levels such as 0,1, got {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    from unet.model import PRESETS

    parser = argparse.ArgumentParser(prog="python -m unet.train", description="Train the attention UNet",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="synthetic",
                      help="synthetic (built in), a DeepFashion-MultiModal root (images/ + segm/) "
                           "or a label folder (images/ + labels/)")
    data.add_argument("--image-size", type=positive_int, default=64, help="training image side")
    data.add_argument("--num-images", type=positive_int, default=2560, help="training images of the synthetic set")
    data.add_argument("--val-fraction", type=number_type(float, 0.0, False, "a fraction in (0, 1)", maximum=1.0), default=0.1)
    data.add_argument("--no-augment", dest="augment", action="store_false", help="turn off training augmentation")
    data.add_argument("--workers", type=non_negative_int, default=1, help="data loading processes per training process")
    data.add_argument("--threads", type=non_negative_int, default=0,
                      help="intra-op CPU threads per training process; 0: the cores left to it by the other "
                           "training processes and its data workers (at least 1)")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    model.add_argument("--local-attention-levels", type=level_list, default=None,
                       help="decoder levels with local attention, e.g. 0,1 (default: the preset's)")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    model.add_argument("--channels-last", action="store_true")
    model.add_argument("--compile", action="store_true", help="torch.compile the model")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=positive_int, default=13)
    optim.add_argument("--batch-size", type=positive_int, default=8, help="per process")
    optim.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    optim.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    optim.add_argument("--warmup-epochs", type=non_negative_float, default=0.5)
    optim.add_argument("--warmup-steps", type=non_negative_int, default=None, help="overrides --warmup-epochs")
    optim.add_argument("--accum-steps", type=positive_int, default=1, help="batches per optimizer step")
    optim.add_argument("--clip-grad", type=non_negative_float, default=1.0, help="max grad norm; 0 turns it off")
    optim.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype")

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: this process's GPU if any, else the CPU")
    run.add_argument("--output", default=None, help="run folder (default: runs/<preset>)")
    run.add_argument("--resume", default=None, help="a checkpoint, or 'auto' for <output>/last.pt if present")
    run.add_argument("--eval-every", type=non_negative_int, default=1, help="epochs between evaluations; 0: only at the end")
    run.add_argument("--checkpoint-every", type=non_negative_int, default=200,
                     help="optimizer steps between checkpoints, besides each epoch end; 0: epoch ends only")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.val_fraction >= 1:
        parser.error(f"argument --val-fraction: expected a fraction in (0, 1), got {args.val_fraction}")
    if args.output is None:
        args.output = str(Path("runs") / args.preset)
    return args


# ----------------------------------------------------------------------------- pieces


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: not on norms, biases or bias tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias") or "bias_table" in name or "relative_position" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LambdaLR factor: linear from ~0 to 1 over the warmup, then cosine down to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _init_worker(worker_id: int) -> None:
    """Seed NumPy like torch seeds itself in each worker, and leave stop signals to the main process.

    A Ctrl-C reaches the whole process group; a worker that died of it would break the batch the
    main process still has to finish before it writes its checkpoint.
    """
    np.random.seed(torch.initial_seed() % 2**32)
    for sig in StopSignal.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a flag the loop polls (to checkpoint, then exit).

    A second signal restores the default handlers and interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: no handlers, the run simply cannot be stopped cleanly
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum


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
        try:
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

    def evaluation(self, step: int, epoch: int, matrix) -> None:
        miou, accuracy = float(matrix.mean_iou()), float(matrix.pixel_accuracy())
        self.eval.write({"step": step, "epoch": epoch, "mean_iou": miou, "pixel_accuracy": accuracy,
                         **dict(zip(LABELS, matrix.iou().tolist()))})
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("val/mean_iou", miou, step)
            self.tensorboard.add_scalar("val/pixel_accuracy", accuracy, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


@dataclass
class TrainResult:
    model: torch.nn.Module
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this session
    metrics: object = None  # the last ConfusionMatrix
    global_step: int = 0
    exit_code: int = 0


# ----------------------------------------------------------------------------- training


def default_threads(workers: int) -> int:
    """The cores of this machine left to one training process once its data workers have theirs.

    Oversubscribed intra-op threads mostly wait for each other: on 2 shared cores one thread
    trained 5x faster than two.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - workers)


def train(args: argparse.Namespace) -> TrainResult:
    torch.set_num_threads(args.threads or default_threads(args.workers))
    info = distributed.setup(args.device)
    try:
        return _train(args, info)
    finally:
        distributed.cleanup(info)


def _build(args: argparse.Namespace, checkpoint: dict | None, info: distributed.DistInfo):
    """Data, model, optimizer, scheduler and scaler: from the flags, or as the checkpoint had them."""
    from unet.data import build_datasets
    from unet.losses import SegmentationLoss
    from unet.model import AttentionUNet, UNetConfig, build_model

    if checkpoint is not None:
        data_config = checkpoint["data_config"]
        model = AttentionUNet(UNetConfig.from_dict(checkpoint["model_config"]))
    else:
        data_config = {
            "data": args.data, "image_size": args.image_size, "seed": args.seed,
            "val_fraction": args.val_fraction, "augment": args.augment, "num_synthetic": args.num_images,
        }
        overrides = {"image_size": args.image_size}
        if args.local_attention_levels is not None:
            overrides["local_attention_levels"] = args.local_attention_levels
        seed_everything(args.seed)  # the same initial weights on every process
        model = build_model(args.preset, **overrides)
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(info.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    train_ds, val_ds = build_datasets(**data_config)
    sampler = distributed.EpochSampler(
        len(train_ds), shuffle=True, seed=args.seed, rank=info.rank, world_size=info.world_size
    )
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        worker_init_fn=_init_worker, generator=torch.Generator(),
    )
    # Evaluation counts every image once: a plain shard per process, no padding.
    val_shard = torch.utils.data.Subset(val_ds, range(info.rank, len(val_ds), info.world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=args.batch_size, num_workers=args.workers)

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    batches_per_epoch = -(-sampler.per_rank() // args.batch_size)
    steps_per_epoch = -(-batches_per_epoch // args.accum_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, args.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(info.device.type, enabled=args.amp == "fp16")
    criterion = SegmentationLoss().to(info.device)
    return data_config, model, train_loader, val_loader, optimizer, scheduler, scaler, criterion, steps_per_epoch


def _train(args: argparse.Namespace, info: distributed.DistInfo) -> TrainResult:
    output = Path(args.output)
    resume_path = resolve_resume(args.resume, output)
    # On the CPU: RNG states must stay there; load_state_dict moves the rest to the parameters' device.
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    (data_config, model, train_loader, val_loader, optimizer, scheduler, scaler, criterion,
     steps_per_epoch) = _build(args, checkpoint, info)

    epoch, step_in_epoch, global_step, best_miou = 0, 0, 0, -1.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        epoch, step_in_epoch = checkpoint["epoch"], checkpoint["step_in_epoch"]
        global_step, best_miou = checkpoint["global_step"], checkpoint["best_miou"]
        if step_in_epoch:  # mid-epoch: carry on with the RNG streams exactly where they stood
            set_rng_state(checkpoint["rng"][min(info.rank, len(checkpoint["rng"]) - 1)])

    forward_model = DistributedDataParallel(model) if info.enabled else model
    if args.compile:
        forward_model = torch.compile(forward_model)

    log = None
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        log = RunLog(output, resume_step=global_step if checkpoint is not None else None)
        where = f" from {resume_path} (epoch {epoch}, step {global_step})" if checkpoint else ""
        print(f"training {args.preset if checkpoint is None else 'model'} on {info.device} x{info.world_size}{where}; "
              f"{len(train_loader.dataset)} training / {len(val_loader.dataset) * info.world_size} validation images, "
              f"{steps_per_epoch} steps per epoch, output {output}")

    result = TrainResult(model=model, global_step=global_step)
    amp_context = lambda: autocast(info.device, args.amp)  # noqa: E731 - a fresh context per use

    def save(name: str, epoch_now: int, step_now: int) -> None:
        rngs = [rng_state()]
        if info.enabled:
            rngs = [None] * info.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if not info.is_main:
            return
        state = {
            "model": model.state_dict(), "model_config": model.config.to_dict(), "data_config": data_config,
            "args": vars(args), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch_now, "step_in_epoch": step_now,
            "global_step": result.global_step, "best_miou": best_miou, "rng": rngs,
        }
        save_checkpoint(state, output / name)

    def evaluate_and_log(epoch_now: int) -> float:
        matrix = confusion_matrices(model, val_loader, info.device, amp=args.amp,
                                    channels_last=args.channels_last, progress=info.is_main)["argmax"]
        if info.enabled:
            matrix.all_reduce()
        result.metrics = matrix
        miou = float(matrix.mean_iou())
        if info.is_main:
            print(matrix.table(LABELS))
            print(f"epoch {epoch_now}: mean IoU {miou:.4f}, pixel accuracy {float(matrix.pixel_accuracy()):.4f}")
            log.evaluation(result.global_step, epoch_now, matrix)
        return miou

    with StopSignal() as stop:
        model.train()
        while epoch < args.epochs:
            epoch_seed = args.seed * 7919 + epoch * 104729 + info.rank
            if step_in_epoch == 0:  # each epoch's random streams depend on (seed, epoch, rank) only
                seed_everything(epoch_seed)
            # Worker seeds come from the loader's own generator, so starting an iterator leaves the
            # global stream (augmentation with --workers 0) as a mid-epoch checkpoint saved it.
            train_loader.generator.manual_seed(epoch_seed)
            train_loader.sampler.set_epoch(epoch, start=step_in_epoch * args.accum_steps * args.batch_size)
            num_batches = len(train_loader)
            bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       unit="step", dynamic_ncols=True, disable=not info.is_main,
                       mininterval=0.5 if sys.stderr.isatty() else 30.0)
            batches = iter(train_loader)
            for batch_index in range(num_batches):
                group_start = batch_index - batch_index % args.accum_steps
                group_size = min(args.accum_steps, num_batches - group_start)
                last_in_group = batch_index == group_start + group_size - 1
                images, labels, boundary = _to_device(next(batches), info.device, args.channels_last)
                accumulate = info.enabled and not last_in_group  # DDP all-reduces only on a group's last batch
                with forward_model.no_sync() if accumulate else contextlib.nullcontext():
                    with amp_context():
                        loss, parts = criterion(forward_model(images), labels, boundary)
                    if not distributed.all_true(bool(torch.isfinite(loss)), info):
                        raise NonFiniteLossError(_non_finite_message(loss, parts, epoch, result.global_step, output))
                    scaler.scale(loss / group_size).backward()
                if batch_index == group_start:
                    group_loss = 0.0
                group_loss += float(loss.detach()) / group_size
                if not last_in_group:
                    continue
                if args.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                result.global_step += 1
                step_in_epoch += 1
                result.losses.append(group_loss)
                bar.update(1)
                if info.is_main:
                    lr = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{group_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    log.step(result.global_step, epoch + 1, lr, group_loss, parts)
                stopping = distributed.any_true(stop.received is not None, info)
                if stopping or (args.checkpoint_every and result.global_step % args.checkpoint_every == 0):
                    save(LAST_NAME, epoch, step_in_epoch)
                if stopping:
                    bar.close()
                    if info.is_main:
                        print(f"stopped by signal {stop.received}; checkpoint {output / LAST_NAME} "
                              f"(step {result.global_step}); continue with --resume auto")
                    result.exit_code = 128 + (stop.received or signal.SIGTERM)
                    return result
            bar.close()
            epoch, step_in_epoch = epoch + 1, 0
            if args.eval_every and (epoch % args.eval_every == 0 or epoch == args.epochs):
                miou = evaluate_and_log(epoch)
                if miou > best_miou:
                    best_miou = miou
                    save(BEST_NAME, epoch, 0)
            save(LAST_NAME, epoch, 0)

    if result.metrics is None:
        evaluate_and_log(epoch)
    if info.is_main:
        print(f"final mean IoU {float(result.metrics.mean_iou()):.4f} after {result.global_step} steps; "
              f"checkpoints in {output}")
        log.close()
    return result


def _to_device(batch: dict, device: torch.device, channels_last: bool):
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["labels"].to(device, non_blocking=True), batch["boundary"].to(device, non_blocking=True)


def _non_finite_message(loss, parts, epoch, step, output: Path) -> str:
    details = ", ".join(f"{name}={float(value):.4g}" for name, value in parts.items())
    last = output / LAST_NAME
    kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
    return (f"non-finite loss {float(loss.detach())} at epoch {epoch + 1}, after step {step} ({details}); stopping, "
            f"{kept} (not overwritten). Try a lower --lr, --clip-grad, or --amp none.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        result = train(args)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.exit_code == 0:
        print(f"wall time {time.perf_counter() - started:.1f} s")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
