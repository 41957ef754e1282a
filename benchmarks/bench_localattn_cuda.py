"""GPU benchmarks of the local attention op, bfloat16, batch 8: the fused CUDA kernel, the
plain-PyTorch reference path and FlexAttention expressing the same op (block-neighbour BlockMask,
score_mod reading the bias table), forward and forward+backward.

Each result carries the minimum bytes the pass must move (forward: read q, k, v, write out =
4·N·C·2 bytes; forward+backward: also read q, k, v, out, grad_out and write grad_q, grad_k,
grad_v = 12·N·C·2 bytes, N = B·H·W, C = heads·D) and the achieved rate against it; the op is
memory-bound, so that rate over the DRAM bandwidth is how close it is to the limit.

As pytest-benchmark tests (marker `cuda`):

    pytest benchmarks/bench_localattn_cuda.py --benchmark-only

As a script with a time budget, for a lent GPU (benchmarks/gpu_check.sh runs it):

    python benchmarks/bench_localattn_cuda.py --json results.jsonl --budget 150
    python benchmarks/bench_localattn_cuda.py --table results.jsonl

The script measures the fused kernel on every shape first, then checks it against the reference
path in float32, then times the reference path, then FlexAttention (whose compilation is slow);
it appends each result to the JSON-lines file as soon as it has it and starts nothing new once
the budget is spent, so a run cut short still leaves a table of what it measured. --table
prints that table (shape, pass, check, fused / reference / FlexAttention ms, fused GB/s and its
share of the DRAM bandwidth) from whatever results exist.
"""

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from localattn.functional import local_attention2d

# (image side, channels, block size, head size): the paper's UNet levels.
SHAPES = [(512, 96, 2, 32), (256, 192, 2, 32), (128, 384, 4, 64), (64, 768, 4, 64)]
# Tiny shapes for --dry-run on the CPU (the script's code paths, not its numbers).
DRY_RUN_SHAPES = [(16, 16, 2, 8), (8, 32, 4, 16)]
BATCH = 8
DTYPE = torch.bfloat16
# Nominal DRAM bandwidth (bytes/s) by device name, for the fraction of the limit.
DRAM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
PASSES = ("forward", "forward+backward")
IMPLEMENTATIONS = ("fused", "reference", "flex")
# Relative L2 error of bf16 results against float32 ones within which a check passes: bf16
# operands land between 1e-3 and 1e-2.
CHECK_TOLERANCE = 1e-2


@functools.cache
def local_block_mask(height, width, block_size, symmetric, device="cuda"):
    """BlockMask of the op on the flattened [H*W] pixel sequence (every index is in the image)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, q_index, kv_index):
        qy, qx, ky, kx = q_index // width, q_index % width, kv_index // width, kv_index % width
        visible = ((qy // block_size - ky // block_size).abs() <= 1) & (
            (qx // block_size - kx // block_size).abs() <= 1
        )
        if symmetric:
            visible = visible & ((ky - qy).abs() <= block_size) & ((kx - qx).abs() <= block_size)
        return visible

    n = height * width
    return create_block_mask(mask_mod, None, None, n, n, device=device, _compile=True)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_local_attention(q, k, v, rpb, block_size, scale, block_mask):
    """The op through FlexAttention, in the [B, heads, H*W, D] layout."""
    batch, height, width, heads, dim = q.shape
    table = 4 * block_size - 1

    def score_mod(score, b, h, q_index, kv_index):
        # Masked pairs of partial blocks still reach score_mod: clamp to stay inside the table.
        dy = (kv_index // width - q_index // width + 2 * block_size - 1).clamp(0, table - 1)
        dx = (kv_index % width - q_index % width + 2 * block_size - 1).clamp(0, table - 1)
        return score + rpb[h, dy, dx]

    def by_head(t):
        return t.reshape(batch, height * width, heads, dim).transpose(1, 2)

    out = compiled_flex_attention()(
        by_head(q), by_head(k), by_head(v), score_mod=score_mod, block_mask=block_mask, scale=scale
    )
    return out.transpose(1, 2).reshape(batch, height, width, heads, dim)


def implementations(block_size, symmetric, height, width, device="cuda"):
    """name -> f(q, k, v, rpb) for the three ways of computing the op."""

    def op(backend):
        return lambda q, k, v, rpb: local_attention2d(
            q, k, v, rpb, block_size, symmetric=symmetric, backend=backend
        )

    def flex(q, k, v, rpb):
        block_mask = local_block_mask(height, width, block_size, symmetric, device)
        return flex_local_attention(q, k, v, rpb, block_size, q.shape[-1] ** -0.5, block_mask)

    return {"fused": op("kernel"), "reference": op("reference"), "flex": flex}


def make_inputs(batch, side, channels, block_size, head_dim, dtype, requires_grad, device="cuda"):
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, side, side, channels // head_dim, head_dim)
    tensors = [
        torch.randn(size, generator=generator, device=device, dtype=dtype)
        for size in (shape, shape, shape, (shape[3], 4 * block_size - 1, 4 * block_size - 1))
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_function(fn, inputs, backward):
    """One synchronised forward (and backward) pass."""
    grad_out = torch.randn_like(inputs[0]) if backward else None

    def step():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, inputs, grad_out)
        synchronize(inputs[0].device)

    return step


def largest_fitting_batch(fn, shape_args, backward, device="cuda", batch=BATCH):
    """`batch`, or the largest power-of-two batch below it whose pass fits in GPU memory."""
    while True:
        try:
            inputs = make_inputs(batch, *shape_args, requires_grad=backward, device=device)
            step = step_function(fn, inputs, backward)
            step()  # also compiles FlexAttention outside the timed rounds
            return batch, step
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            inputs = step = None
            torch.cuda.empty_cache()
            batch //= 2


def minimum_bytes(batch, side, channels, backward, dtype=DTYPE):
    """Bytes a pass must move at the least: each input read once, each output written once."""
    itemsize = torch.finfo(dtype).bits // 8
    return (12 if backward else 4) * batch * side * side * channels * itemsize


def dram_bandwidth(device_name):
    """Nominal DRAM bandwidth of the device in bytes/s, or None for an unknown device."""
    return next((bw for key, bw in DRAM_BANDWIDTH.items() if key in device_name), None)


def median_ms(step, warmup, rounds):
    """Median time of `step` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()  # synchronises at its end
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@pytest.mark.cuda
@pytest.mark.parametrize("passes", ("forward", "forward_backward"))
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("side, channels, block_size, head_dim", SHAPES)
def test_local_attention_cuda(benchmark, side, channels, block_size, head_dim, name, passes):
    fn = implementations(block_size, False, side, side)[name]
    backward = passes == "forward_backward"
    batch, step = largest_fitting_batch(fn, (side, channels, block_size, head_dim, DTYPE), backward)
    benchmark.group = f"{side}x{side} C={channels} b={block_size} D={head_dim} {passes}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)

    extra = {"batch": batch, "minimum_bytes": minimum_bytes(batch, side, channels, backward)}
    if benchmark.stats is not None:
        achieved = extra["minimum_bytes"] / benchmark.stats.stats.median
        extra["achieved_bytes_per_s"] = achieved
        bandwidth = dram_bandwidth(torch.cuda.get_device_name())
        if bandwidth:
            extra["fraction_of_dram_bandwidth"] = achieved / bandwidth
    benchmark.extra_info.update(extra)


@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", (False, True))
def test_flex_formulation_matches_reference(symmetric):
    """The FlexAttention formulation benchmarked above is the same op (values and gradients)."""
    ways = implementations(2, symmetric, 16, 16)
    inputs = make_inputs(2, 16, 64, 2, 32, torch.float32, requires_grad=True)
    grad_out = torch.randn_like(inputs[0])
    results = {}
    for name in ("flex", "reference"):
        out = ways[name](*inputs)
        results[name] = (out, *torch.autograd.grad(out, inputs, grad_out))
    for flex, reference in zip(results["flex"], results["reference"]):
        torch.testing.assert_close(flex, reference, rtol=1e-4, atol=1e-4)


# The budgeted script ------------------------------------------------------------------------


def shape_name(side, channels, block_size, head_dim):
    return f"{side}²x{channels} b{block_size} D{head_dim}"


def check_fused(shape, batch, device):
    """Largest relative L2 error of the fused kernel's bf16 out and gradients against the
    reference path in float32 on the same (upcast) inputs."""
    side, channels, block_size, head_dim = shape
    ways = implementations(block_size, False, side, side, device)
    inputs = make_inputs(batch, side, channels, block_size, head_dim, DTYPE, True, device)
    grad_out = torch.randn_like(inputs[0])
    out = ways["fused"](*inputs)
    fused = (out, *torch.autograd.grad(out, inputs, grad_out))
    wide = [t.detach().float().requires_grad_(True) for t in inputs]
    out = ways["reference"](*wide)
    expected = (out, *torch.autograd.grad(out, wide, grad_out.float()))
    return max(((a.float() - e).norm() / e.norm()).item() for a, e in zip(fused, expected))


def measure(record, shape, implementation, backward, device, batch, warmup, rounds):
    """Times one implementation on one shape and pass into `record`."""
    side, channels, block_size, head_dim = shape
    fn = implementations(block_size, False, side, side, device)[implementation]
    batch, step = largest_fitting_batch(
        fn, (side, channels, block_size, head_dim, DTYPE), backward, device, batch
    )
    record["batch"] = batch
    record["ms"] = median_ms(step, warmup, rounds)
    record["minimum_bytes"] = minimum_bytes(batch, side, channels, backward)


def planned_runs(shapes):
    """(kind, shape, implementation, pass) in the order the script runs them: the fused kernel
    first, FlexAttention (slow to compile) last."""
    runs = [("time", s, "fused", p) for p in PASSES for s in shapes]
    runs += [("check", s, "fused", "forward+backward") for s in shapes]
    for implementation in ("reference", "flex"):
        runs += [("time", s, implementation, p) for p in PASSES for s in shapes]
    return runs


def run_benchmarks(path, shapes, budget, device, batch, warmup, rounds, skip):
    started = time.monotonic()
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for kind, shape, implementation, pass_name in planned_runs(shapes):
        record = {"kind": kind, "shape": shape_name(*shape), "implementation": implementation,
                  "pass": pass_name, "device": device_name, "torch": torch.__version__}
        if implementation in skip:
            continue
        if time.monotonic() - started > budget:
            record["error"] = "not run: time budget spent"
        else:
            try:
                if kind == "check":  # a batch of 2 is enough to see a wrong result
                    record["relative_error"] = check_fused(shape, min(batch, 2), device)
                    record["ok"] = record["relative_error"] <= CHECK_TOLERANCE
                else:
                    measure(record, shape, implementation, pass_name != "forward", device, batch,
                            warmup, rounds)
            except Exception as error:  # one failure must not lose the other results
                record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if device == "cuda":
                torch.cuda.empty_cache()
        with open(path, "a") as results:
            results.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def load_results(path):
    """The records of a JSON-lines results file; lines that do not parse (a run killed while
    writing) are skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def format_table(records):
    """The results as one Markdown table: a row per shape and pass."""
    times, checks, devices = {}, {}, set()
    for r in records:
        devices.add(r.get("device", "?"))
        if r.get("kind") == "check":
            checks[r["shape"]] = r
        else:
            times[(r["shape"], r["pass"], r["implementation"])] = r
    shapes = list(dict.fromkeys(r["shape"] for r in records))
    bandwidth = next((dram_bandwidth(d) for d in devices if dram_bandwidth(d)), None)

    def cell_ms(record):
        if record is None:
            return "—"
        if "ms" not in record:
            return "error" if "error" in record and "budget" not in record["error"] else "not run"
        return f"{record['ms']:.3f}"

    def check_cell(shape):
        check = checks.get(shape)
        if check is None or "relative_error" not in check:
            return "—" if check is None else "error"
        return f"{'ok' if check['ok'] else 'FAIL'} ({check['relative_error']:.1e})"

    lines = [
        f"device: {', '.join(sorted(devices)) or '?'}; DRAM bandwidth "
        + (f"{bandwidth / 1e12:.2f} TB/s (nominal)" if bandwidth else "unknown"),
        "",
        "| shape | pass | check | fused ms | reference ms | flex ms | fused GB/s | % of DRAM "
        "| reference / fused | flex / fused |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape in shapes:
        for pass_name in PASSES:
            fused, reference, flex = (times.get((shape, pass_name, name)) for name in IMPLEMENTATIONS)
            if fused is None and reference is None and flex is None:
                continue
            rate = share = "—"
            if fused and "ms" in fused:
                achieved = fused["minimum_bytes"] / (fused["ms"] * 1e-3)
                rate = f"{achieved / 1e9:.4g}"
                share = f"{100 * achieved / bandwidth:.0f}%" if bandwidth else "?"

            def ratio(other):
                if not (other and fused and "ms" in other and "ms" in fused):
                    return "—"
                return f"{other['ms'] / fused['ms']:.1f}x"

            lines.append(
                f"| {shape} | {pass_name} | {check_cell(shape)} | {cell_ms(fused)} | "
                f"{cell_ms(reference)} | {cell_ms(flex)} | {rate} | {share} | {ratio(reference)} | "
                f"{ratio(flex)} |"
            )
    errors = [r for r in records if "error" in r and "budget" not in r["error"]]
    for r in errors:
        lines.append(f"error: {r['shape']} {r['pass']} {r['implementation']}: {r['error']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="run the benchmarks, appending results here")
    parser.add_argument("--table", type=Path, help="print the table of a results file")
    parser.add_argument("--budget", type=float, default=150, help="seconds (default 150)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--skip", default="", help="comma-separated implementations to skip")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU: the script's steps, not its numbers")
    args = parser.parse_args(argv)
    if args.json is None and args.table is None:
        parser.error("give --json, --table or both")
    if args.json is not None:
        device = "cpu" if args.dry_run else "cuda"
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("no CUDA device (use --dry-run on the CPU)")
        shapes, batch = (DRY_RUN_SHAPES, 2) if args.dry_run else (SHAPES, BATCH)
        skip = {name for name in args.skip.split(",") if name}
        run_benchmarks(args.json, shapes, args.budget, device, batch, args.warmup, args.rounds, skip)
    if args.table is not None:
        print(format_table(load_results(args.table)) if args.table.exists() else "no results")


if __name__ == "__main__":
    sys.exit(main())
