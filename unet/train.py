"""Train the attention UNet.

    python -m unet.train                                  # tiny preset, built-in data, CPU, a few minutes
    python -m unet.train --preset small --data /data/DeepFashion-MultiModal --amp bf16
    torchrun --nproc_per_node 8 -m unet.train --preset paper --batch-size 4 --resume auto

One plain loop (`train_one_epoch`, then an evaluation) over a `Trainer`, which owns the training
state: fused AdamW (no weight decay on norms, biases and other 1-d parameters), linear warmup then
cosine decay per optimizer step, gradient accumulation and clipping, optional AMP, channels-last,
torch.compile (of the model and of the loss) and gradient checkpointing. A training step reads one
number back from the device, the loss, after its backward pass is queued. ``--norm`` picks the
normalization layers (GroupNorm, BatchNorm, or the paper's sub-batch BatchNorm, whose statistics
`unet.normalization.end_step` exchanges once per optimizer step). Each epoch prints one
summary line (loss, validation mean IoU and pixel accuracy, time); the per-label IoU table follows
the last evaluation, or every one with ``--verbose``. Logs go to ``<output>/train.csv``,
``<output>/eval.csv`` and TensorBoard (``<output>/tb``; `unet.run_log`). ``<output>/last.pt`` is
written atomically every ``--checkpoint-every`` optimizer steps, at the end of each epoch and on
SIGINT/SIGTERM; ``<output>/best.pt`` holds the best mean IoU so far (format:
`unet.checkpoint.Checkpoint`). ``--resume auto`` continues from ``last.pt`` exactly where the
interrupted run stood (same batches, same RNG states, same losses). A finished run tunes the
post-processing settings of ``best.pt`` on the validation split (``--tune-trials``, `unet.tuning`)
and writes them to ``<output>/postprocess.json``, where ``unet.predict`` and ``unet.evaluate`` find
them.

Under torchrun every process trains on its shard (DistributedDataParallel, also with one process),
the confusion matrices are summed across processes, and only rank 0 prints, logs and writes
checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from unet import distributed, postprocess_config, tuning
from unet.blocks import NORMS
from unet.checkpoint import (
    BEST_NAME, LAST_NAME, Checkpoint, load_model, load_training_checkpoint, resolve_resume, rng_state,
    save_checkpoint, set_rng_state,
)
from unet.cli import (
    AMP_DTYPES, autocast, non_negative_float, non_negative_int, number_type, positive_float, positive_int,
)
from unet.data import build_datasets
from unet.inference import confusion_matrices
from unet.losses import SegmentationLoss
from unet.metrics import ConfusionMatrix
from unet.model import PRESETS, AttentionUNet, UNetConfig, build_model
from unet.normalization import discard_step, end_step
from unet.run_log import RunLog


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without writing the broken state."""


# ----------------------------------------------------------------------------- flags


def level_list(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1); ``""`` or ``"none"`` -> () (no local attention)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of decoder levels such as 0,1, got {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
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
    model.add_argument("--norm", choices=NORMS, default=None,
                       help="normalization layers: group (GroupNorm), batch (BatchNorm) or subbatch (BatchNorm "
                            "over each sub-batch blended with the previous step's, paper section 6.4; "
                            "default: the preset's, group)")
    model.add_argument("--subbatch-extrapolate", action="store_true", default=None,
                       help="with --norm subbatch: extrapolate the previous steps' statistics to this step")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    model.add_argument("--channels-last", action="store_true")
    model.add_argument("--compile", action="store_true", help="torch.compile the model and the loss")

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
    run.add_argument("--verbose", action="store_true",
                     help="print the per-label IoU table after every evaluation, not only after the last")
    run.add_argument("--tune-trials", type=non_negative_int, default=100,
                     help="at the end, tune the post-processing settings of best.pt with this many trials on "
                          "the validation split and write <output>/postprocess.json; 0: do not")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.val_fraction >= 1:
        parser.error(f"argument --val-fraction: expected a fraction in (0, 1), got {args.val_fraction}")
    if args.subbatch_extrapolate and args.norm != "subbatch":
        parser.error("argument --subbatch-extrapolate: needs --norm subbatch")
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


def configure_backends(device: torch.device) -> None:
    """Let cuDNN time its convolution algorithms once per input shape (training shapes repeat)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def default_threads(workers: int) -> int:
    """The cores of this machine left to one training process once its data workers have theirs.

    Oversubscribed intra-op threads mostly wait for each other: on 2 shared cores one thread
    trained 5x faster than two.
    """
    return max(1, distributed.available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - workers)


# ----------------------------------------------------------------------------- the trainer


def data_config_from_args(args: argparse.Namespace) -> dict:
    """The keyword arguments of `build_datasets` for a fresh run."""
    return {
        "data": args.data, "image_size": args.image_size, "seed": args.seed,
        "val_fraction": args.val_fraction, "augment": args.augment, "num_synthetic": args.num_images,
    }


# UNetConfig fields a flag sets; a flag left out (None) keeps the preset's value.
MODEL_FLAGS = {"local_attention_levels": "--local-attention-levels", "norm": "--norm",
               "subbatch_extrapolate": "--subbatch-extrapolate"}


def model_flags(args: argparse.Namespace) -> dict:
    """The UNetConfig fields given on the command line."""
    return {field: getattr(args, field) for field in MODEL_FLAGS if getattr(args, field) is not None}


def check_resume_flags(args: argparse.Namespace, config: UNetConfig) -> None:
    """A resumed run keeps the checkpoint's network: a model flag asking for another one is an error."""
    conflicts = [f"{MODEL_FLAGS[field]} {value!r} (the checkpoint has {getattr(config, field)!r})"
                 for field, value in model_flags(args).items() if value != getattr(config, field)]
    if conflicts:
        raise ValueError(f"--resume continues the checkpoint's model, which the flags contradict: "
                         f"{', '.join(conflicts)}; drop those flags, or start a new run in another --output")


def build_run_model(args: argparse.Namespace, model_config: dict | None, device: torch.device) -> AttentionUNet:
    """The network as a checkpoint's config describes it, or a fresh one from the flags."""
    if model_config is not None:
        config = UNetConfig.from_dict(model_config)
        check_resume_flags(args, config)
        model = AttentionUNet(config)
    else:
        seed_everything(args.seed)  # the same initial weights on every process
        model = build_model(args.preset, image_size=args.image_size, **model_flags(args))
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_loaders(args: argparse.Namespace, data_config: dict, info: distributed.DistInfo):
    """(train, val) loaders: this process's shard of each epoch, and its share of the validation images."""
    train_ds, val_ds = build_datasets(**data_config)
    sampler = distributed.EpochSampler(
        len(train_ds), shuffle=True, seed=args.seed, rank=info.rank, world_size=info.world_size
    )
    pin_memory = info.device.type == "cuda"  # page-locked batches copy to the GPU without blocking
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        worker_init_fn=_init_worker, generator=torch.Generator(), pin_memory=pin_memory,
    )
    # Evaluation counts every image once: a plain shard per process, no padding.
    val_shard = torch.utils.data.Subset(val_ds, range(info.rank, len(val_ds), info.world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=args.batch_size, num_workers=args.workers,
                                             pin_memory=pin_memory)
    return train_loader, val_loader


class Trainer:
    """One process's training state, and the steps that change it.

    Owns the model (and the DDP or compiled wrapper its forward pass goes through), the loss, the
    AdamW optimizer, the warmup-cosine schedule, the gradient scaler, the progress counters and
    the best validation mean IoU. `state_dict` gives all of it as a checkpoint
    (`unet.checkpoint.Checkpoint`) and `load_state_dict` takes it back; the model and the data must
    have been built from that checkpoint's ``model_config`` and ``data_config``.
    """

    def __init__(self, model: AttentionUNet, args: argparse.Namespace, info: distributed.DistInfo,
                 data_config: dict, steps_per_epoch: int) -> None:
        self.model, self.args, self.info, self.data_config = model, args, info, data_config
        self.output = Path(args.output)
        self.steps_per_epoch = steps_per_epoch
        # unet.data checks every label id at load: the loss skips its range check, a device sync.
        self.criterion = SegmentationLoss(check_labels=False).to(info.device)
        # Fused: one kernel launch per step for all parameters (CUDA and CPU).
        self.optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, fused=True)
        warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps_per_epoch)
        schedule = warmup_cosine(warmup, args.epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=args.amp == "fp16")
        # Sub-batch normalization must not have its buffers broadcast by rank 0 before every forward
        # (a synchronization inside the forward, and it would overwrite each rank's recorded
        # statistics): end_step leaves them identical on every rank instead.
        self.forward_model = (DistributedDataParallel(model, broadcast_buffers=model.config.norm != "subbatch")
                              if info.enabled else model)
        if args.compile:
            # Static shapes: an epoch's last, smaller batch compiles once more instead of every kernel
            # turning shape-generic. The loss is compiled too, so its float32 casts fuse.
            self.forward_model = torch.compile(self.forward_model, dynamic=False)
            self.criterion = torch.compile(self.criterion, dynamic=False)
        self.epoch = 0  # epochs finished
        self.step_in_epoch = 0  # optimizer steps done in the epoch under way
        self.global_step = 0
        self.best_miou = -1.0
        self.step_losses: list[float] = []  # one per optimizer step of this session (not checkpointed)

    def state_dict(self) -> dict:
        """The whole training state as a checkpoint dict, with the RNG states of every process.

        Under torchrun every process must call it (it gathers the RNG states).
        """
        return Checkpoint(
            model=self.model.state_dict(), model_config=self.model.config.to_dict(), data_config=self.data_config,
            args=vars(self.args), optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            global_step=self.global_step, best_miou=self.best_miou,
            rng=distributed.all_gather_object(rng_state(), self.info),
        ).to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output; mid-epoch, the RNG streams too, exactly where they stood."""
        checkpoint = Checkpoint.from_dict(state)
        self.model.load_state_dict(checkpoint.model)
        discard_step(self.model)  # sub-batch statistics recorded before the load belong to no step of it
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.scaler.load_state_dict(checkpoint.scaler)
        self.epoch, self.step_in_epoch = checkpoint.epoch, checkpoint.step_in_epoch
        self.global_step, self.best_miou = checkpoint.global_step, checkpoint.best_miou
        if self.step_in_epoch:  # at an epoch end, the next epoch reseeds everything anyway
            set_rng_state(checkpoint.rng[min(self.info.rank, len(checkpoint.rng) - 1)])

    def save(self, name: str) -> None:
        """Write the state to ``<output>/<name>`` (on rank 0; every process must call it)."""
        state = self.state_dict()
        if self.info.is_main:
            save_checkpoint(state, self.output / name)

    def backward(self, batch: dict, group_size: int, sync: bool) -> tuple[float, dict]:
        """Forward and backward of one batch of an accumulation group of `group_size` batches.

        Gradients are all-reduced across processes only when `sync` (the group's last batch).
        Returns the batch's loss and its parts; a non-finite loss on any process stops every one
        before the optimizer step.
        """
        images, labels, boundary = _to_device(batch, self.info.device, self.args.channels_last)
        accumulate = self.info.enabled and not sync
        with self.forward_model.no_sync() if accumulate else contextlib.nullcontext():
            with autocast(self.info.device, self.args.amp):
                loss, parts = self.criterion(self.forward_model(images), labels, boundary)
            self.scaler.scale(loss / group_size).backward()
        # Read back only once the backward pass is queued, so the device never waits for the host.
        value = float(loss.detach())
        if not distributed.all_true(math.isfinite(value), self.info):
            raise NonFiniteLossError(self._non_finite_message(value, parts))
        return value, parts

    def optimizer_step(self, loss: float) -> float:
        """Clip, step, schedule; `loss` is the accumulation group's. Returns the learning rate it used."""
        if self.args.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # Closes the step's sub-batch statistics on every rank, also when the scaler skipped the step:
        # they were recorded all the same. Before any checkpoint; a no-op without sub-batch norms.
        end_step(self.model)
        self.global_step += 1
        self.step_in_epoch += 1
        self.step_losses.append(loss)
        return self.optimizer.param_groups[0]["lr"]

    def finish_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _non_finite_message(self, loss: float, parts: dict) -> str:
        details = ", ".join(f"{name}={float(value):.4g}" for name, value in parts.items())
        last = self.output / LAST_NAME
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        return (f"non-finite loss {loss} at epoch {self.epoch + 1}, after step {self.global_step} "
                f"({details}); stopping, {kept} (not overwritten). Try a lower --lr, --clip-grad, or --amp none.")


def _to_device(batch: dict, device: torch.device, channels_last: bool):
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["labels"].to(device, non_blocking=True), batch["boundary"].to(device, non_blocking=True)


def train_one_epoch(trainer: Trainer, loader, log: RunLog | None, stop: StopSignal) -> bool:
    """Train from `trainer.step_in_epoch` to the end of the epoch; True if a stop signal cut it short.

    Each epoch's random streams depend on (seed, epoch, rank) only, and the sampler skips the
    batches already done, so an epoch resumed mid-way sees the batches the interrupted one had left.
    """
    args, info = trainer.args, trainer.info
    epoch_seed = args.seed * 7919 + trainer.epoch * 104729 + info.rank
    if trainer.step_in_epoch == 0:
        seed_everything(epoch_seed)
    # Worker seeds come from the loader's own generator, so starting an iterator leaves the
    # global stream (augmentation with --workers 0) as a mid-epoch checkpoint saved it.
    loader.generator.manual_seed(epoch_seed)
    loader.sampler.set_epoch(trainer.epoch, start=trainer.step_in_epoch * args.accum_steps * args.batch_size)
    num_batches = len(loader)
    group_loss = 0.0
    bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.step_in_epoch, unit="step", leave=False,
               desc=f"epoch {trainer.epoch + 1}/{args.epochs}", dynamic_ncols=True, disable=not info.is_main,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # leave=False: the epoch's line replaces it
    with bar:
        for batch_index, batch in enumerate(loader):
            group_start = batch_index - batch_index % args.accum_steps
            group_size = min(args.accum_steps, num_batches - group_start)
            last_in_group = batch_index == group_start + group_size - 1
            loss, parts = trainer.backward(batch, group_size, sync=last_in_group)
            group_loss += loss / group_size
            if not last_in_group:
                continue
            lr = trainer.optimizer_step(group_loss)
            bar.update(1)
            if info.is_main:
                bar.set_postfix(loss=f"{group_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                log.step(trainer.global_step, trainer.epoch + 1, lr, group_loss, parts)
            group_loss = 0.0
            stopping = distributed.any_true(stop.received is not None, info)
            if stopping or (args.checkpoint_every and trainer.global_step % args.checkpoint_every == 0):
                trainer.save(LAST_NAME)
            if stopping:
                return True
    return False


def evaluate(trainer: Trainer, loader, log: RunLog | None) -> ConfusionMatrix:
    """The argmax confusion matrix on the validation data, summed over all processes, and logged."""
    args, info = trainer.args, trainer.info
    matrix = confusion_matrices(trainer.model, loader, info.device, amp=args.amp,
                                channels_last=args.channels_last, progress=info.is_main)["argmax"]
    matrix.all_reduce()
    if info.is_main:
        log.evaluation(trainer.global_step, trainer.epoch, matrix)
    return matrix


def epoch_summary(epoch: int, epochs: int, losses: list[float], matrix: ConfusionMatrix | None, seconds: float) -> str:
    """The one line printed after each epoch: mean step loss, validation scores (if evaluated), time."""
    parts = [f"loss {sum(losses) / len(losses):.4f}"] if losses else []
    if matrix is not None:
        parts.append(f"val mean IoU {matrix.mean_iou():.4f}, pixel accuracy {matrix.pixel_accuracy():.4f}")
    parts.append(f"{seconds:.0f} s")
    return f"epoch {epoch}/{epochs}: " + ", ".join(parts)


@dataclass
class TrainResult:
    model: torch.nn.Module
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this session
    metrics: ConfusionMatrix | None = None  # the last evaluation
    global_step: int = 0
    exit_code: int = 0


# ----------------------------------------------------------------------------- the run


def train(args: argparse.Namespace) -> TrainResult:
    torch.set_num_threads(args.threads or default_threads(args.workers))
    info = distributed.setup(args.device)
    configure_backends(info.device)
    try:
        return run_training(args, info)
    finally:
        distributed.cleanup(info)


def run_training(args: argparse.Namespace, info: distributed.DistInfo) -> TrainResult:
    """Build (or resume) the run, train epoch by epoch with an evaluation after each, report."""
    output = Path(args.output)
    resume_path = resolve_resume(args.resume, output)
    resumed = load_training_checkpoint(resume_path) if resume_path else None  # on the CPU: RNG states stay there
    data_config = resumed["data_config"] if resumed else data_config_from_args(args)
    model = build_run_model(args, resumed["model_config"] if resumed else None, info.device)
    train_loader, val_loader = build_loaders(args, data_config, info)
    trainer = Trainer(model, args, info, data_config, steps_per_epoch=-(-len(train_loader) // args.accum_steps))
    if resumed:
        trainer.load_state_dict(resumed)

    log = None
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        log = RunLog(output, resume_step=trainer.global_step if resumed else None)
        where = f" from {resume_path} (epoch {trainer.epoch}, step {trainer.global_step})" if resumed else ""
        ddp = f" (DDP, {info.backend})" if info.enabled else ""
        print(f"training {'model' if resumed else args.preset} on {info.device} x{info.world_size}{ddp}{where}; "
              f"{len(train_loader.dataset)} training / {len(val_loader.dataset) * info.world_size} validation "
              f"images, {trainer.steps_per_epoch} steps per epoch, output {output}")

    result = TrainResult(model=model, losses=trainer.step_losses)
    with StopSignal() as stop:
        while trainer.epoch < args.epochs:
            started, steps_before = time.perf_counter(), len(trainer.step_losses)
            if train_one_epoch(trainer, train_loader, log, stop):
                if info.is_main:
                    print(f"stopped by signal {stop.received}; checkpoint {output / LAST_NAME} "
                          f"(step {trainer.global_step}); continue with --resume auto")
                result.global_step = trainer.global_step
                result.exit_code = 128 + (stop.received or signal.SIGTERM)
                return result
            trainer.finish_epoch()
            matrix = None
            if args.eval_every and (trainer.epoch % args.eval_every == 0 or trainer.epoch == args.epochs):
                matrix = result.metrics = evaluate(trainer, val_loader, log)
                if matrix.mean_iou() > trainer.best_miou:
                    trainer.best_miou = matrix.mean_iou()
                    trainer.save(BEST_NAME)
            trainer.save(LAST_NAME)
            if info.is_main:
                if matrix is not None and args.verbose:
                    print(matrix.table())
                print(epoch_summary(trainer.epoch, args.epochs, trainer.step_losses[steps_before:], matrix,
                                    time.perf_counter() - started))

    table_printed = args.verbose and result.metrics is not None
    if result.metrics is None:
        result.metrics = evaluate(trainer, val_loader, log)
    result.global_step = trainer.global_step
    if info.is_main:
        if not table_printed:
            print(result.metrics.table())
        print(f"final mean IoU {result.metrics.mean_iou():.4f} after {trainer.global_step} steps; "
              f"checkpoints in {output}")
        log.close()
        if args.tune_trials:
            # The whole validation set behind this process's shard (a Subset of it).
            tune_postprocessing(args, data_config, val_loader.dataset.dataset, info.device, output)
    return result


def tune_postprocessing(args: argparse.Namespace, data_config: dict, val_ds: torch.utils.data.Dataset,
                        device: torch.device, output: Path) -> None:
    """Tune the post-processing of the run's best checkpoint on half the validation split (the other
    half held out), write the settings beside it and print one line; a split too small is reported."""
    checkpoint = output / BEST_NAME if (output / BEST_NAME).is_file() else output / LAST_NAME
    model, state = load_model(checkpoint, device)
    loader = torch.utils.data.DataLoader(val_ds, batch_size=args.batch_size, num_workers=args.workers)
    try:
        report = tuning.tune(model, loader, device, trials=args.tune_trials, seed=args.seed, holdout=0.5,
                             processes=tuning.default_processes(args.tune_trials), amp=args.amp)
    except ValueError as error:
        print(f"post-processing not tuned: {error}")
        return
    if not report.search.trials:
        return
    tuning.score_parts(report)
    record = report.record(checkpoint=checkpoint.name, global_step=state["global_step"],
                           data=data_config["data"], split="val")
    path = report.best.config.save(postprocess_config.beside(checkpoint), tuning=record)
    held_out = report.matrices["held_out"]
    print(f"post-processing tuned for {checkpoint.name} ({len(report.search.trials)} trials on "
          f"{len(report.parts['tuning'])} validation images): mean IoU on the {len(report.parts['held_out'])} "
          f"others: argmax {held_out['argmax'].mean_iou():.4f}, defaults {held_out['defaults'].mean_iou():.4f}, "
          f"tuned {held_out['tuned'].mean_iou():.4f} (kept: {report.selection.source}); settings in {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        result = train(args)
    except (NonFiniteLossError, FloatingPointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.exit_code == 0:
        print(f"wall time {time.perf_counter() - started:.1f} s")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
