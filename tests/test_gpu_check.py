"""benchmarks/gpu_check.sh and the results table of benchmarks/bench_localattn_cuda.py, on the CPU:
the script parses (and passes shellcheck where installed), and the table is made from whatever
results a run left, partial or cut off mid-line."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import bench_localattn_cuda as bench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def record(shape, implementation, pass_name, **fields):
    return {"kind": "time", "shape": shape, "implementation": implementation, "pass": pass_name,
            "device": "NVIDIA H100 80GB HBM3", **fields}


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    subprocess.run(["shellcheck", str(SCRIPT)], check=True)


def test_script_usage_error():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_table_from_partial_results(tmp_path):
    shape = "512²x96 b2 D32"
    minimum = bench.minimum_bytes(8, 512, 96, backward=False)
    records = [
        record(shape, "fused", "forward", batch=8, ms=0.5, minimum_bytes=minimum),
        record(shape, "fused", "forward+backward", error="RuntimeError: CUDA error: boom"),
        {"kind": "check", "shape": shape, "implementation": "fused", "pass": "forward+backward",
         "device": "NVIDIA H100 80GB HBM3", "relative_error": 3e-3, "ok": True},
        record(shape, "reference", "forward", batch=8, ms=5.0, minimum_bytes=minimum),
        record(shape, "flex", "forward", error="not run: time budget spent"),
    ]
    path = tmp_path / "bench.jsonl"
    # The last line was cut off by a timeout while being written.
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "ti')
    table = bench.format_table(bench.load_results(path))
    forward = next(line for line in table.splitlines() if "| forward |" in line)
    cells = [cell.strip() for cell in forward.strip("|").split("|")]
    achieved = minimum / 0.5e-3
    assert cells == [shape, "forward", "ok (3.0e-03)", "0.500", "5.000", "not run",
                     f"{achieved / 1e9:.4g}", f"{100 * achieved / 3.35e12:.0f}%", "10.0x", "—"]
    backward = next(line for line in table.splitlines() if "| forward+backward |" in line)
    assert "| error |" in backward
    assert "error: 512²x96 b2 D32 forward+backward fused: RuntimeError: CUDA error: boom" in table
    assert "3.35 TB/s" in table


def test_table_of_no_results():
    assert "| shape | pass |" in bench.format_table([])
