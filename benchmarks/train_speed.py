"""Training speed on one device: ms/step, images/s, peak memory and MFU of `unet.train`'s step.

    python -m benchmarks.train_speed                                  # the GPU table (needs CUDA)
    python -m benchmarks.train_speed --cases paper512,smp-r50-512 --json results.jsonl
    python -m benchmarks.train_speed --cases paper512 --profile runs/profile   # + top kernels, trace
    python -m benchmarks.train_speed --data-loading --workers 8,16 --image-size 256
    python -m benchmarks.train_speed --tiny --device cpu              # every case shrunk, on the CPU
    python -m benchmarks.train_speed --summary results.jsonl          # the table of earlier runs

Run it from the repository root (``-m``: the checkout's ``unet`` and ``localattn`` are imported).

**The step** is the training step of ``python -m unet.train``: ``Trainer.backward`` (autocast
forward, `SegmentationLoss`, backward) then ``Trainer.optimizer_step`` (gradient clipping at 1.0,
fused AdamW, schedule), on one random batch already on the device, with the flags a `Case` names
(default: bf16 autocast, channels-last, batch 8). ``ms/step`` is the median of ``--steps`` timed
steps after ``--warmup`` untimed ones (CUDA events on a GPU); ``images/s`` is batch / step time.
``peak GiB`` is ``torch.cuda.max_memory_allocated`` over the timed steps (GPU only).

**FLOPs** are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one eager forward and
backward of the same model and batch: convolutions and matrix products (elementwise work, norms
and the optimizer count nothing). Gradient checkpointing is switched off while counting, so a
recomputed forward does not count: MFU is model FLOPs utilisation. Two operators get formulas here
that torch lacks: the local attention op (``EXTRA_FLOP_FORMULAS``) and the CPU flash attention.

**MFU** = FLOPs per step / step time / peak, against two peaks: the device's dense bf16 datasheet
figure (``DATASHEET_BF16_FLOPS``, by device name; H100 SXM and H200: 989 TFLOP/s) and the rate of
a large bf16 matrix product measured in the same process (``matmul peak``; on the CPU, float32).

**The baseline** ``smp-r50-*`` is ``segmentation_models_pytorch.Unet`` with a ResNet-50 encoder
(random weights, BatchNorm, cuDNN convolutions), 25 output channels split into our 24 label logits
and the boundary logit, trained by the same step and loss. It needs ``pip install -e ".[bench]"``;
without it the case is reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import localattn
from benchmarks.bench_localattn_cuda import load_results  # skips a line cut off by a killed run
from unet import distributed, train
from unet.cli import autocast, positive_int
from unet.labels import NUM_LABELS
from unet.losses import SegmentationLoss
from unet.model import PRESETS, SegmentationOutput

GIB = 2**30
SMP_MODEL = "smp-unet-r50"

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
DATASHEET_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # SXM, and GH200
    ("A100", 312e12),
)


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One row of the table: a model, its input and the training flags of the step."""

    name: str
    model: str  # a preset of unet.model, or SMP_MODEL
    image_size: int
    batch_size: int = 8
    local_attention: str = "none"  # decoder levels, "0,1,2", or "all"; our presets only
    grad_checkpointing: bool = False
    compile: bool = False
    amp: str = "bf16"
    channels_last: bool = True

    def levels(self) -> tuple[int, ...]:
        if self.local_attention == "all":
            return tuple(range(PRESETS[self.model].depth))
        return train.level_list(self.local_attention)


def _cases(*cases: Case) -> dict[str, Case]:
    return {case.name: case for case in cases}


CASES = _cases(
    Case("paper512", "paper", 512),
    Case("paper512-la012", "paper", 512, local_attention="0,1,2"),
    Case("paper512-la-all", "paper", 512, local_attention="all"),
    Case("paper512-gc", "paper", 512, grad_checkpointing=True),
    Case("paper512-compile", "paper", 512, compile=True),
    Case("paper512-la012-compile", "paper", 512, local_attention="0,1,2", compile=True),
    Case("small256", "small", 256),
    Case("small256-la-all", "small", 256, local_attention="all"),
    Case("smp-r50-512", SMP_MODEL, 512),
    Case("smp-r50-256", SMP_MODEL, 256),
)
# The default table; the compiled cases take minutes to compile and are asked for by name.
DEFAULT_CASES = ("paper512", "paper512-la012", "paper512-la-all", "paper512-gc", "small256", "smp-r50-512",
                 "smp-r50-256")


def shrink(case: Case) -> Case:
    """The case at CPU scale: our presets become `tiny` at 64 px, batch 2 (local attention levels kept)."""
    model = case.model if case.model == SMP_MODEL else "tiny"
    levels = case.local_attention
    if levels not in ("none", "all"):
        levels = ",".join(str(level) for level in case.levels() if level < PRESETS["tiny"].depth)
    return dataclasses.replace(case, model=model, image_size=64, batch_size=2, local_attention=levels or "none")


class BaselineUnavailable(RuntimeError):
    """The smp baseline cannot run here (segmentation_models_pytorch missing or broken)."""


class SmpUnet(nn.Module):
    """``segmentation_models_pytorch.Unet`` (ResNet-50, random weights) with our two outputs.

    Its ``NUM_LABELS + 1`` output channels are the label logits and the boundary logit.
    """

    def __init__(self) -> None:
        super().__init__()
        try:  # an optional benchmark dependency: imported only when the baseline is asked for
            import segmentation_models_pytorch as smp
        except Exception as error:  # ImportError, or a version clash inside its own imports
            raise BaselineUnavailable(
                f"segmentation_models_pytorch cannot be imported ({type(error).__name__}: {error}); "
                "install it with pip install -e '.[bench]' (offline: benchmarks/download_wheels.sh)"
            ) from error
        self.net = smp.Unet("resnet50", encoder_weights=None, classes=NUM_LABELS + 1)

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        out = self.net(x)
        return SegmentationOutput(out[:, :NUM_LABELS], out[:, NUM_LABELS:])


def training_flags(case: Case, device: torch.device) -> list[str]:
    """The ``python -m unet.train`` flags of the case's step."""
    flags = ["--image-size", str(case.image_size), "--batch-size", str(case.batch_size), "--amp", case.amp,
             "--device", str(device), "--epochs", "1", "--warmup-steps", "0", "--output", "runs/train_speed"]
    if case.model in PRESETS:
        levels = ",".join(map(str, case.levels())) or "none"
        flags += ["--preset", case.model, "--local-attention-levels", levels]
    switches = {"--channels-last": case.channels_last, "--grad-checkpointing": case.grad_checkpointing,
                "--compile": case.compile}
    return flags + [flag for flag, on in switches.items() if on]


def build_trainer(case: Case, device: torch.device) -> train.Trainer:
    """A `unet.train.Trainer` for the case, as ``python -m unet.train`` builds it (one process)."""
    args = train.parse_args(training_flags(case, device))
    if case.model == SMP_MODEL:
        if case.grad_checkpointing or case.local_attention != "none":
            raise ValueError(f"{case.name}: the smp baseline has no local attention or gradient checkpointing")
        torch.manual_seed(args.seed)
        model = SmpUnet().to(device)
        if case.channels_last:
            model.to(memory_format=torch.channels_last)
    else:
        model = train.build_run_model(args, None, device)
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    return train.Trainer(model, args, info, data_config={}, steps_per_epoch=10_000)


def random_batch(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch as the data loader gives it, already on the device (random, not zeros)."""
    generator = torch.Generator().manual_seed(0)
    size, batch = case.image_size, case.batch_size
    images = torch.rand(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, NUM_LABELS, (batch, size, size), generator=generator)
    boundary = (torch.rand(batch, 1, size, size, generator=generator) < 0.1).float()
    if case.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return {"image": images.to(device), "labels": labels.to(device), "boundary": boundary.to(device)}


# ----------------------------------------------------------------------------- FLOPs


def _local_attention_flop(q_shape, k_shape, v_shape, rpb_shape, block_size, scale, symmetric, **kwargs) -> int:
    """Forward: two matrix products per query over the keys it sees, 9b^2 ((2b+1)^2 if symmetric)."""
    batch, height, width, heads, dim = q_shape
    keys = (2 * block_size + 1) ** 2 if symmetric else 9 * block_size**2
    return 2 * 2 * batch * height * width * heads * keys * dim


def _local_attention_backward_flop(grad_out_shape, q_shape, k_shape, v_shape, rpb_shape, out_shape_, lse_shape,
                                   block_size, scale, symmetric, **kwargs) -> int:
    """Like torch's flash attention backward: the scores recomputed, then four products (2.5x forward)."""
    forward = _local_attention_flop(q_shape, k_shape, v_shape, rpb_shape, block_size, scale, symmetric)
    return forward * 5 // 2


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict:
    """Formulas for operators FlopCounterMode does not know (passed per counter, not registered globally)."""
    aten = torch.ops.aten
    formulas = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flop,
    }
    try:  # registered by localattn's compiled extension, when it imported
        formulas[torch.ops.localattn.local_attention2d_forward] = _local_attention_flop
        formulas[torch.ops.localattn.local_attention2d_backward] = _local_attention_backward_flop
    except AttributeError:
        pass
    return formulas


EXTRA_FLOP_FORMULAS = _extra_flop_formulas()


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


def count_step_flops(trainer: train.Trainer, batch: dict) -> tuple[int, int]:
    """(forward, backward) FLOPs of one eager step of the trainer's model, recomputation excluded."""
    model = trainer.model
    checkpointing = getattr(model, "grad_checkpointing", False)
    if checkpointing:
        model.set_grad_checkpointing(False)
    criterion = SegmentationLoss(check_labels=False).to(trainer.info.device)
    try:
        with flop_counter() as forward:
            with autocast(trainer.info.device, trainer.args.amp):
                loss, _ = criterion(model(batch["image"]), batch["labels"], batch["boundary"])
        with flop_counter() as backward:
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.set_grad_checkpointing(True)
    return forward.get_total_flops(), backward.get_total_flops()


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls (CUDA events on a GPU, the host clock otherwise)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return times


def datasheet_peak(device: torch.device) -> float | None:
    """The dense bf16 datasheet peak (FLOP/s) of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in DATASHEET_BF16_FLOPS if key in name), None)


def matmul_peak(device: torch.device, size: int | None = None, repeats: int = 10) -> dict:
    """FLOP/s of a large matrix product on random data: bf16 8192^3 on a GPU, float32 1024^3 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        a @ b
    synchronize(device)
    median_ms = statistics.median(time_ms(lambda: a @ b, device, repeats))
    return {"matmul_size": size, "matmul_dtype": str(dtype).removeprefix("torch."),
            "flops_per_s": 2 * size**3 / (median_ms / 1e3)}


def device_description(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}


def measure_step(step: Callable[[], object], count_flops: Callable[[], tuple[int, int]], batch_size: int,
                 device: torch.device, steps: int, warmup: int, peak_measured: float | None) -> dict:
    """Time `step` (after `warmup` untimed calls) and count its FLOPs once: the table's numbers."""
    started = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - started  # includes any compilation
    for _ in range(warmup - 1):
        step()
    forward_flops, backward_flops = count_flops()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_ms(step, device, steps)
    ms = statistics.median(times)
    flops = forward_flops + backward_flops
    achieved = flops / (ms / 1e3)
    peak_sheet = datasheet_peak(device)
    return {
        "steps": steps, "warmup": warmup, "first_step_s": round(first_step_s, 3),
        "ms_per_step": ms, "ms_per_step_min": min(times), "ms_per_step_max": max(times),
        "images_per_s": batch_size / (ms / 1e3),
        "forward_flops": forward_flops, "backward_flops": backward_flops, "flops_per_step": flops,
        "forward_gflop_per_image": forward_flops / batch_size / 1e9,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops_datasheet": peak_sheet / 1e12 if peak_sheet else None,
        "peak_tflops_measured": peak_measured / 1e12 if peak_measured else None,
        "mfu_datasheet": achieved / peak_sheet if peak_sheet else None,
        "mfu_measured": achieved / peak_measured if peak_measured else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
    }


def case_fields(case: Case, trainer: train.Trainer | None, device: torch.device) -> dict:
    fields = {"case": case.name, **dataclasses.asdict(case), **device_description(device)}
    fields["localattn_kernel"] = localattn.kernel_available(device) if case.local_attention != "none" else None
    if trainer is not None:
        fields["parameters"] = sum(p.numel() for p in trainer.model.parameters())
    return fields


def training_step(trainer: train.Trainer, batch: dict) -> Callable[[], float]:
    def step() -> float:
        loss, _ = trainer.backward(batch, group_size=1, sync=True)
        trainer.optimizer_step(loss)
        return loss

    return step


def run_case(case: Case, device: torch.device, steps: int = 10, warmup: int = 3,
             peak_measured: float | None = None) -> dict:
    """The case's row: its description and `measure_step`'s numbers, or the error that stopped it."""
    trainer = None
    try:
        trainer = build_trainer(case, device)
        batch = random_batch(case, device)
        numbers = measure_step(training_step(trainer, batch), lambda: count_step_flops(trainer, batch),
                               case.batch_size, device, steps, max(1, warmup), peak_measured)
        return {**case_fields(case, trainer, device), **numbers}
    except BaselineUnavailable as error:
        return {**case_fields(case, trainer, device), "skipped": str(error)}
    except Exception as error:  # one failing case (out of memory, say) must not hide the others
        traceback.print_exc()
        return {**case_fields(case, trainer, device), "error": f"{type(error).__name__}: {error}"}
    finally:
        trainer = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- profiling


def profile_steps(step: Callable[[], object], device: torch.device, steps: int,
                  trace_path: Path | None = None) -> dict:
    """Profile `steps` calls of `step` (already warm); rows of the top kernels (CPU: operators).

    On a GPU the rows are CUDA kernels by self device time; on the CPU, operators by self CPU time.
    Each row: name, calls per step, ms per step, share of the total. With `trace_path`, the chrome
    trace is written there, gzipped (open it in chrome://tracing or Perfetto).
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_gpu = device.type == "cuda"
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in profiler.events():
        is_kernel = event.device_type != torch.autograd.DeviceType.CPU
        if is_kernel != on_gpu:
            continue
        microseconds = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        totals[event.name] += microseconds
        calls[event.name] += 1
    total_us = sum(totals.values())
    rows = [{"name": name, "calls_per_step": calls[name] / steps, "ms_per_step": us / 1e3 / steps,
             "share": us / total_us if total_us else 0.0}
            for name, us in sorted(totals.items(), key=lambda item: -item[1])]
    if trace_path is not None:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        plain = trace_path.with_suffix("")  # name.json.gz -> name.json
        profiler.export_chrome_trace(str(plain))
        with plain.open("rb") as source, gzip.open(trace_path, "wb") as target:
            shutil.copyfileobj(source, target)
        plain.unlink()
    return {"kind": "kernels" if on_gpu else "operators", "steps": steps, "rows": rows,
            "busy_ms_per_step": total_us / 1e3 / steps, "wall_ms_per_step": wall_ms}


def profile_case(case: Case, device: torch.device, steps: int, trace_dir: Path | None, warmup: int = 2) -> dict:
    trainer = build_trainer(case, device)
    batch = random_batch(case, device)
    step = training_step(trainer, batch)
    for _ in range(warmup):
        step()
    trace = trace_dir / f"{case.name}.trace.json.gz" if trace_dir is not None else None
    return {"case": case.name, **profile_steps(step, device, steps, trace), "trace": str(trace) if trace else None}


def format_profile(profile: dict, top: int) -> str:
    on_gpu = profile["kind"] == "kernels"
    what = "CUDA kernels by self device time" if on_gpu else "operators by self CPU time"
    lines = [f"{profile['case']}: top {what}, {profile['steps']} steps; "
             f"{profile['busy_ms_per_step']:.2f} ms/step busy of {profile['wall_ms_per_step']:.2f} ms/step wall"]
    lines.append(f"{'share':>6}  {'ms/step':>8}  {'calls':>6}  name")
    for row in profile["rows"][:top]:
        name = row["name"] if len(row["name"]) <= 110 else row["name"][:107] + "..."
        lines.append(f"{row['share']:6.1%}  {row['ms_per_step']:8.3f}  {row['calls_per_step']:6.1f}  {name}")
    rest = profile["rows"][top:]
    if rest:
        share, ms = sum(r["share"] for r in rest), sum(r["ms_per_step"] for r in rest)
        lines.append(f"{share:6.1%}  {ms:8.3f}  {'':>6}  ({len(rest)} more)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data loading


def data_loading_speed(image_size: int, batch_size: int, workers: int, batches: int, device: torch.device) -> dict:
    """Images/s of `unet.train`'s training loader alone (built-in data, augmented), after its first batch."""
    args = train.parse_args(["--image-size", str(image_size), "--batch-size", str(batch_size),
                             "--workers", str(workers), "--num-images", str((batches + 1) * batch_size)])
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    loader, _ = train.build_loaders(args, train.data_config_from_args(args), info)
    loader.sampler.set_epoch(0)
    started, images = None, 0
    for batch in loader:
        if started is None:  # the first batch pays for starting the workers
            started = time.perf_counter()
            continue
        images += batch["image"].shape[0]
    seconds = time.perf_counter() - started
    return {"data_loading": True, "image_size": image_size, "batch_size": batch_size, "workers": workers,
            "images": images, "seconds": seconds, "images_per_s": images / seconds, "cpu_cores": os.cpu_count()}


# ----------------------------------------------------------------------------- the table


def _number(value, spec: str, width: int = 0) -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def format_table(results: list[dict]) -> str:
    """The results as one table (cases) plus the comparisons the issue asks for."""
    rows = [r for r in results if "case" in r]
    lines = []
    for key in sorted({(r["device"], r["torch"], r.get("cuda")) for r in rows}, key=str):
        lines.append(f"device {key[0]}, torch {key[1]}, CUDA {key[2]}")
    peaks = {(r.get("peak_tflops_datasheet"), r.get("peak_tflops_measured")) for r in rows if "ms_per_step" in r}
    for sheet, measured in sorted(peaks, key=str):
        lines.append(f"peak: datasheet {_number(sheet, '.0f')} TFLOP/s (dense bf16), "
                     f"measured matmul {_number(measured, '.4g')} TFLOP/s")
    header = (f"{'case':<24} {'model':<13} {'batch':>5} {'size':>5} {'amp':>5} {'LA':>6} {'ms/step':>8} "
              f"{'img/s':>7} {'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6} {'MFU(mm)':>7} {'peak GiB':>8}")
    lines += [header, "-" * len(header)]
    for r in rows:
        start = (f"{r['case']:<24} {r['model']:<13} {r['batch_size']:>5} {r['image_size']:>5} {r['amp']:>5} "
                 f"{r['local_attention']:>6}")
        if "ms_per_step" not in r:
            lines.append(f"{start} {r.get('skipped') or r.get('error')}")
            continue
        lines.append(
            f"{start} {r['ms_per_step']:8.2f} {r['images_per_s']:7.1f} {r['forward_gflop_per_image']:9.4g} "
            f"{r['achieved_tflops']:8.4g} {_number(r['mfu_datasheet'], '.1%', 6)} "
            f"{_number(r['mfu_measured'], '.1%', 7)} {_number(r['peak_memory_gib'], '.2f', 8)}"
        )
    lines.append("GFLOP/img: forward only (backward counted too, in MFU); LA: local attention levels")
    lines += [f"{r['case']}: local attention ran the plain-PyTorch reference (no compiled kernel on this device)"
              for r in rows if r.get("localattn_kernel") is False]
    lines += comparisons(rows)
    for r in results:
        if r.get("data_loading"):
            lines.append(f"data loading {r['image_size']}px batch {r['batch_size']}, {r['workers']} workers: "
                         f"{r['images_per_s']:.1f} images/s ({r['cpu_cores']} cores)")
    return "\n".join(lines)


def comparisons(rows: list[dict]) -> list[str]:
    """Gradient checkpointing's cost, compilation's gain and the speed against the smp baseline."""
    timed = {r["case"]: r for r in rows if "ms_per_step" in r}
    lines = []
    if "paper512" in timed and "paper512-gc" in timed:
        plain, checkpointed = timed["paper512"], timed["paper512-gc"]
        memory = ""
        if plain["peak_memory_gib"] is not None:
            memory = f", peak memory {plain['peak_memory_gib']:.2f} -> {checkpointed['peak_memory_gib']:.2f} GiB"
        ratio = checkpointed["ms_per_step"] / plain["ms_per_step"]
        lines.append(f"grad checkpointing: {ratio - 1:+.1%} step time (target: at most +35%){memory}")
    pairs = [("paper512", "smp-r50-512"), ("small256", "smp-r50-256"), ("paper512-compile", "paper512"),
             ("paper512-la012-compile", "paper512-la012")]
    for ours, other in pairs:
        if ours in timed and other in timed:
            ratio = timed[ours]["images_per_s"] / timed[other]["images_per_s"]
            lines.append(f"{ours} vs {other}: {ratio:.2f}x the images/s")
    for r in timed.values():
        if r["compile"]:
            lines.append(f"{r['case']}: first step {r['first_step_s']:.0f} s (compilation included)")
    return lines


def append_result(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(result) + "\n")


# ----------------------------------------------------------------------------- command line


def case_list(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    return names


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", type=case_list, default=list(DEFAULT_CASES), help="comma list of case names")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--tiny", action="store_true", help="shrink every case to CPU scale (tiny preset, 64 px)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=positive_int, default=3, help="untimed steps first")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per result to this file")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also profile each case and write <dir>/<case>.trace.json.gz")
    parser.add_argument("--profile-steps", type=positive_int, default=3)
    parser.add_argument("--profile-only", action="store_true", help="with --profile: profile, do not time")
    parser.add_argument("--top", type=positive_int, default=25, help="rows of the profile table")
    parser.add_argument("--data-loading", action="store_true", help="measure the training data loader instead")
    parser.add_argument("--workers", type=int_list, default=[8, 16], help="with --data-loading")
    parser.add_argument("--image-size", type=positive_int, default=256, help="with --data-loading")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="with --data-loading")
    parser.add_argument("--batches", type=positive_int, default=40, help="with --data-loading")
    parser.add_argument("--summary", type=Path, default=None, help="print the table of a --json file and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.list:
        for case in CASES.values():
            print(case)
        return 0
    if args.summary is not None:
        print(format_table(load_results(args.summary)))
        return 0
    try:
        device = distributed.resolve_device(args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if device.type == "cpu" and not (args.tiny or args.data_loading):
        print("note: the cases at their GPU sizes take minutes per step on a CPU; --tiny shrinks them",
              file=sys.stderr)
    train.configure_backends(device)
    results = []
    if args.data_loading:
        for workers in args.workers:
            result = data_loading_speed(args.image_size, args.batch_size, workers, args.batches, device)
            append_result(args.json, result)
            results.append(result)
    else:
        peak = None if args.profile_only else matmul_peak(device)["flops_per_s"]
        for name in args.cases:
            case = shrink(CASES[name]) if args.tiny else CASES[name]
            print(f"{case.name}: {case}", flush=True)
            if not args.profile_only:
                result = run_case(case, device, args.steps, args.warmup, peak)
                append_result(args.json, result)
                results.append(result)
                if "ms_per_step" not in result:
                    continue
            if args.profile is not None:
                profile = profile_case(case, device, args.profile_steps, args.profile)
                print(format_profile(profile, args.top), flush=True)
    if results:
        print(format_table(results))
    failed = [r["case"] for r in results if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
