"""The post-processing chain against NumPy's ``argmax(0)`` in the same minutes: the README's ratios.

    python -m benchmarks.chain_vs_argmax                   # one call of each in turn, 25 rounds
    python -m benchmarks.chain_vs_argmax --method blocks   # five calls of each in a row, 10 rounds

Run it from the repository root. One CPU thread, on benchmarks/bench_postprocess.py's 512x512
inputs with 24 labels. Three functions are timed: the whole chain (`postprocess`) at the defaults,
the chain at the paper's settings, and NumPy's ``argmax(0)`` of the same probabilities (the
yardstick of the target: the chain at most 10 ms and at most half an argmax). ``turns`` calls
them one after the other, so every chain call runs after an argmax has filled the caches with its
own data (the strictest way); ``blocks`` times five calls of one, then five of the next (warm, as
pytest-benchmark measures each function, but in the same minutes). Each time printed is the
fastest call; a ratio divides two of them. The speed of a shared machine drifts from minute to
minute, which the ratio of the same minutes mostly cancels.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# bench_postprocess imports tests/postprocess_reference.py (pytest finds it through pyproject.toml)
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from benchmarks import bench_postprocess  # noqa: E402
from unet import postprocess  # noqa: E402

CALLS_IN_A_ROW = {"turns": 1, "blocks": 5}
DEFAULT_ROUNDS = {"turns": 25, "blocks": 10}


def fastest_calls(functions: dict[str, Callable[[], object]], rounds: int, calls_in_a_row: int) -> dict[str, float]:
    """The fastest call of each function, in ms: each round calls each function `calls_in_a_row`
    times, one function after the other."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            for _ in range(calls_in_a_row):
                start = time.perf_counter()
                function()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: min(values) for name, values in times.items()}


def measure(kind: str, method: str, rounds: int) -> dict[str, float]:
    """The fastest calls (ms) on one of bench_postprocess's inputs: defaults, paper, argmax."""
    data = bench_postprocess._inputs(kind)
    probs, boundary_prob = data["probs"], data["boundary_prob"]
    functions = {
        "defaults": lambda: postprocess.postprocess(probs, boundary_prob),
        "paper": lambda: postprocess.postprocess(probs, boundary_prob, **postprocess.PAPER_SETTINGS),
        "argmax": lambda: probs.argmax(0),
    }
    for function in functions.values():
        function()  # first calls allocate and load code: not timed
    return fastest_calls(functions, rounds, CALLS_IN_A_ROW[method])


def describe(kind: str, fastest: dict[str, float]) -> str:
    argmax = fastest["argmax"]
    return (
        f"{kind}: chain at the defaults {fastest['defaults']:.2f} ms ({fastest['defaults'] / argmax:.3f}x NumPy's "
        f"argmax), at the paper's settings {fastest['paper']:.2f} ms ({fastest['paper'] / argmax:.3f}x), "
        f"NumPy's argmax(0) {argmax:.2f} ms"
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=sorted(CALLS_IN_A_ROW), default="turns")
    parser.add_argument("--rounds", type=int, default=None, help="default: 25 in turns, 10 in blocks")
    parser.add_argument("--inputs", nargs="+", choices=bench_postprocess.INPUTS, default=list(bench_postprocess.INPUTS))
    args = parser.parse_args(argv)
    rounds = DEFAULT_ROUNDS[args.method] if args.rounds is None else args.rounds
    if rounds < 1:
        parser.error(f"--rounds: expected at least 1, got {rounds}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for kind in args.inputs:
            results[kind] = measure(kind, args.method, rounds)
            print(describe(kind, results[kind]), flush=True)
        return results
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
