"""unet.tuning: the settings drawn, the scores of a trial against a direct count, the search (seeded,
its best really the best, the same in a process pool, interruptible), the held-out split."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from unet import inference, postprocess, tuning
from unet.labels import NUM_LABELS
from unet.model import build_model
from unet.postprocess_config import ARGMAX_EQUIVALENT, PostprocessConfig
from unet.data import SyntheticClothing


@pytest.fixture(scope="module")
def data():
    """Network-like outputs for 4 synthetic 32x32 label maps: probabilities peaked on the true label
    under heavy noise, and a noisy boundary probability that is high on the true boundaries."""
    dataset = SyntheticClothing(4, image_size=32, seed=5)
    labels = torch.stack([dataset[i]["labels"] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(0)
    logits = 2.0 * F.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float()
    probs = (logits + 1.5 * torch.randn(logits.shape, generator=generator)).softmax(1)
    edges = postprocess.boundary_from_labels(labels).float()
    boundary = (0.6 * edges + 0.5 * torch.rand(edges.shape, generator=generator)).clamp(0, 1).unsqueeze(1)
    return tuning.TuningData(probs, boundary, labels)


def direct_count(config, data, interior):
    """The confusion matrix counted with NumPy, from the post-processing called directly."""
    if config is None:
        predicted = data.probs.argmax(1).numpy()
    else:
        predicted = postprocess.postprocess(data.probs.numpy(), data.boundary.numpy(), **config.kwargs())
    target = data.labels.numpy()
    if interior:
        predicted, target = predicted[:, interior:-interior, interior:-interior], target[:, interior:-interior, interior:-interior]
    expected = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
    np.add.at(expected, (target.ravel(), predicted.ravel()), 1)
    return expected


# ----------------------------------------------------------------------------- the settings drawn


def test_sample_configs_starts_with_the_defaults_and_argmax_and_is_seeded():
    configs = tuning.sample_configs(40, seed=3)
    assert len(configs) == 40 and configs[0] == PostprocessConfig() and configs[1] == ARGMAX_EQUIVALENT
    assert configs == tuning.sample_configs(40, seed=3)
    assert configs[2:] != tuning.sample_configs(40, seed=4)[2:]
    assert tuning.sample_configs(1) == [PostprocessConfig()]
    assert tuning.sample_configs(2) == [PostprocessConfig(), ARGMAX_EQUIVALENT]
    with pytest.raises(ValueError, match="trials: expected a positive int, got 0"):
        tuning.sample_configs(0)


def test_sampled_settings_stay_in_the_search_space_and_cover_both_boundary_methods():
    configs = tuning.sample_configs(300, seed=0)[2:]  # after the defaults and ARGMAX_EQUIVALENT
    for name, space in tuning.SEARCH_SPACE.items():
        values = np.array([getattr(config, name) for config in configs])
        offset = 1 if name == "min_size" else 0  # drawn in [1, 101], stored one lower
        assert values.min() >= space.low - offset and values.max() <= space.high - offset, name
        assert values.max() - values.min() > 0.5 * (space.high - space.low), name  # spread over the range
        if space.integer:
            assert all(isinstance(getattr(config, name), int) for config in configs)
    # log-uniform: as many draws below the geometric middle of the range as above it
    joins = np.array([config.join_threshold for config in configs])
    assert 0.4 < np.mean(joins < math.sqrt(0.005 * 0.5)) < 0.6
    assert {config.boundary_method for config in configs} == set(postprocess.BOUNDARY_METHODS)
    assert min(config.min_size for config in configs) == 0


# ----------------------------------------------------------------------------- scores


@pytest.mark.parametrize("interior", [0, 3])
def test_score_counts_like_the_post_processing_called_directly(data, interior):
    configs = [None, PostprocessConfig(), PostprocessConfig(boundary_threshold=0.3, min_size=0, new_threshold=0.9,
                                                            boundary_method="close_gaps")]
    for config in configs:
        matrix = tuning.score(config, data, interior)
        assert np.array_equal(matrix.matrix.numpy(), direct_count(config, data, interior)), config


def test_score_post_processes_in_calls_of_a_few_images(data, monkeypatch):
    monkeypatch.setattr(tuning, "IMAGES_PER_CALL", 3)  # 4 images: calls of 3 and 1
    matrix = tuning.score(PostprocessConfig(), data)
    assert np.array_equal(matrix.matrix.numpy(), direct_count(PostprocessConfig(), data, 0))


# ----------------------------------------------------------------------------- the search


def test_search_scores_every_trial_and_its_best_is_the_best(data):
    configs = tuning.sample_configs(8, seed=1)
    result = tuning.search(configs, data, interior=1, progress=False)
    assert not result.interrupted and result.planned == 8
    assert [trial.index for trial in result.trials] == list(range(8))
    scores = []
    for trial, config in zip(result.trials, configs):
        assert trial.config == config
        assert np.array_equal(trial.matrix.matrix.numpy(), direct_count(config, data, 1))
        assert trial.objective == (trial.mean_iou + trial.matrix.pixel_accuracy()) / 2
        scores.append(trial.objective)
    assert len(set(scores)) > 2  # the settings matter on this data, so picking the best means something
    assert result.best.objective == max(scores) and result.best.index == scores.index(max(scores))


def test_search_is_deterministic_and_ties_go_to_the_earliest_trial(data):
    configs = tuning.sample_configs(5, seed=2)
    first = tuning.search(configs, data, progress=False)
    second = tuning.search(configs, data, progress=False)
    assert [t.mean_iou for t in first.trials] == [t.mean_iou for t in second.trials]
    repeated = tuning.search([configs[3], configs[3], PostprocessConfig()], data, progress=False)
    if repeated.trials[0].objective >= repeated.trials[2].objective:
        assert repeated.best.index == 0


@pytest.mark.slow  # starts two Python processes that import torch
def test_search_in_a_process_pool_gives_the_same_trials(data):
    configs = tuning.sample_configs(6, seed=4)
    in_process = tuning.search(configs, data, interior=1, progress=False)
    pooled = tuning.search(configs, data, interior=1, processes=2, progress=False)
    assert [t.index for t in pooled.trials] == list(range(6)) and not pooled.interrupted
    for a, b in zip(in_process.trials, pooled.trials):
        assert torch.equal(a.matrix.matrix, b.matrix.matrix)
    assert pooled.best.index == in_process.best.index


def _die(index, config):
    """A pool task whose worker process dies (pickled by reference: the worker imports this module)."""
    os._exit(3)


@pytest.mark.slow  # starts Python processes that import torch
def test_a_dead_worker_leaves_its_trials_to_this_process(data, monkeypatch):
    configs = tuning.sample_configs(4, seed=4)
    monkeypatch.setattr(tuning, "_score_in_worker", _die)
    with pytest.warns(RuntimeWarning, match="tuning: a worker process failed .*; the other trials run in this process"):
        result = tuning.search(configs, data, processes=2, progress=False)
    assert [trial.index for trial in result.trials] == [0, 1, 2, 3] and not result.interrupted
    for trial, config in zip(result.trials, configs):
        assert np.array_equal(trial.matrix.matrix.numpy(), direct_count(config, data, 0))


def test_ctrl_c_keeps_the_trials_scored_so_far(data, ctrl_c_in_tuning):
    configs = tuning.sample_configs(6, seed=1)
    score = tuning.score
    calls = ctrl_c_in_tuning(4)
    result = tuning.search(configs, data, progress=False)
    assert result.interrupted and result.planned == 6 and len(calls) == 4
    assert [trial.index for trial in result.trials] == [0, 1, 2]
    best_of_three = max(range(3), key=lambda i: (tuning.objective(score(configs[i], data)), -i))
    assert result.best.index == best_of_three


def test_an_empty_search_has_no_best():
    with pytest.raises(ValueError, match="no trial was scored"):
        tuning.SearchResult(trials=[], planned=3, interrupted=True).best


# ----------------------------------------------------------------------------- the images


def test_split_holds_out_a_seeded_share_of_the_images():
    labels = torch.arange(10).view(10, 1, 1).expand(10, 4, 4)
    data = tuning.TuningData(torch.rand(10, 3, 4, 4), torch.rand(10, 1, 4, 4), labels)
    tuning_part, held_out = data.split(0.3, seed=1)
    ids = lambda part: part.labels[:, 0, 0].tolist()  # noqa: E731
    assert len(held_out) == 3 and len(tuning_part) == 7
    assert sorted(ids(tuning_part) + ids(held_out)) == list(range(10))
    assert ids(held_out) == ids(data.split(0.3, seed=1)[1]) and ids(held_out) != ids(data.split(0.3, seed=2)[1])
    assert torch.equal(held_out.probs, data.probs[ids(held_out)])
    assert data.split(0.0) == (data, data)
    with pytest.raises(ValueError, match="holdout: 0.01 of 10 images leaves one part empty"):
        data.split(0.01)
    with pytest.raises(ValueError, match=r"holdout: expected a fraction in \[0, 1\), got 1.0"):
        data.split(1.0)


def test_tune_runs_the_network_once_and_scores_argmax_defaults_and_the_best():
    torch.manual_seed(0)
    model = build_model("tiny", image_size=32).eval()
    dataset = SyntheticClothing(4, image_size=32, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    report = tuning.tune(model, loader, "cpu", trials=3, seed=0, holdout=0.5, interior=1, progress=False)
    images = torch.stack([dataset[i]["image"] for i in range(4)])
    probs, boundary = inference.predict_probabilities(model, images)
    everything = tuning.TuningData(probs, boundary, torch.stack([dataset[i]["labels"] for i in range(4)]))
    expected_tuning, expected_held_out = everything.split(0.5, seed=0)
    for part, expected in (("tuning", expected_tuning), ("held_out", expected_held_out)):
        torch.testing.assert_close(report.parts[part].probs, expected.probs, rtol=1e-5, atol=1e-5)  # other batches
        assert torch.equal(report.parts[part].labels, expected.labels)
    assert len(report.search.trials) == 3

    tuning.score_parts(report)
    for part, data in report.parts.items():
        assert list(report.matrices[part]) == ["argmax", "defaults", "tuned"]
        expected = {"argmax": None, "defaults": PostprocessConfig(), "tuned": report.best.config}
        for method, config in expected.items():
            assert np.array_equal(report.matrices[part][method].matrix.numpy(), direct_count(config, data, 1))
    record = report.record(checkpoint="best.pt")
    assert record["checkpoint"] == "best.pt" and record["images"] == {"tuning": 2, "held_out": 2}
    assert record["trials_scored"] == 3 and record["best_trial"] == report.best.index and not record["interrupted"]
    assert record["scores"]["held_out"]["tuned"]["mean_iou"] == report.matrices["held_out"]["tuned"].mean_iou()
    printed = tuning.format_report(report)
    assert "held-out images (2)" in printed and f"tuned (trial {report.best.index})" in printed
    assert f"{report.matrices['tuning']['argmax'].mean_iou():.4f}" in printed
    assert tuning.format_trials(report.search.trials).splitlines()[2].split()[0] == str(report.search.best.index)
    assert report.best is tuning.select(report.search).trial


def test_tune_refuses_a_frame_wider_than_the_images():
    model = build_model("tiny", image_size=32).eval()
    loader = torch.utils.data.DataLoader(SyntheticClothing(2, image_size=16, seed=1), batch_size=2)
    with pytest.raises(ValueError, match=r"interior: expected a frame width in \[0, 7\] for 16x16 images, got 8"):
        tuning.tune(model, loader, "cpu", trials=2, interior=8, progress=False)


# ----------------------------------------------------------------------------- argmax, folds, selection


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 12), st.integers(1, 24), st.integers(0, 2**31 - 1),
       st.sampled_from([np.float32, np.float64]), st.booleans())
def test_the_argmax_equivalent_settings_give_argmax_labels(batch, height, width, labels, seed, dtype, ties):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (batch, labels, height, width))
    probs = np.exp(logits.round() if ties else logits)  # rounded logits: many exact ties
    probs = (probs / probs.sum(1, keepdims=True)).astype(dtype)
    boundary = rng.random((batch, 1, height, width)).astype(dtype)
    got = postprocess.postprocess(probs, boundary, **ARGMAX_EQUIVALENT.kwargs())
    assert np.array_equal(got, probs.argmax(1))  # NumPy's argmax: the first maximum, as argmax_labels


def test_score_folds_counts_each_fold_on_its_own_images(data):
    folds = torch.tensor([1, 0, 2, 1])
    counts = tuning.score_folds(PostprocessConfig(), data, 1, folds)
    assert counts.shape == (3, NUM_LABELS, NUM_LABELS)
    for fold in range(3):
        expected = direct_count(PostprocessConfig(), data.subset(torch.nonzero(folds == fold).flatten()), 1)
        assert np.array_equal(counts[fold].numpy(), expected)
    assert np.array_equal(tuning.score(None, data, 1).matrix.numpy(), tuning.score_folds(None, data, 1, folds).sum(0).numpy())


def test_fold_ids_deal_the_images_round_seeded():
    ids = tuning.fold_ids(10, seed=2)
    assert sorted(torch.bincount(ids).tolist()) == [2, 2, 3, 3]
    assert torch.equal(ids, tuning.fold_ids(10, seed=2)) and not torch.equal(ids, tuning.fold_ids(10, seed=3))
    assert tuning.fold_ids(3).sort().values.tolist() == [0, 1, 2] and tuning.fold_ids(1).tolist() == [0]


def trial(index, config, per_fold):
    """A Trial with 2-label confusion counts per fold: per_fold[k] = (true 0 as 0, true 0 as 1, true 1 as 0, true 1 as 1)."""
    counts = torch.zeros(len(per_fold), NUM_LABELS, NUM_LABELS, dtype=torch.int64)
    for fold, (a, b, c, d) in enumerate(per_fold):
        counts[fold, :2, :2] = torch.tensor([[a, b], [c, d]])
    return tuning.Trial(index, config, counts)


DRAWN = PostprocessConfig(boundary_threshold=0.3)


def slow_cross_validated_mean_iou(trials):
    pooled = 0
    for fold in range(trials[0].fold_counts.shape[0]):
        others = [tuning._confusion(t.fold_counts.sum(0) - t.fold_counts[fold]) for t in trials]
        scores = [(m.mean_iou() + m.pixel_accuracy()) / 2 for m in others]
        pooled = pooled + trials[scores.index(max(scores))].fold_counts[fold]  # the first of the best
    return tuning._confusion(pooled).mean_iou()


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 4).flatmap(lambda folds: st.lists(
    st.lists(st.tuples(*[st.integers(0, 9)] * 4), min_size=folds, max_size=folds), min_size=1, max_size=5)))
def test_cross_validated_mean_iou_is_the_pooled_score_of_the_best_on_the_other_folds(per_trial):
    trials = [trial(i, PostprocessConfig(boundary_threshold=0.1 + 0.1 * i), folds) for i, folds in enumerate(per_trial)]
    expected = slow_cross_validated_mean_iou(trials)
    got = tuning.cross_validated_mean_iou(trials)
    assert got == expected or (math.isnan(got) and math.isnan(expected))


def test_select_keeps_argmax_when_neither_the_search_nor_the_defaults_beat_it():
    # Each fold's winner elsewhere is a trial that is poor on that fold: the search, cross-validated,
    # loses to argmax, though the drawn trials beat it on the tuning images as a whole.
    result = tuning.SearchResult([trial(0, PostprocessConfig(), [(5, 5, 5, 5)] * 2),
                                  trial(1, ARGMAX_EQUIVALENT, [(8, 2, 2, 8)] * 2),
                                  trial(2, DRAWN, [(10, 0, 0, 10), (0, 10, 10, 0)]),
                                  trial(3, DRAWN, [(0, 10, 10, 0), (10, 0, 0, 10)]),
                                  trial(4, DRAWN, [(10, 0, 0, 10), (7, 3, 3, 7)])], planned=5)
    assert result.best.index == 4  # the best on all the tuning images: 34 of 40 right, argmax 32
    selection = tuning.select(result)
    assert selection.source == "argmax" and selection.trial.index == 1 and selection.trial.config == ARGMAX_EQUIVALENT
    assert selection.estimates["search"] < selection.estimates["argmax"]


def test_select_keeps_the_defaults_or_the_search_when_they_beat_argmax():
    argmax = trial(1, ARGMAX_EQUIVALENT, [(6, 4, 4, 6)] * 2)
    defaults = trial(0, PostprocessConfig(), [(8, 2, 2, 8)] * 2)
    drawn = trial(2, DRAWN, [(9, 1, 1, 9)] * 2)
    assert tuning.select(tuning.SearchResult([defaults, argmax], 2)).source == "defaults"
    selection = tuning.select(tuning.SearchResult([defaults, argmax, drawn], 3))
    assert selection.source == "search" and selection.trial is drawn
    assert selection.estimates == {"argmax": argmax.mean_iou, "defaults": defaults.mean_iou, "search": drawn.mean_iou}
    tie = trial(0, PostprocessConfig(), [(6, 4, 4, 6)] * 2)  # ties go to the simpler: argmax
    assert tuning.select(tuning.SearchResult([tie, argmax], 2)).source == "argmax"


def test_select_without_folds_to_cross_validate_on_keeps_argmax_or_the_defaults():
    result = tuning.SearchResult([trial(0, PostprocessConfig(), [(7, 3, 3, 7)]),
                                  trial(1, ARGMAX_EQUIVALENT, [(6, 4, 4, 6)]), trial(2, DRAWN, [(10, 0, 0, 10)])], 3)
    selection = tuning.select(result)
    assert selection.source == "defaults" and math.isnan(selection.estimates["search"])
