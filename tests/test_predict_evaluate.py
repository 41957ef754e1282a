"""End to end: train -> resume -> evaluate -> predict on a tiny generated set, and the CLIs' errors."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from unet import evaluate, postprocess, predict, train, tuning
from unet.checkpoint import load_checkpoint, load_model
from unet.data import build_datasets, load_image
from unet.labels import LABELS, NUM_LABELS, PALETTE
from unet.model import to_probabilities
from unet.postprocess_config import PostprocessConfig

TRAIN_FLAGS = ["--num-images", "8", "--val-fraction", "0.25", "--image-size", "32", "--batch-size", "4",
               "--workers", "0", "--threads", "1", "--lr", "3e-3", "--warmup-steps", "1", "--device", "cpu",
               "--tune-trials", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    """One epoch, then a resumed second epoch: the checkpoint every other test reads."""
    output = tmp_path_factory.mktemp("run")
    assert train.main([*TRAIN_FLAGS, "--epochs", "1", "--output", str(output)]) == 0
    assert train.main([*TRAIN_FLAGS, "--epochs", "2", "--output", str(output), "--resume", "auto"]) == 0
    return output / "last.pt"


def reference_probabilities(model, image):
    """The model on one image padded by hand (edge replication) to a multiple of 8, cropped back."""
    height, width = image.shape[-2:]
    padded = np.pad(image.numpy(), ((0, 0), (0, -height % 8), (0, -width % 8)), mode="edge")
    with torch.no_grad():
        probs, boundary = to_probabilities(model(torch.from_numpy(padded)[None]))
    return probs[..., :height, :width], boundary[..., :height, :width]


def test_resumed_run_reached_the_second_epoch(checkpoint):
    state = load_checkpoint(checkpoint)
    assert (state["epoch"], state["global_step"]) == (2, 4)
    rows = (checkpoint.parent / "train.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3", "4"]


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_matches_an_independent_count(checkpoint, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "argmax IoU" in printed and "dust_fill IoU" in printed and "mean IoU" in printed
    results = json.loads((tmp_path / "evaluation.json").read_text())

    model, state = load_model(checkpoint)
    _, val_ds = build_datasets(**dict(state["data_config"], augment=False))
    predictions = {"argmax": [], "dust_fill": []}
    targets = []
    for item in val_ds:
        probs, boundary = reference_probabilities(model, item["image"])
        predictions["argmax"].append(probs[0].argmax(0).numpy())
        predictions["dust_fill"].append(postprocess.postprocess(probs.numpy(), boundary.numpy())[0])
        targets.append(item["labels"].numpy())
    target = np.stack(targets)
    for method, maps in predictions.items():
        pred = np.stack(maps)
        for label_id, name in enumerate(LABELS):
            row = results[method]["labels"][name]
            inter = np.sum((pred == label_id) & (target == label_id))
            union = np.sum((pred == label_id) | (target == label_id))
            assert (row["intersection"], row["union"]) == (inter, union), (method, name)
            assert row["true_mass"] == pytest.approx(np.mean(target == label_id))
            assert row["predicted_mass"] == pytest.approx(np.mean(pred == label_id))
        assert results[method]["pixel_accuracy"] == pytest.approx(np.mean(pred == target))
        present = [results[method]["labels"][n]["iou"] for i, n in enumerate(LABELS) if np.any(target == i)]
        assert results[method]["mean_iou"] == pytest.approx(np.mean(present))

    with (tmp_path / "evaluation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (NUM_LABELS + 2)
    mean_row = next(r for r in rows if r["method"] == "dust_fill" and r["label"] == "mean_iou")
    assert float(mean_row["iou"]) == pytest.approx(results["dust_fill"]["mean_iou"])


def test_evaluate_errors(tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "none.pt")]) == 1
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", "x.pt", "--methods", "argmax,vote"])
    assert "--methods: expected a comma list" in capsys.readouterr().err


# ----------------------------------------------------------------------------- predict


@pytest.fixture
def image_folder(tmp_path):
    """Two 40x24 images (one batch), one 37x45 image, and a file that is not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width) in {"a": (40, 24), "b": (40, 24), "c": (37, 45)}.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.mark.parametrize("method", ["argmax", "dust_fill"])
def test_predict_writes_label_overlay_and_region_maps(checkpoint, image_folder, tmp_path, method, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), str(image_folder), "--output", str(out), "--batch-size", "3",
            "--postprocess", method, "--device", "cpu", "--alpha", "0.6", "--max-size", "0"]
    assert predict.main(argv) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "wrote 3 of 4 images" in captured.out

    model, _ = load_model(checkpoint)
    for name in "abc":
        image = load_image(image_folder / f"{name}.png")
        probs, boundary = reference_probabilities(model, image)
        labels_png = Image.open(out / f"{name}_labels.png")
        assert labels_png.mode == "P" and labels_png.size == (image.shape[2], image.shape[1])
        assert np.array_equal(np.array(labels_png.getpalette()[: 3 * NUM_LABELS]), PALETTE.reshape(-1))
        labels = np.array(labels_png)
        if method == "argmax":
            expected = probs[0].argmax(0).numpy()
            top2 = probs[0].topk(2, dim=0).values
            near_tie = (top2[0] - top2[1]).numpy() < 1e-5  # batch size may move the last bits
            assert near_tie.mean() < 0.01
            assert np.array_equal(labels[~near_tie], expected[~near_tie])
        else:
            expected, regions = postprocess.postprocess(probs.numpy(), boundary.numpy(), return_regions=True)
            assert np.array_equal(labels, expected[0])
            assert np.array_equal(np.array(Image.open(out / f"{name}_regions.png")), regions[0] + 1)

        rgb = np.array(Image.open(image_folder / f"{name}.png")).astype(np.float64)
        blended = np.array(Image.open(out / f"{name}_overlay.png")).astype(np.float64)
        coloured = labels > 0
        assert not coloured.all() and (coloured.any() or method == "dust_fill")  # both branches are checked
        assert np.array_equal(blended[~coloured], rgb[~coloured])
        np.testing.assert_allclose(blended[coloured], 0.4 * rgb[coloured] + 0.6 * PALETTE[labels[coloured]], atol=0.51)

        regions_png = Image.open(out / f"{name}_regions.png")
        assert regions_png.mode in ("I;16", "I") and np.array(regions_png).min() >= 0


def test_predict_at_the_training_scale_keeps_the_original_size(checkpoint, image_folder, tmp_path):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), str(image_folder / "c.png"), "--output", str(out), "--postprocess", "argmax"]
    assert predict.main(argv) == 0
    model, _ = load_model(checkpoint)
    image = load_image(image_folder / "c.png")  # 37x45: the longest side becomes the training size, 32
    small = torch.nn.functional.interpolate(image[None], size=(26, 32), mode="bilinear", antialias=True)
    probs, _ = reference_probabilities(model, small[0])
    probs = torch.nn.functional.interpolate(probs, size=(37, 45), mode="bilinear", antialias=True)
    labels = np.array(Image.open(out / "c_labels.png"))
    assert labels.shape == (37, 45) and np.array_equal(labels, probs[0].argmax(0).numpy())
    assert 0 < np.mean(labels > 0) < 1


def test_predict_errors(checkpoint, image_folder, tmp_path, capsys):
    assert predict.main(["--checkpoint", str(tmp_path / "missing.pt"), str(image_folder)]) == 1
    assert "checkpoint: no such file" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(checkpoint), str(image_folder / "broken.png"),
                         "--output", str(tmp_path / "o"), "--device", "cpu"]) == 1
    assert "skipped" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(checkpoint), str(tmp_path / "*.jpg")]) == 1
    assert "neither a file, a folder nor a matching glob" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", str(checkpoint), "x.png", "--alpha", "2"])
    assert "argument --alpha: expected a number in [0, 1], got 2" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(checkpoint), str(image_folder), "--max-size", "-3"]) == 1
    assert "--max-size: expected 0 or a positive number of pixels, got -3" in capsys.readouterr().err


# ----------------------------------------------------------------------------- post-processing settings, tuning

SETTINGS = PostprocessConfig(boundary_threshold=0.3, gap_iterations=2, min_size=0, new_threshold=0.9,
                             join_threshold=0.2, impatience=2.0, boundary_method="close_gaps")


@pytest.fixture
def run_copy(checkpoint, tmp_path):
    """The checkpoint alone in a fresh folder, so what is written beside it stays in one test."""
    copy = tmp_path / "run" / "best.pt"
    copy.parent.mkdir()
    shutil.copy(checkpoint, copy)
    return copy


def direct_matrices(checkpoint, config, interior):
    """argmax and dust_fill confusion counts on the validation split, computed without unet.inference."""
    model, state = load_model(checkpoint)
    _, val_ds = build_datasets(**dict(state["data_config"], augment=False))
    counts = {"argmax": np.zeros((NUM_LABELS, NUM_LABELS), np.int64), "dust_fill": np.zeros((NUM_LABELS, NUM_LABELS), np.int64)}
    frame = (slice(interior, -interior or None),) * 2
    for item in val_ds:
        probs, boundary = reference_probabilities(model, item["image"])
        predicted = {"argmax": probs[0].argmax(0).numpy(),
                     "dust_fill": postprocess.postprocess(probs.numpy(), boundary.numpy(), **config.kwargs())[0]}
        for method, labels in predicted.items():
            np.add.at(counts[method], (item["labels"].numpy()[frame].ravel(), labels[frame].ravel()), 1)
    return counts


def test_evaluate_with_settings_from_a_file_and_an_interior(checkpoint, tmp_path, capsys):
    settings = SETTINGS.save(tmp_path / "settings.json")
    argv = ["--checkpoint", str(checkpoint), "--output", str(tmp_path), "--device", "cpu",
            "--postprocess-config", str(settings), "--interior", "2"]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"post-processing settings from {settings}" in printed and "without a 2-pixel frame" in printed
    results = json.loads((tmp_path / "evaluation.json").read_text())
    assert results["settings"] == {"postprocess": SETTINGS.to_dict(), "interior": 2}
    expected = direct_matrices(checkpoint, SETTINGS, interior=2)
    for method in ("argmax", "dust_fill"):
        intersection = [results[method]["labels"][name]["intersection"] for name in LABELS]
        union = [results[method]["labels"][name]["union"] for name in LABELS]
        matrix = expected[method]
        assert intersection == matrix.diagonal().tolist(), method
        assert union == (matrix.sum(0) + matrix.sum(1) - matrix.diagonal()).tolist(), method
        assert sum(results[method]["labels"][name]["true_mass"] for name in LABELS) == pytest.approx(1)
    assert int(expected["argmax"].sum()) == 2 * 28 * 28  # two 32x32 validation images without the frame


def test_evaluate_and_predict_pick_up_the_settings_beside_the_checkpoint(run_copy, image_folder, tmp_path, capsys):
    beside = SETTINGS.save(run_copy.parent / "postprocess.json")
    assert evaluate.main(["--checkpoint", str(run_copy), "--device", "cpu", "--methods", "dust_fill"]) == 0
    assert f"post-processing settings from {beside} (found beside the checkpoint)" in capsys.readouterr().out
    picked_up = json.loads((run_copy.parent / "evaluation.json").read_text())
    assert picked_up["settings"]["postprocess"] == SETTINGS.to_dict()
    expected = direct_matrices(run_copy, SETTINGS, interior=0)["dust_fill"]
    assert [picked_up["dust_fill"]["labels"][n]["intersection"] for n in LABELS] == expected.diagonal().tolist()

    assert evaluate.main(["--checkpoint", str(run_copy), "--device", "cpu", "--methods", "dust_fill",
                          "--postprocess-config", "defaults"]) == 0
    assert "post-processing settings: the defaults (--postprocess-config defaults)" in capsys.readouterr().out
    defaults = json.loads((run_copy.parent / "evaluation.json").read_text())
    assert defaults["settings"]["postprocess"] == PostprocessConfig().to_dict()

    out = tmp_path / "predicted"
    argv = ["--checkpoint", str(run_copy), str(image_folder / "c.png"), "--output", str(out), "--max-size", "0"]
    assert predict.main(argv) == 0
    assert f"post-processing settings from {beside} (found beside the checkpoint)" in capsys.readouterr().out
    model, _ = load_model(run_copy)
    probs, boundary = reference_probabilities(model, load_image(image_folder / "c.png"))
    labels, regions = postprocess.postprocess(probs.numpy(), boundary.numpy(), return_regions=True, **SETTINGS.kwargs())
    assert np.array_equal(np.array(Image.open(out / "c_labels.png")), labels[0])
    assert np.array_equal(np.array(Image.open(out / "c_regions.png")), regions[0] + 1)
    with_defaults = postprocess.postprocess(probs.numpy(), boundary.numpy())
    assert not np.array_equal(labels, with_defaults)  # the file mattered

    named = PostprocessConfig().save(tmp_path / "named.json")  # a file named on the command line wins
    assert predict.main([*argv, "--postprocess-config", str(named)]) == 0
    assert f"post-processing settings from {named}" in capsys.readouterr().out
    assert np.array_equal(np.array(Image.open(out / "c_labels.png")), with_defaults[0])


def test_evaluate_tune_writes_the_best_settings_beside_the_checkpoint(run_copy, capsys):
    argv = ["--checkpoint", str(run_copy), "--device", "cpu", "--tune", "--trials", "4", "--processes", "0",
            "--holdout", "0.5", "--seed", "3"]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 trials scored on 1 images" in printed
    assert "tuning images (1)" in printed and "held-out images (1)" in printed and "tuned IoU" in printed
    written = json.loads((run_copy.parent / "postprocess.json").read_text())
    record = written.pop("tuning")
    with (run_copy.parent / "tuning.csv").open() as f:
        trials = list(csv.DictReader(f))
    assert [int(row["trial"]) for row in trials] == [0, 1, 2, 3]
    # One tuning image: no folds to cross-validate the search on, so the better of the defaults (trial 0)
    # and the argmax-equivalent settings (trial 1) is kept, argmax on a tie.
    best = trials[1] if float(trials[1]["mean_iou"]) >= float(trials[0]["mean_iou"]) else trials[0]
    assert record["best_trial"] == int(best["trial"]) and record["kept"] == ("argmax" if best is trials[1] else "defaults")
    assert written == tuning.sample_configs(4, seed=3)[record["best_trial"]].to_dict()
    assert record["checkpoint"] == "best.pt" and record["global_step"] == 4 and record["split"] == "val"
    assert record["images"] == {"tuning": 1, "held_out": 1} and record["trials_scored"] == 4
    assert set(record["scores"]["held_out"]) == {"argmax", "defaults", "tuned"}
    assert record["scores"]["tuning"]["tuned"]["mean_iou"] == pytest.approx(float(best["mean_iou"]))


def test_evaluate_tune_interrupted_writes_the_best_so_far(run_copy, capsys, ctrl_c_in_tuning):
    score = tuning.score
    ctrl_c_in_tuning(3)
    argv = ["--checkpoint", str(run_copy), "--device", "cpu", "--tune", "--trials", "5", "--processes", "0",
            "--holdout", "0"]
    assert evaluate.main(argv) == 130
    assert "2 of 5 trials scored (interrupted)" in capsys.readouterr().out
    written = json.loads((run_copy.parent / "postprocess.json").read_text())
    record = written.pop("tuning")
    assert record["interrupted"] and record["trials_scored"] == 2 and record["images"] == {"tuning": 2}
    first_two = tuning.sample_configs(5, seed=0)[:2]
    data = tuning.TuningData(*_validation_outputs(run_copy))
    scores = [score(config, data).mean_iou() for config in first_two]
    assert written == first_two[int(scores[1] > scores[0])].to_dict()


def _validation_outputs(checkpoint):
    model, state = load_model(checkpoint)
    _, val_ds = build_datasets(**dict(state["data_config"], augment=False))
    outputs = [reference_probabilities(model, item["image"]) for item in val_ds]
    return (torch.cat([p for p, _ in outputs]), torch.cat([b for _, b in outputs]),
            torch.stack([item["labels"] for item in val_ds]))


def test_settings_and_interior_errors(run_copy, image_folder, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"impatience": 0.5}')
    assert evaluate.main(["--checkpoint", str(run_copy), "--postprocess-config", str(bad)]) == 1
    assert f"error: {bad}: field 'impatience': expected a number > 1, got 0.5" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(run_copy), str(image_folder), "--postprocess-config", str(bad)]) == 1
    assert f"error: {bad}: field 'impatience'" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(run_copy), str(image_folder), "--postprocess-config",
                         str(tmp_path / "none.json")]) == 1
    assert "postprocess config: no such file" in capsys.readouterr().err
    (run_copy.parent / "postprocess.json").write_text("{not json")
    assert evaluate.main(["--checkpoint", str(run_copy)]) == 1
    assert "postprocess.json: not valid JSON" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(run_copy), "--interior", "16", "--postprocess-config", "defaults"]) == 1
    assert "error: --interior: expected a frame width in [0, 15] for 32x32 images, got 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(run_copy), "--tune", "--postprocess-config", str(bad)])
    assert "--postprocess-config: --tune searches the settings itself" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(run_copy), "--tune", "--holdout", "1"])
    assert "argument --holdout: expected a fraction in [0, 1), got 1" in capsys.readouterr().err
