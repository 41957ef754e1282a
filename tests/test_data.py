"""unet.data and unet.synthetic: the built-in dataset, the file loaders, geometry and splits."""

import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from unet import data
from unet.labels import LABEL_INDEX, LABELS, NUM_LABELS
from unet.synthetic import Canvas, render_figure, romper_panel, sample_body, torso_garment


def reference_boundary(labels: np.ndarray) -> np.ndarray:
    """A pixel is boundary where any 4-neighbour has a different label."""
    boundary = np.zeros(labels.shape, dtype=bool)
    vertical, horizontal = labels[1:] != labels[:-1], labels[:, 1:] != labels[:, :-1]
    boundary[1:] |= vertical
    boundary[:-1] |= vertical
    boundary[:, 1:] |= horizontal
    boundary[:, :-1] |= horizontal
    return boundary


def check_item(item, size):
    assert set(item) == {"image", "labels", "boundary", "name"}
    image, labels, boundary = item["image"], item["labels"], item["boundary"]
    assert image.dtype == torch.float32 and image.shape == (3, size, size)
    assert 0 <= image.min() and image.max() <= 1
    assert labels.dtype == torch.int64 and labels.shape == (size, size)
    assert 0 <= labels.min() and labels.max() < NUM_LABELS
    assert boundary.dtype == torch.float32 and boundary.shape == (1, size, size)
    np.testing.assert_array_equal(boundary[0].numpy(), reference_boundary(labels.numpy()).astype(np.float32))
    assert isinstance(item["name"], str) and item["name"]


# ----------------------------------------------------------------------------- built-in dataset


def test_render_figure_is_deterministic_in_its_rng():
    image_a, labels_a = render_figure(np.random.default_rng(7), 96)
    image_b, labels_b = render_figure(np.random.default_rng(7), 96)
    image_c, labels_c = render_figure(np.random.default_rng(8), 96)
    assert image_a.dtype == np.uint8 and image_a.shape == (96, 96, 3)
    assert labels_a.dtype == np.int64 and labels_a.shape == (96, 96)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert not np.array_equal(labels_a, labels_c)


def test_synthetic_items_depend_only_on_seed_and_index():
    first, again, other = (data.SyntheticClothing(3, 64, seed=s) for s in (5, 5, 6))
    for index in range(3):
        check_item(first[index], 64)
        torch.testing.assert_close(first[index]["image"], again[index]["image"], rtol=0, atol=0)
        assert torch.equal(first[index]["labels"], again[index]["labels"])
        assert not torch.equal(first[index]["labels"], other[index]["labels"])
    assert not torch.equal(first[0]["labels"], first[1]["labels"])


@pytest.mark.parametrize("size", [17, 100, 257])
def test_render_figure_at_any_size(size):
    image, labels = render_figure(np.random.default_rng(3), size)
    assert image.shape == (size, size, 3) and labels.shape == (size, size)
    assert {LABEL_INDEX["skin"], LABEL_INDEX["face"]} <= set(np.unique(labels).tolist())


def test_one_draw_renders_the_same_scene_at_every_size():
    _, small = render_figure(np.random.default_rng(11), 96)
    _, large = render_figure(np.random.default_rng(11), 288)
    # Large pixel 3i+1 has the same centre as small pixel i.
    agreement = (large[1::3, 1::3] == small).mean()
    assert agreement > 0.99


def test_every_label_appears_in_a_modest_sample():
    counts = np.zeros(NUM_LABELS, dtype=int)
    for index in range(150):
        _, labels = render_figure(np.random.default_rng([0, index]), 128)
        counts[np.unique(labels)] += 1
    missing = [LABELS[i] for i in np.flatnonzero(counts == 0)]
    assert not missing
    for name in ("background", "skin", "face", "hair"):
        assert counts[LABEL_INDEX[name]] >= 140, name
    assert counts[LABEL_INDEX["dress"]] >= 20 and counts[LABEL_INDEX["top"]] >= 50


def test_colour_does_not_decide_garment_labels():
    """Mean colours of dresses, tops and skirts spread over the same range."""
    means = {"dress": [], "top": [], "skirt": []}
    for index in range(120):
        image, labels = render_figure(np.random.default_rng([1, index]), 64)
        for name in means:
            mask = labels == LABEL_INDEX[name]
            if mask.sum() > 20:
                means[name].append(image[mask].mean(axis=0))
    spreads = {name: np.std(np.array(values), axis=0).mean() for name, values in means.items()}
    assert all(spread > 35 for spread in spreads.values()), spreads


@pytest.mark.parametrize("seed", range(4))
def test_a_romper_is_a_dress_with_a_notch_between_the_legs(seed):
    body, hem, size = sample_body(np.random.default_rng(seed)), 0.66, 256
    romper, dress = Canvas(size), Canvas(size)
    romper.origin = dress.origin = np.array([0.5, 0.0])
    romper_panel(romper, body, np.random.default_rng(seed), hem, 0, ease=0.01, flare=0.3)
    torso_garment(dress, body, np.random.default_rng(seed), hem, LABEL_INDEX["dress"], 0, ease=0.01, flare=0.3)
    below_neck = slice(int(0.25 * size), int(hem * size))
    is_romper = romper.labels[below_neck] == LABEL_INDEX["rompers"]
    is_dress = dress.labels[below_neck] == LABEL_INDEX["dress"]
    assert not (is_romper & ~is_dress).any()
    assert 0 < (is_dress & ~is_romper).sum() < 0.05 * is_dress.sum()
    near_hem = slice(int(0.62 * size), int(0.65 * size))
    centre = size // 2
    assert (romper.labels[near_hem, centre] == 0).all()
    assert (romper.labels[near_hem, centre - 6] == LABEL_INDEX["rompers"]).all()
    assert (dress.labels[near_hem, centre] == LABEL_INDEX["dress"]).all()


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_images"):
        data.SyntheticClothing(0)
    with pytest.raises(ValueError, match="image_size"):
        data.SyntheticClothing(2, image_size=2.5)
    with pytest.raises(ValueError, match="seed"):
        data.SyntheticClothing(2, seed=-1)
    with pytest.raises(IndexError):
        data.SyntheticClothing(2)[2]
    with pytest.raises(ValueError, match="size"):
        render_figure(np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="val_fraction"):
        data.build_datasets("synthetic", val_fraction=-0.1)


def test_augmented_synthetic_items_keep_the_contract():
    torch.manual_seed(0)
    dataset = data.SyntheticClothing(4, 48, seed=1, augment=True)
    for index in range(len(dataset)):
        check_item(dataset[index], 48)


# ----------------------------------------------------------------------------- geometry

# Well separated colours for a few labels, so a pixel's colour tells its label even after JPEG.
CODED = {0: (0, 0, 0), 1: (255, 0, 0), 4: (0, 200, 0), 7: (0, 0, 255), 13: (255, 255, 255), 21: (255, 255, 0)}
CODED_IDS = np.array(sorted(CODED))
CODED_COLOURS = np.array([CODED[i] for i in CODED_IDS], dtype=np.float32) / 255


def coded_pair(rng, blocks_down, blocks_across, block=12):
    """Labels made of random `block`-sized squares framed by background, and the image whose
    colours encode them. Squares stay at least 4 pixels wide after the strongest downscale the
    tests apply, so their interiors are away from any blending; the frame makes the padding
    colour (the border's) agree with the padding label (background).
    """
    grid = np.zeros((blocks_down, blocks_across), dtype=np.int64)
    grid[1:-1, 1:-1] = rng.choice(CODED_IDS, size=(blocks_down - 2, blocks_across - 2))
    labels = grid.repeat(block, axis=0).repeat(block, axis=1)
    pixels = (CODED_COLOURS[np.searchsorted(CODED_IDS, labels)] * 255).astype(np.uint8)
    return pixels, labels


def decode_colours(image: torch.Tensor) -> np.ndarray:
    distance = ((image.permute(1, 2, 0).numpy()[:, :, None] - CODED_COLOURS) ** 2).sum(-1)
    return CODED_IDS[distance.argmin(-1)]


def interior(labels: np.ndarray) -> np.ndarray:
    """Pixels two steps away from any label change, where resampling cannot blend colours."""
    inside = ~reference_boundary(labels)
    grown = np.pad(inside, 1, constant_values=False)
    return inside & grown[:-2, 1:-1] & grown[2:, 1:-1] & grown[1:-1, :-2] & grown[1:-1, 2:]


def as_tensors(pixels, labels):
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, torch.from_numpy(labels)


def source_of_centre(index: int, count_in: int, count_out: int) -> int:
    """The input pixel whose span [j, j + 1) / count_in holds output pixel `index`'s centre."""
    centre = Fraction(2 * index + 1, 2 * count_out)
    return next(j for j in range(count_in) if Fraction(j, count_in) <= centre < Fraction(j + 1, count_in))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 60), st.integers(1, 60))
def test_resize_labels_copies_the_label_under_each_pixel_centre(height, width, out_height, out_width):
    labels = torch.randint(0, NUM_LABELS, (height, width))
    rows = [source_of_centre(i, height, out_height) for i in range(out_height)]
    cols = [source_of_centre(i, width, out_width) for i in range(out_width)]
    assert torch.equal(data.resize_labels(labels, out_height, out_width), labels[rows][:, cols])


@pytest.mark.parametrize("size", [40, 80])
def test_letterbox_pads_the_short_side_and_keeps_the_aspect(size):
    labels = torch.full((20, 40), LABEL_INDEX["dress"])
    image = torch.full((3, 20, 40), 0.5)
    out_image, out_labels = data.fit_pair(image, labels, size, augment=False)
    band = slice(size // 4, 3 * size // 4)
    assert (out_labels[band] == LABEL_INDEX["dress"]).all()
    assert (out_labels[: size // 4] == 0).all() and (out_labels[3 * size // 4 :] == 0).all()
    torch.testing.assert_close(out_image, torch.full((3, size, size), 0.5))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(3, 5), st.integers(3, 5), st.sampled_from([32, 48]))
def test_augmentation_moves_image_and_labels_together(seed, blocks_down, blocks_across, size):
    pixels, labels = coded_pair(np.random.default_rng(seed), blocks_down, blocks_across)
    torch.manual_seed(seed)
    image, out = data.fit_pair(*as_tensors(pixels, labels), size, augment=True)
    assert image.shape == (3, size, size) and out.shape == (size, size) and out.dtype == torch.int64
    assert set(out.unique().tolist()) <= set(labels.flatten().tolist()) | {0}
    out = out.numpy()
    keep = interior(out)
    np.testing.assert_array_equal(decode_colours(image)[keep], out[keep])


def test_augmentation_flips_and_rescales():
    labels = torch.tensor([[0, 0, 0, 0], [0, 1, 7, 0], [0, 0, 0, 0]]).repeat_interleave(12, 0).repeat_interleave(12, 1)
    image = torch.rand(3, 36, 48)
    torch.manual_seed(0)
    outputs = [data.fit_pair(image, labels, 48, augment=True)[1] for _ in range(40)]
    column = torch.arange(48.0)
    flipped = [(column * (out == 1)).sum() / (out == 1).sum() > (column * (out == 7)).sum() / (out == 7).sum()
               for out in outputs]
    assert 5 <= sum(flipped) <= 35
    areas = [int((out == 1).sum()) for out in outputs]
    assert max(areas) > 2 * min(areas)  # scales 0.75-1.25 give areas 0.56-1.56 of the original
    assert torch.equal(data.fit_pair(image, labels, 48, augment=False)[1][6:42], labels)


def test_split_is_disjoint_complete_and_seeded():
    train, val = (data.split_indices(50, split, 0.2, seed=3) for split in ("train", "val"))
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(50))
    assert val == data.split_indices(50, "val", 0.2, seed=3)
    assert val != data.split_indices(50, "val", 0.2, seed=4)
    assert data.split_indices(50, "all", 0.2, seed=3) == list(range(50))
    assert len(data.split_indices(3, "val", 0.01, seed=0)) == 1
    with pytest.raises(ValueError, match="split"):
        data.split_indices(5, "test", 0.2, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_indices(5, "val", 1.0, 0)


# ----------------------------------------------------------------------------- file loaders


def save_pair(image_path, label_path, pixels, labels):
    if image_path is not None:
        Image.fromarray(pixels).save(image_path, quality=100)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(label_path)


@pytest.fixture
def deepfashion(tmp_path):
    """Five good pairs of 36x48 images, one of each problem case, and an unlabelled image."""
    (tmp_path / "images").mkdir()
    (tmp_path / "segm").mkdir()
    rng = np.random.default_rng(0)
    pairs = {}
    for k in range(5):
        pixels, labels = coded_pair(rng, 3, 4)
        save_pair(tmp_path / f"images/good{k}.jpg", tmp_path / f"segm/good{k}_segm.png", pixels, labels)
        pairs[f"good{k}"] = labels
    pixels, labels = coded_pair(rng, 3, 4)
    (tmp_path / "images/broken.jpg").write_bytes(b"this is not a jpeg")
    save_pair(None, tmp_path / "segm/broken_segm.png", pixels, labels)
    save_pair(tmp_path / "images/mismatch.jpg", tmp_path / "segm/mismatch_segm.png", pixels, labels[:, :24])
    save_pair(None, tmp_path / "segm/orphan_segm.png", pixels, labels)
    Image.fromarray(pixels).save(tmp_path / "images/colour.jpg")
    Image.fromarray(pixels).save(tmp_path / "segm/colour_segm.png")
    labels_out_of_range = labels.copy()
    labels_out_of_range[5, 5] = 30
    save_pair(tmp_path / "images/badid.jpg", tmp_path / "segm/badid_segm.png", pixels, labels_out_of_range)
    Image.fromarray(pixels).save(tmp_path / "images/unlabelled.jpg")
    return tmp_path, pairs


def load_all(dataset):
    return {item["name"]: item for item in (dataset[i] for i in range(len(dataset)))}


def test_deepfashion_skips_bad_pairs_with_one_warning(deepfashion):
    root, pairs = deepfashion
    with pytest.warns(UserWarning, match=r"skipped 4 of 10 files") as caught:
        dataset = data.DeepFashionMultiModal(root, image_size=48, split="all")
    message = str(caught[0].message)
    assert f"unreadable image '{root / 'images/broken.jpg'}'" in message
    assert f"no image for label map '{root / 'segm/orphan_segm.png'}'" in message
    assert f"size mismatch: image '{root / 'images/mismatch.jpg'}' is 48x36, label map 24x36" in message
    assert f"label map '{root / 'segm/colour_segm.png'}' has mode RGB" in message
    assert sorted(name for name, _ in dataset.skipped) == ["broken", "colour", "mismatch", "orphan"]
    assert sorted(name for name, _, _ in dataset.pairs) == sorted([*pairs, "badid"])


def test_deepfashion_items_are_letterboxed_exactly(deepfashion):
    root, pairs = deepfashion
    with pytest.warns(UserWarning):
        dataset = data.DeepFashionMultiModal(root, image_size=48, split="all")
    good = [i for i, (name, _, _) in enumerate(dataset.pairs) if name in pairs]
    for index in good:
        item = dataset[index]
        check_item(item, 48)
        expected = np.zeros((48, 48), dtype=np.int64)
        expected[6:42] = pairs[item["name"]]
        np.testing.assert_array_equal(item["labels"].numpy(), expected)
        keep = interior(expected)
        np.testing.assert_array_equal(decode_colours(item["image"])[keep], expected[keep])


def test_out_of_range_ids_are_an_error_naming_the_file(deepfashion):
    root, _ = deepfashion
    with pytest.warns(UserWarning):
        dataset = data.DeepFashionMultiModal(root, image_size=48, split="all")
    index = next(i for i, (name, _, _) in enumerate(dataset.pairs) if name == "badid")
    with pytest.raises(ValueError, match=r"badid_segm\.png.*\[30\] out of range"):
        dataset[index]
    with pytest.warns(UserWarning, match="skipped 5 of 10") as caught:
        checked = data.DeepFashionMultiModal(root, image_size=48, split="all", check_labels=True)
    assert "badid_segm.png': ids [30] out of range" in str(caught[0].message)
    assert "badid" not in {name for name, _, _ in checked.pairs}


def test_deepfashion_split_is_disjoint_and_seeded(deepfashion):
    root, _ = deepfashion
    with pytest.warns(UserWarning):
        splits = {s: data.DeepFashionMultiModal(root, 32, s, val_fraction=0.3, seed=1) for s in ("train", "val", "all")}
        again = data.DeepFashionMultiModal(root, 32, "val", val_fraction=0.3, seed=1)
    names = {s: {name for name, _, _ in d.pairs} | {name for name, _ in d.skipped} for s, d in splits.items()}
    assert len(names["val"]) == 3 and not names["train"] & names["val"]
    assert names["train"] | names["val"] == names["all"]
    assert again.pairs == splits["val"].pairs


def test_label_folder_maps_ids_by_name(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    ids = np.zeros((24, 24), dtype=np.int64)
    ids[4:20, 2:12], ids[4:20, 12:22] = 1, 2
    pixels = np.full((24, 24, 3), 128, dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "images/look.png")
    palette = Image.fromarray(ids.astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    palette.save(tmp_path / "labels/look.png")
    dataset = data.LabelFolder(tmp_path / "images", tmp_path / "labels", ["background", "dress", "wrist wearing"],
                               image_size=24, split="all")
    item = dataset[0]
    check_item(item, 24)
    expected = np.array([0, LABEL_INDEX["dress"], LABEL_INDEX["wrist wearing"]])[ids]
    np.testing.assert_array_equal(item["labels"].numpy(), expected)
    assert item["name"] == "look"
    short = data.LabelFolder(tmp_path / "images", tmp_path / "labels", ["background", "dress"], 24, "all")
    with pytest.raises(ValueError, match=r"look\.png.*\[2\] out of range, expected 0\.\.1"):
        short[0]
    with pytest.raises(ValueError, match="label_names.*'shirt'"):
        data.LabelFolder(tmp_path / "images", tmp_path / "labels", ["background", "shirt"])
    with pytest.raises(TypeError, match="label_names"):
        data.LabelFolder(tmp_path / "images", tmp_path / "labels", "background")


def test_build_datasets_recognises_each_layout(deepfashion, tmp_path_factory):
    train, val = data.build_datasets("synthetic", image_size=32, seed=2, num_synthetic=20, val_fraction=0.25)
    assert (len(train), len(val)) == (20, 5) and train.augment and not val.augment
    assert not torch.equal(train[0]["labels"], val[0]["labels"])
    root, _ = deepfashion
    with pytest.warns(UserWarning):
        train, val = data.build_datasets(str(root), image_size=32, val_fraction=0.3)
    assert isinstance(train, data.DeepFashionMultiModal) and train.augment and not val.augment
    folder = tmp_path_factory.mktemp("folder")
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    pixels, labels = coded_pair(np.random.default_rng(1), 3, 3)
    for k in range(4):
        save_pair(folder / f"images/{k}.png", folder / f"labels/{k}.png", pixels, (labels > 0).astype(np.int64))
    (folder / "label_names.txt").write_text("background\ntop\n")
    train, val = data.build_datasets(str(folder), image_size=36, val_fraction=0.25, augment=False)
    assert isinstance(train, data.LabelFolder) and (len(train), len(val)) == (3, 1)
    assert set(train[0]["labels"].unique().tolist()) == {0, LABEL_INDEX["top"]}


def test_build_datasets_rejects_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="data: .*does not exist"):
        data.build_datasets(str(tmp_path / "nowhere"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="data: .*is not a directory"):
        data.build_datasets(str(tmp_path / "file.txt"))
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"data: .*neither images/ \+ segm/"):
        data.build_datasets(str(tmp_path))
    (tmp_path / "segm").mkdir()
    with pytest.raises(ValueError, match="root: no '\\*_segm.png'"):
        data.build_datasets(str(tmp_path))


def test_load_image_reads_rgb_and_names_bad_files(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "ok.png")
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "gray.png")
    image = data.load_image(tmp_path / "ok.png")
    assert image.dtype == torch.float32 and image.shape == (3, 5, 7)
    np.testing.assert_array_equal((image * 255).round().byte().permute(1, 2, 0).numpy(), pixels)
    assert data.load_image(tmp_path / "gray.png").shape == (3, 5, 7)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"cannot read image '.*bad\.jpg'"):
        data.load_image(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.load_image(tmp_path / "missing.png")
    # A header that opens, then a body that ends early: found only when decoding.
    Image.fromarray(np.repeat(pixels, 20, axis=0)).save(tmp_path / "cut.jpg")
    whole = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cannot read image '.*cut\.jpg'.*[Tt]runcated"):
        data.load_image(tmp_path / "cut.jpg")


def test_datasets_survive_pickling_for_loader_workers(deepfashion):
    root, _ = deepfashion
    with pytest.warns(UserWarning):
        datasets = [data.DeepFashionMultiModal(root, 32, "all"), data.SyntheticClothing(2, 32, seed=4)]
    for dataset in datasets:
        copy = pickle.loads(pickle.dumps(dataset))
        assert len(copy) == len(dataset)
        assert torch.equal(copy[1]["labels"], dataset[1]["labels"])
    batch = next(iter(torch.utils.data.DataLoader(datasets[1], batch_size=2)))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["boundary"].shape == (2, 1, 32, 32)
    assert batch["name"] == ["synthetic-4-000000", "synthetic-4-000001"]
