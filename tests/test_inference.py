"""unet.inference: padding, resizing, probabilities, label maps, whole images and confusion matrices,
each against a direct computation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unet import inference, postprocess
from unet.labels import NUM_LABELS
from unet.model import build_model, to_probabilities
from unet.postprocess_config import PostprocessConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", image_size=32).eval()


def random_probabilities(batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(batch, NUM_LABELS, height, width, generator=generator) ** 4
    boundary = torch.rand(batch, 1, height, width, generator=generator) ** 3
    return probs / probs.sum(1, keepdim=True), boundary


def padded_by_hand(model, images):
    """The model on images padded by hand (edge replication) to a multiple of 8, cropped back."""
    height, width = images.shape[-2:]
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (0, -height % 8), (0, -width % 8)), mode="edge")
    with torch.no_grad():
        probs, boundary = to_probabilities(model(torch.from_numpy(padded)))
    return probs[..., :height, :width], boundary[..., :height, :width]


def test_pad_to_multiple_replicates_the_edge():
    images = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    padded = inference.pad_to_multiple(images, 4)
    assert padded.shape == (2, 3, 8, 8)
    expected = np.pad(images.numpy(), ((0, 0), (0, 0), (0, 3), (0, 2)), mode="edge")
    assert np.array_equal(padded.numpy(), expected)
    assert inference.pad_to_multiple(images[..., :4, :4], 4).shape == (2, 3, 4, 4)


@pytest.mark.parametrize("size, shrinking", [((13, 7), True), ((40, 50), False), ((20, 20), False), ((13, 50), True)])
def test_resize_is_bilinear_antialiased_when_shrinking_for_any_leading_dims(size, shrinking):
    images = torch.rand(2, 5, 3, 20, 20)
    resized = inference.resize(images, *size)
    expected = F.interpolate(images.reshape(10, 3, 20, 20), size=size, mode="bilinear", antialias=shrinking)
    assert resized.shape == (2, 5, 3, *size)
    assert torch.equal(resized, expected.reshape(2, 5, 3, *size))
    assert torch.equal(inference.resize(images[0, 0], *size), expected[0])  # a single (C, H, W) image
    assert resized.min() >= -1e-6 and resized.max() <= 1 + 1e-6  # stays in the input's range
    assert inference.resize(images, 20, 20) is images


@pytest.mark.parametrize("height, width", [(150, 170), (64, 48), (64, 97)])
def test_enlarging_without_antialiasing_equals_antialiased(height, width):
    maps = torch.rand(5, 64, 48)
    antialiased = F.interpolate(maps[None], size=(height, width), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(inference.resize(maps, height, width), antialiased, atol=2e-5, rtol=0)


def test_predict_probabilities_pads_and_crops_back(model):
    images = torch.rand(2, 3, 21, 30)
    probs, boundary = inference.predict_probabilities(model, images)
    expected_probs, expected_boundary = padded_by_hand(model, images)
    assert probs.shape == (2, NUM_LABELS, 21, 30) and boundary.shape == (2, 1, 21, 30)
    assert probs.dtype == boundary.dtype == torch.float32
    torch.testing.assert_close(probs, expected_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(boundary, expected_boundary, rtol=0, atol=1e-6)
    channels_last, _ = inference.predict_probabilities(model, images, channels_last=True)
    torch.testing.assert_close(channels_last, expected_probs, rtol=1e-4, atol=1e-5)


def test_label_map_argmax_and_dust_fill_match_the_post_processing_module():
    probs, boundary = random_probabilities(2, 24, 31)
    argmax = inference.label_map("argmax", probs, boundary)
    assert argmax.dtype == torch.int64 and torch.equal(argmax, probs.argmax(1))
    dust_fill, regions = inference.label_map("dust_fill", probs, boundary, return_regions=True)
    expected, expected_regions = postprocess.postprocess(probs, boundary, return_regions=True)
    assert torch.equal(dust_fill, expected) and torch.equal(regions, expected_regions)
    assert torch.equal(inference.label_map("dust_fill", probs, boundary), expected)


def test_label_map_argmax_regions_are_the_boundary_segmentation_of_dust_fill():
    probs, boundary = random_probabilities(3, 40, 50, seed=1)
    labels, regions = inference.label_map("argmax", probs, boundary, return_regions=True)
    _, dust_fill_regions = inference.label_map("dust_fill", probs, boundary, return_regions=True)
    assert torch.equal(labels, probs.argmax(1))
    assert regions.dtype == torch.int32 and torch.equal(regions, dust_fill_regions)
    assert int(regions.max()) >= 1 and bool((regions == -1).any())  # several regions and some boundary


def test_label_map_post_processes_with_the_settings_given():
    probs, boundary = random_probabilities(2, 30, 26, seed=4)
    config = PostprocessConfig(boundary_threshold=0.3, gap_iterations=1, min_size=0, new_threshold=0.8,
                               join_threshold=0.3, impatience=3.0, boundary_method="close_gaps")
    labels, regions = inference.label_map("dust_fill", probs, boundary, return_regions=True, postprocess_config=config)
    expected, expected_regions = postprocess.postprocess(probs, boundary, 0.3, 1, 0, 0.8, 0.3, 3.0,
                                                         boundary_method="close_gaps", return_regions=True)
    assert torch.equal(labels, expected) and torch.equal(regions, expected_regions)
    assert not torch.equal(regions, postprocess.boundary_regions(boundary))  # the settings mattered
    argmax, argmax_regions = inference.label_map("argmax", probs, boundary, return_regions=True,
                                                 postprocess_config=config)
    assert torch.equal(argmax, probs.argmax(1)) and torch.equal(argmax_regions, expected_regions)


def test_crop_leaves_out_a_frame():
    maps = torch.arange(2 * 6 * 7).reshape(2, 6, 7)
    assert torch.equal(inference.crop(maps, 2), maps[:, 2:4, 2:5])
    assert inference.crop(maps, 0) is maps
    with pytest.raises(ValueError, match=r"interior: expected a frame width in \[0, 2\] for 6x7 images, got 3"):
        inference.crop(maps, 3)


def test_label_map_rejects_an_unknown_method():
    probs, boundary = random_probabilities(1, 8, 8)
    with pytest.raises(ValueError, match=r"postprocess: expected one of \('argmax', 'dust_fill'\), got 'vote'"):
        inference.label_map("vote", probs, boundary)


@pytest.mark.parametrize("method", ["argmax", "dust_fill"])
def test_predict_images_keeps_each_size_and_matches_one_image_at_a_time(model, method):
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 21, 30, generator=generator), torch.rand(3, 16, 16, generator=generator),
              torch.rand(3, 21, 30, generator=generator)]
    results = inference.predict_images(model, images, "cpu", method=method)
    for image, (labels, regions) in zip(images, results):
        probs, boundary = padded_by_hand(model, image[None])
        expected_labels, expected_regions = inference.label_map(method, probs, boundary, return_regions=True)
        assert labels.shape == regions.shape == image.shape[1:]
        near_tie = (probs[0].topk(2, dim=0).values.diff(dim=0).abs()[0] < 1e-5)  # batching may move the last bits
        assert torch.equal(labels[~near_tie], expected_labels[0][~near_tie])
        if method == "dust_fill":
            assert torch.equal(regions, expected_regions[0])


def test_predict_images_at_max_size_resizes_there_and_back(model):
    image = torch.rand(3, 37, 45)
    [(labels, _)] = inference.predict_images(model, [image], "cpu", method="argmax", max_size=32)
    small = F.interpolate(image[None], size=(26, 32), mode="bilinear", antialias=True)
    probs, _ = padded_by_hand(model, small)
    probs = F.interpolate(probs, size=(37, 45), mode="bilinear")
    assert labels.shape == (37, 45) and torch.equal(labels, probs[0].argmax(0))


def test_confusion_matrices_count_every_pixel_once_and_restore_the_mode(model):
    generator = torch.Generator().manual_seed(3)
    batches = [{"image": torch.rand(2, 3, 16, 24, generator=generator),
                "labels": torch.randint(0, NUM_LABELS, (2, 16, 24), generator=generator)} for _ in range(2)]
    model.train()
    matrices = inference.confusion_matrices(model, batches, "cpu", methods=("argmax", "dust_fill"), progress=False)
    assert model.training
    model.eval()
    for method, matrix in matrices.items():
        expected = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
        for batch in batches:
            probs, boundary = padded_by_hand(model, batch["image"])
            predicted = inference.label_map(method, probs, boundary)
            np.add.at(expected, (batch["labels"].numpy().ravel(), predicted.numpy().ravel()), 1)
        assert np.array_equal(matrix.matrix.numpy(), expected), method
        assert int(matrix.matrix.sum()) == 2 * 2 * 16 * 24


def test_confusion_matrices_with_settings_and_an_interior_count_the_cropped_maps(model):
    generator = torch.Generator().manual_seed(5)
    batches = [{"image": torch.rand(3, 3, 20, 24, generator=generator),
                "labels": torch.randint(0, NUM_LABELS, (3, 20, 24), generator=generator)}]
    config = PostprocessConfig(boundary_threshold=0.2, min_size=0)
    matrices = inference.confusion_matrices(model, batches, "cpu", methods=("argmax", "dust_fill"), progress=False,
                                            postprocess_config=config, interior=3)
    probs, boundary = padded_by_hand(model, batches[0]["image"])
    predicted = {"argmax": probs.argmax(1), "dust_fill": postprocess.postprocess(probs, boundary, **config.kwargs())}
    for method, labels in predicted.items():
        expected = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
        np.add.at(expected, (batches[0]["labels"][:, 3:-3, 3:-3].numpy().ravel(), labels[:, 3:-3, 3:-3].numpy().ravel()), 1)
        assert np.array_equal(matrices[method].matrix.numpy(), expected), method
