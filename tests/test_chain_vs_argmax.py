"""benchmarks.chain_vs_argmax, the script behind the README's chain / argmax ratios: the order of
its calls, the minimum it keeps and its command line."""

import pytest
import torch

from benchmarks import chain_vs_argmax


class FakeClock:
    """perf_counter for functions that advance it by a cost of their own (in seconds)."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def __call__(self) -> float:
        return self.now

    def function(self, name: str, costs: list[float]):
        remaining = iter(costs)

        def call():
            self.calls.append(name)
            self.now += next(remaining)

        return call


@pytest.mark.parametrize("calls_in_a_row, order", [(1, "abab"), (2, "aabbaabb")])
def test_calls_in_turn_or_in_blocks_and_keeps_the_fastest(monkeypatch, calls_in_a_row, order):
    clock = FakeClock()
    monkeypatch.setattr(chain_vs_argmax.time, "perf_counter", clock)
    a = clock.function("a", [0.003, 0.001, 0.002, 0.004])
    b = clock.function("b", [0.005, 0.006, 0.007, 0.008])
    fastest = chain_vs_argmax.fastest_calls({"a": a, "b": b}, rounds=len(order) // (2 * calls_in_a_row),
                                            calls_in_a_row=calls_in_a_row)
    assert "".join(clock.calls) == order
    assert fastest == pytest.approx({"a": 1.0, "b": 5.0})  # ms


def test_command_line_prints_each_input_and_restores_threads(capsys):
    threads = torch.get_num_threads()
    results = chain_vs_argmax.main(["--method", "blocks", "--rounds", "1", "--inputs", "clean"])
    assert list(results) == ["clean"] and set(results["clean"]) == {"defaults", "paper", "argmax"}
    assert all(ms > 0 for ms in results["clean"].values())
    printed = capsys.readouterr().out
    ratio = results["clean"]["defaults"] / results["clean"]["argmax"]
    assert printed.startswith("clean: chain at the defaults") and f"({ratio:.3f}x NumPy's argmax)" in printed
    assert torch.get_num_threads() == threads
    with pytest.raises(SystemExit):
        chain_vs_argmax.main(["--rounds", "0"])
