"""One training step (forward, SegmentationLoss, backward) per preset, local attention off and on.

Wall time comes from pytest-benchmark; memory and CPU time go into ``extra_info``:

- ``saved_activation_mib``: bytes of the distinct tensor storages autograd saves for the backward
  (the activations a training step holds at its peak), on any device;
- ``param_mib``: the parameters (their gradients take as much again);
- ``cuda_peak_mib``: ``torch.cuda.max_memory_allocated`` over the step, on CUDA only;
- ``step_process_cpu_s``: CPU seconds this process spent on one more step (all its threads).

On CPU the paper preset runs at 128x128 (512x512 is 16x the work: minutes on two shared cores); the CUDA
cases run every preset at its nominal size. ``local attention on`` enables every decoder level.
"""

from __future__ import annotations

import time

import pytest
import torch

from unet.losses import SegmentationLoss
from unet.model import PRESETS, build_model

MIB = 2**20

# preset -> (batch, CPU image size); CUDA runs use the preset's own image_size.
CASES = {"tiny": (8, 128), "small": (4, 128), "paper": (1, 128)}


def make_step(preset: str, local_attention: bool, device: str):
    batch, cpu_size = CASES[preset]
    overrides = {}
    if local_attention:
        overrides["local_attention_levels"] = tuple(range(PRESETS[preset].depth))
    torch.manual_seed(0)
    model = build_model(preset, **overrides).to(device)
    size = model.config.image_size if device == "cuda" else cpu_size
    images = torch.rand(batch, 3, size, size, device=device)
    labels = torch.randint(0, model.config.num_labels, (batch, size, size), device=device)
    boundary = (torch.rand(batch, 1, size, size, device=device) < 0.1).float()
    loss_fn = SegmentationLoss().to(device)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(images), labels, boundary)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return model, step, f"{batch}x3x{size}x{size}"


def saved_activation_bytes(step) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def run_case(benchmark, preset: str, local_attention: bool, device: str, rounds: int) -> None:
    model, step, shape = make_step(preset, local_attention, device)
    benchmark.extra_info["input"] = shape
    benchmark.extra_info["parameters"] = sum(p.numel() for p in model.parameters())
    benchmark.extra_info["param_mib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / MIB, 1)
    benchmark.extra_info["saved_activation_mib"] = round(saved_activation_bytes(step) / MIB, 1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        benchmark.extra_info["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    loss = benchmark.pedantic(step, rounds=rounds, warmup_rounds=0)
    # On a shared CPU box wall time mostly measures the neighbours; this process's CPU time does not.
    started = time.process_time()
    step()
    benchmark.extra_info["step_process_cpu_s"] = round(time.process_time() - started, 3)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("local_attention", [False, True], ids=["local-attn-off", "local-attn-on"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_training_step_cpu(benchmark, preset, local_attention):
    run_case(benchmark, preset, local_attention, "cpu", rounds=3)


@pytest.mark.slow
@pytest.mark.parametrize("local_attention", [False, True], ids=["local-attn-off", "local-attn-on"])
def test_training_step_cpu_paper(benchmark, local_attention):
    run_case(benchmark, "paper", local_attention, "cpu", rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("local_attention", [False, True], ids=["local-attn-off", "local-attn-on"])
@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_training_step_cuda(benchmark, preset, local_attention):
    run_case(benchmark, preset, local_attention, "cuda", rounds=5)
