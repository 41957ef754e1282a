import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `cuda` cleanly when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ctrl_c_in_tuning(monkeypatch):
    """`ctrl_c_in_tuning(n)`: `unet.tuning.score_folds` raises KeyboardInterrupt on its n-th call (the
    others score as usual); returns the list of the settings it was called with."""
    from unet import tuning  # here, not at the top: every test loads this file, most need no unet._C

    def on_call(n: int) -> list:
        calls, score_folds = [], tuning.score_folds

        def interrupted(config, data, interior=0, folds=None):
            calls.append(config)
            if len(calls) == n:
                raise KeyboardInterrupt
            return score_folds(config, data, interior, folds)

        monkeypatch.setattr(tuning, "score_folds", interrupted)
        return calls

    return on_call
