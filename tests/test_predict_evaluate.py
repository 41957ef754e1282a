"""End to end: train -> resume -> evaluate -> predict on a tiny generated set, and the CLIs' errors."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from unet import evaluate, postprocess, predict, train
from unet.checkpoint import load_checkpoint, load_model
from unet.data import build_datasets, load_image
from unet.labels import LABELS, NUM_LABELS, PALETTE
from unet.model import to_probabilities

TRAIN_FLAGS = ["--num-images", "8", "--val-fraction", "0.25", "--image-size", "32", "--batch-size", "4",
               "--workers", "0", "--threads", "1", "--lr", "3e-3", "--warmup-steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One epoch, then a resumed second epoch: the checkpoint every other test reads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("run")
    assert train.main([*TRAIN_FLAGS, "--epochs", "1", "--output", str(output)]) == 0
    assert train.main([*TRAIN_FLAGS, "--epochs", "2", "--output", str(output), "--resume", "auto"]) == 0
    yield output / "last.pt"
    torch.set_num_threads(threads)


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
