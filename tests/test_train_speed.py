"""benchmarks.train_speed on the CPU: the numbers it derives, its FLOP count, the profiler table,
the data-loading measurement and the command line (the GPU sizes run in benchmarks/gpu_train_check.sh)."""

import dataclasses
import gzip
import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import train_speed
from localattn import local_attention2d

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, **changes) -> train_speed.Case:
    """The case at CPU scale, float32 (bf16 autocast is slow on this CPU)."""
    return dataclasses.replace(train_speed.shrink(train_speed.CASES[name]), amp="none", **changes)


def conv_step(batch: int, side: int):
    """A one-convolution 'model' whose FLOPs are known in closed form, and its step and counter."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    optimizer = torch.optim.AdamW(conv.parameters(), fused=True)
    images = torch.rand(batch, 4, side, side)

    def step():
        conv(images).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def count():
        with train_speed.flop_counter() as forward:
            loss = conv(images).square().mean()
        with train_speed.flop_counter() as backward:
            loss.backward()
        conv.zero_grad(set_to_none=True)
        return forward.get_total_flops(), backward.get_total_flops()

    return step, count


def test_measure_step_counts_one_forward_and_backward_and_derives_the_rates():
    batch, side = 2, 16
    step, count = conv_step(batch, side)
    result = train_speed.measure_step(step, count, batch, CPU, steps=3, warmup=2, peak_measured=1e9)
    conv_flops = 2 * batch * 8 * 4 * 9 * side * side  # multiply-adds of the 3x3 convolution, times 2
    # Backward: the weight gradient only (the input needs no gradient), as many FLOPs as the forward.
    assert (result["forward_flops"], result["backward_flops"]) == (conv_flops, conv_flops)
    assert result["flops_per_step"] == 2 * conv_flops
    ms = result["ms_per_step"]
    assert result["ms_per_step_min"] <= ms <= result["ms_per_step_max"]
    assert result["images_per_s"] == pytest.approx(batch * 1000 / ms)
    assert result["achieved_tflops"] == pytest.approx(2 * conv_flops / (ms / 1000) / 1e12)
    assert result["mfu_measured"] == pytest.approx(result["achieved_tflops"] * 1e12 / 1e9)
    assert result["forward_gflop_per_image"] == pytest.approx(conv_flops / batch / 1e9)
    # No datasheet peak and no device memory counter on the CPU.
    assert result["mfu_datasheet"] is None and result["peak_memory_gib"] is None


def test_local_attention_flops_follow_the_window_formula():
    batch, side, heads, dim, block = 2, 6, 3, 8, 2
    q, k, v = (torch.randn(batch, side, side, heads, dim, requires_grad=True) for _ in range(3))
    rpb = torch.zeros(heads, 4 * block - 1, 4 * block - 1, requires_grad=True)
    with train_speed.flop_counter() as forward:
        out = local_attention2d(q, k, v, rpb, block, backend="kernel")
    with train_speed.flop_counter() as backward:
        out.sum().backward()
    window = 9 * block**2  # the 3x3 neighbouring blocks of b x b keys
    expected = 2 * 2 * batch * side * side * heads * window * dim  # q.k and p.v for every query
    assert forward.get_total_flops() == expected
    assert backward.get_total_flops() == expected * 5 // 2
    with train_speed.flop_counter() as symmetric:
        local_attention2d(q, k, v, rpb, block, symmetric=True, backend="kernel")
    assert symmetric.get_total_flops() == expected // window * (2 * block + 1) ** 2


@pytest.mark.parametrize("name", ["paper512", "paper512-la012", "paper512-gc"])
def test_run_case_on_the_tiny_preset_reports_sane_numbers(name):
    case = tiny(name)
    result = train_speed.run_case(case, CPU, steps=2, warmup=1, peak_measured=1e11)
    assert "error" not in result and "skipped" not in result
    assert (result["model"], result["image_size"], result["batch_size"]) == ("tiny", 64, 2)
    assert result["flops_per_step"] == result["forward_flops"] + result["backward_flops"]
    # The same count, taken independently on a fresh model of the case, with checkpointing off.
    trainer = train_speed.build_trainer(dataclasses.replace(case, grad_checkpointing=False), CPU)
    batch = train_speed.random_batch(case, CPU)
    with train_speed.flop_counter() as counter:
        out = trainer.model(batch["image"])
        (out.label_logits.sum() + out.boundary_logits.sum()).backward()
    assert result["flops_per_step"] == counter.get_total_flops()
    assert result["images_per_s"] == pytest.approx(2 * 1000 / result["ms_per_step"])
    assert result["mfu_measured"] == pytest.approx(result["achieved_tflops"] * 1e12 / 1e11)
    assert result["parameters"] == sum(p.numel() for p in trainer.model.parameters())
    assert result["localattn_kernel"] is (True if case.local_attention != "none" else None)


def test_the_local_attention_cases_count_the_local_attention_op():
    plain = train_speed.run_case(tiny("paper512"), CPU, steps=1, warmup=1)
    with_la = train_speed.run_case(tiny("paper512-la012"), CPU, steps=1, warmup=1)
    assert with_la["flops_per_step"] > plain["flops_per_step"]


def test_the_smp_baseline_runs_or_is_skipped_with_a_message(monkeypatch):
    case = tiny("smp-r50-512")
    result = train_speed.run_case(case, CPU, steps=1, warmup=1)
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        assert "segmentation_models_pytorch cannot be imported" in result["skipped"]
    else:
        assert "error" not in result and "skipped" not in result
        assert 30e6 < result["parameters"] < 35e6  # ResNet-50 encoder + UNet decoder
        assert result["flops_per_step"] > 0
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)
    skipped = train_speed.run_case(case, CPU, steps=1, warmup=1)
    assert "pip install -e '.[bench]'" in skipped["skipped"] and "ms_per_step" not in skipped


def test_a_failing_case_is_reported_and_does_not_raise():
    case = dataclasses.replace(tiny("smp-r50-512"), grad_checkpointing=True)
    result = train_speed.run_case(case, CPU, steps=1, warmup=1)
    assert "no local attention or gradient checkpointing" in result["error"]


def test_profile_lists_operators_by_self_time_and_writes_a_gzipped_trace(tmp_path):
    profile = train_speed.profile_case(tiny("paper512"), CPU, steps=1, trace_dir=tmp_path, warmup=1)
    rows = profile["rows"]
    assert profile["kind"] == "operators"
    assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    names = {r["name"] for r in rows}
    assert "aten::convolution_backward" in names and "aten::native_group_norm" in names
    assert profile["busy_ms_per_step"] <= profile["wall_ms_per_step"] * 1.05
    with gzip.open(tmp_path / "paper512.trace.json.gz", "rt") as f:
        trace = json.load(f)
    assert any(event.get("name") == "aten::convolution_backward" for event in trace["traceEvents"])
    table = train_speed.format_profile(profile, top=5).splitlines()
    assert table[0].startswith("paper512: top operators by self CPU time, 1 steps")
    assert len(table) == 2 + 5 + 1 and table[-1].endswith("more)")


def test_data_loading_speed_counts_the_images_after_the_first_batch():
    result = train_speed.data_loading_speed(image_size=32, batch_size=4, workers=1, batches=3, device=CPU)
    assert result["images"] == 3 * 4 and result["images_per_s"] > 0
    assert result["images_per_s"] == pytest.approx(result["images"] / result["seconds"])


DESCRIPTION = ("case", "model", "batch_size", "image_size", "amp", "local_attention", "device", "torch", "cuda")


def row(case, ms, images_per_s):
    return {"case": case, "model": "m", "batch_size": 8, "image_size": 512, "amp": "bf16", "local_attention": "none",
            "device": "GPU", "torch": "2.x", "cuda": "13", "ms_per_step": ms, "images_per_s": images_per_s,
            "forward_gflop_per_image": 476.0, "achieved_tflops": 98.0, "mfu_datasheet": 0.1, "mfu_measured": 0.12,
            "peak_memory_gib": 17.4, "peak_tflops_datasheet": 989.0, "peak_tflops_measured": 790.0,
            "compile": case.endswith("-compile"), "first_step_s": 95.0}


def test_the_table_compares_checkpointing_and_the_baseline():
    rows = [row("paper512", 100.0, 80.0), row("paper512-gc", 130.0, 61.5), row("smp-r50-512", 50.0, 160.0),
            {key: value for key, value in row("paper512-la-all", 0, 0).items() if key in DESCRIPTION}
            | {"error": "OutOfMemoryError: boom"}, row("paper512-compile", 40.0, 200.0),
            row("paper512-la012", 150.0, 53.0) | {"local_attention": "0,1,2", "localattn_kernel": False}]
    table = train_speed.format_table(rows)
    assert "grad checkpointing: +30.0% step time (target: at most +35%), peak memory 17.40 -> 17.40 GiB" in table
    assert "paper512 vs smp-r50-512: 0.50x the images/s" in table
    assert "OutOfMemoryError: boom" in table
    assert "paper512-compile vs paper512: 2.50x the images/s" in table
    assert "paper512-compile: first step 95 s (compilation included)" in table
    assert "paper512-la012: local attention ran the plain-PyTorch reference" in table
    assert "paper512-la-all: local attention ran" not in table
    assert "peak: datasheet 989 TFLOP/s (dense bf16), measured matmul 790 TFLOP/s" in table


def test_command_line_appends_json_and_prints_the_summary(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    flags = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--json", str(results)]
    assert train_speed.main([*flags, "--cases", "paper512"]) == 0
    assert train_speed.main(["--data-loading", "--device", "cpu", "--workers", "0", "--image-size", "32",
                             "--batches", "2", "--json", str(results)]) == 0
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [line.get("case") for line in lines] == ["paper512", None] and lines[1]["data_loading"]
    with results.open("a") as f:
        f.write('{"case": "paper512-la-all", "ms_per')  # a run killed while writing its line
    capsys.readouterr()
    assert train_speed.main(["--summary", str(results)]) == 0
    out = capsys.readouterr().out
    assert "paper512                 tiny" in out and "data loading 32px batch 8, 0 workers" in out


def test_command_line_rejects_unknown_cases(capsys):
    with pytest.raises(SystemExit):
        train_speed.main(["--cases", "paper512,huge"])
    assert "unknown cases ['huge']" in capsys.readouterr().err


def test_the_datasheet_table_picks_the_specific_name_first(monkeypatch):
    gpu = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA H200 NVL", 835e12), ("NVIDIA GeForce RTX 4090", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert train_speed.datasheet_peak(gpu) == peak
    assert train_speed.datasheet_peak(CPU) is None


def test_plain_flop_counter_misses_what_the_extra_formulas_count():
    """Why the benchmark passes its own formulas: torch counts neither op."""
    batch, side, heads, dim = 1, 4, 1, 8
    q = k = v = torch.randn(batch, side, side, heads, dim)
    with FlopCounterMode(display=False) as plain:
        local_attention2d(q, k, v, torch.zeros(heads, 7, 7), 2, backend="kernel")
    assert plain.get_total_flops() == 0
