"""unet.app without a browser: the head oval against the training data, the crop geometry, the
segmentation against the post-processing it wraps, the edits and downloads, and every kind of
bad input over HTTP (Starlette's TestClient on the real application and a real, small model).
The page itself is driven in Chromium by tests/test_app_browser.py."""

import io
import logging
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch

starlette = pytest.importorskip("starlette", reason="the app's dependencies: pip install -e '.[app]'")
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from unet import postprocess  # noqa: E402
from unet.app import __main__ as cli  # noqa: E402
from unet.app import segmentation, server  # noqa: E402
from unet.app.photos import BadInput, decode_photo  # noqa: E402
from unet.app.segmentation import HEAD_OVAL, Crop, model_input, segment_photo  # noqa: E402
from unet.checkpoint import save_checkpoint  # noqa: E402
from unet.inference import predict_probabilities, resize  # noqa: E402
from unet.labels import LABEL_INDEX, LABELS, NUM_LABELS, PALETTE  # noqa: E402
from unet.model import build_model  # noqa: E402
from unet.synthetic import render_figure  # noqa: E402

CPU = torch.device("cpu")


def encode(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def figure_photo(width: int = 320, height: int = 240, seed: int = 3) -> Image.Image:
    """A synthetic figure on a landscape photo (the figure's own backdrop extended)."""
    side = min(width, height)
    pixels, _ = render_figure(np.random.default_rng(seed), side)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = pixels[0, 0]
    left = (width - side) // 2
    canvas[:, left:left + side] = pixels[:height]
    return Image.fromarray(canvas)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", image_size=64).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "best.pt"
    return save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)


@pytest.fixture()
def client(model, checkpoint):
    app = server.create_app(model, "cpu", str(checkpoint))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photo_jpeg():
    return encode(figure_photo(), quality=95)


def upload(client, data: bytes, name: str = "photo.jpg"):
    return client.post("/api/images", content=data, headers={"X-Filename": name})


def segment(client, image_id: str, crop=None):
    return client.post("/api/segment", json={"image": image_id, "crop": crop or {"x": 40, "y": -20, "side": 260}})


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"]
    return body["error"]


def app_warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "unet.app" and r.levelno >= logging.WARNING)


# ----------------------------------------------------------------------------- the head oval


def test_the_head_oval_is_where_and_as_large_as_heads_are_in_the_training_figures():
    """Re-measure the oval on the built-in data: hair/headwear top to chin, as fractions of the side."""
    size, boxes = 128, []
    for index in range(120):
        _, labels = render_figure(np.random.default_rng([7, index]), size)
        face = labels == LABEL_INDEX["face"]
        head = face | (labels == LABEL_INDEX["hair"]) | (labels == LABEL_INDEX["headwear"])
        top, chin = np.flatnonzero(head.any(1))[0], np.flatnonzero(face.any(1))[-1]
        columns = np.flatnonzero(head[top:chin + 1].any(0))
        boxes.append(((top + chin + 1) / 2, chin + 1 - top, columns[-1] + 1 - columns[0]))
    centre_y, height, width = np.median(boxes, axis=0) / size
    assert height == pytest.approx(HEAD_OVAL.height, abs=0.01)
    assert centre_y == pytest.approx(HEAD_OVAL.centre_y, abs=0.01)
    assert width == pytest.approx(HEAD_OVAL.width, abs=0.015)


def test_a_scaled_oval_keeps_its_proportions_and_stays_in_the_frame():
    larger = HEAD_OVAL.scaled(0.5)
    assert larger.width / larger.height == pytest.approx(HEAD_OVAL.width / HEAD_OVAL.height)
    assert larger.centre_y - larger.height / 2 >= 0
    assert HEAD_OVAL.scaled(HEAD_OVAL.height) == HEAD_OVAL


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("value, message", [
    (None, "expected an object"),
    ({"x": 0, "y": 0}, "crop.side: expected a finite number"),
    ({"x": float("nan"), "y": 0, "side": 10}, "crop.x: expected a finite number"),
    ({"x": True, "y": 0, "side": 10}, "crop.x"),
    ({"x": 0, "y": 0, "side": 0}, "crop.side: expected 1 to"),
    ({"x": 0, "y": 0, "side": 10**9}, "crop.side: expected 1 to"),
    ({"x": 500, "y": 0, "side": 50}, "does not cover the photo"),
    ({"x": -60, "y": -60, "side": 50}, "does not cover the photo"),
])
def test_bad_crops_are_refused_with_a_message(value, message):
    with pytest.raises(BadInput, match=message):
        Crop.from_request(value, (320, 240))


def test_model_input_places_the_photo_in_the_frame_and_pads_with_its_backdrop():
    photo = decode_photo(encode(figure_photo(100, 50), "PNG"), "p.png")
    frame, (top, left, bottom, right) = model_input(photo, Crop(-50, 0, 200), 64)
    # the photo (100 x 50) covers x 50..150 and y 0..50 of the 200-pixel frame: scale 0.32
    assert (top, left, bottom, right) == (0, 16, 16, 48)
    assert frame.shape == (1, 3, 64, 64)
    pixels = torch.from_numpy(photo.pixels).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(frame[0, :, :16, 16:48], resize(pixels, 16, 32).clamp(0, 1))
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[:16, 16:48] = False
    assert torch.equal(frame[0][:, outside], photo.fill[:, None].expand(3, int(outside.sum())))


def test_the_result_covers_the_photo_part_of_the_frame_at_photo_resolution_up_to_the_cap(model, monkeypatch):
    photo = decode_photo(encode(figure_photo()), "p.jpg")
    result = segment_photo(model, photo, Crop(40, -20, 260), CPU)
    assert result.box == (40, 0, 300, 240) and result.masks.shape == (240, 260)
    monkeypatch.setattr(segmentation, "RESULT_MAX_SIDE", 100)
    capped = segment_photo(model, photo, Crop(40, -20, 260), CPU)
    assert capped.box == (40, 0, 300, 240) and capped.masks.shape == (92, 100)


# ----------------------------------------------------------------------------- segmentation


def test_the_segmentation_is_the_dust_fill_of_the_photo_part_of_the_frame(model):
    photo = decode_photo(encode(figure_photo()), "p.jpg")
    crop = Crop(40, -20, 260)
    result = segment_photo(model, photo, crop, CPU)
    # the same chain by hand: network on the frame, the photo part resized back, the plain post-processing
    frame, (top, left, bottom, right) = model_input(photo, crop, model.config.image_size)
    probs, boundary = predict_probabilities(model, frame)
    height, width = result.masks.shape
    probs = resize(probs[0, :, top:bottom, left:right], height, width)
    boundary = resize(boundary[0, :, top:bottom, left:right], height, width)
    expected = postprocess.postprocess(probs, boundary).numpy()
    assert np.array_equal(result.labels(), expected)

    counts = np.bincount(result.masks.ravel(), minlength=len(result.pixel_counts))
    assert np.array_equal(result.pixel_counts, counts) and counts.sum() == height * width
    assert result.num_segment_regions == len(result.pixel_counts) - NUM_LABELS
    present = result.region_ids()
    np.testing.assert_allclose(result.shares[present].sum(1), 1.0)
    assert np.array_equal(result.shares[present].argmax(1), result.mask_labels[present])


def test_describe_lists_every_region_with_its_label_confidence_and_shares(model):
    result = segment_photo(model, decode_photo(encode(figure_photo()), "p.jpg"), Crop(40, -20, 260), CPU)
    described = result.describe()
    assert [region["id"] for region in described["regions"]] == result.region_ids().tolist()
    for region in described["regions"]:
        assert region["label"] == result.mask_labels[region["id"]]
        assert region["confidence"] == pytest.approx(max(region["shares"]), abs=1e-4)
        assert region["pixels"] == result.pixel_counts[region["id"]]
        assert region["promoted"] == (region["id"] >= result.num_segment_regions)


def test_promoted_masks_offer_alternatives_from_their_pixels_probabilities():
    """A promoted mask's statistics are one-hot; its shares are its pixels' pooled probabilities."""
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 5)).transpose(2, 0, 1)
    masks = np.array([[0] * 5, [1, 1, 3, 3, 1], [1, 1, 3, 1, 1]], np.int32)  # region 0 and 1; mask 3 = 2 + label 1
    statistics = np.zeros((2 + 4, 4))
    statistics[0], statistics[1] = [1, 2, 3, 4], [4, 0, 0, 0]
    statistics[2 + np.arange(4), np.arange(4)] = 1
    shares = segmentation._pooled_shares(masks, statistics, probs, num_regions=2)
    np.testing.assert_allclose(shares[0], [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(shares[1], [1, 0, 0, 0])
    pooled = probs[:, masks == 3].sum(1)
    np.testing.assert_allclose(shares[3], pooled / pooled.sum())
    np.testing.assert_allclose(shares[[2, 4, 5]], np.eye(4)[[0, 2, 3]])  # empty promoted masks keep theirs


# ----------------------------------------------------------------------------- edits and downloads


@pytest.fixture(scope="module")
def result(model):
    return segment_photo(model, decode_photo(encode(figure_photo()), "p.jpg"), Crop(40, -20, 260), CPU)


def test_edits_apply_in_order_and_say_what_they_changed(result):
    region = int(result.region_ids()[0])
    original = int(result.mask_labels[region])
    first, second = (original + 1) % NUM_LABELS, (original + 2) % NUM_LABELS
    mask_labels, applied = result.apply_edits([{"region": region, "label": first}, {"region": region, "label": second}])
    assert [(edit["from"], edit["to"]) for edit in applied] == [(original, first), (first, second)]
    labels = result.labels(mask_labels)
    inside = result.masks == region
    assert (labels[inside] == second).all()
    assert np.array_equal(labels[~inside], result.labels()[~inside])


@pytest.mark.parametrize("edits, message", [
    ({"region": 0}, "expected a list"),
    ([[0, 1]], r"edits\[0\]: expected"),
    ([{"region": "0", "label": 1}], r"edits\[0\].region: expected a region id"),
    ([{"region": 10**6, "label": 1}], r"edits\[0\]: unknown region id 1000000"),
    ([{"region": -1, "label": 1}], "unknown region id -1"),
    ([{"region": 0, "label": 24}], r"edits\[0\].label: expected a label id 0 to 23"),
    ([{"region": 0, "label": False}], "label id"),
])
def test_bad_edits_are_refused_with_a_message(result, edits, message):
    with pytest.raises(BadInput, match=message):
        result.apply_edits(edits)


def test_an_empty_mask_is_an_unknown_region(result):
    empty = int(np.flatnonzero(result.pixel_counts == 0)[0])
    with pytest.raises(BadInput, match=f"unknown region id {empty};"):
        result.apply_edits([{"region": empty, "label": 1}])


def test_the_label_map_png_holds_label_ids_with_the_palette_and_the_region_png_mask_ids(result):
    mask_labels, _ = result.apply_edits([{"region": int(result.region_ids()[-1]), "label": 7}])
    with Image.open(io.BytesIO(result.label_png(mask_labels))) as image:
        assert image.mode == "P"
        assert np.array_equal(np.asarray(image), result.labels(mask_labels))
        assert np.array_equal(np.array(image.getpalette()[:3 * NUM_LABELS]).reshape(-1, 3), PALETTE)
    with Image.open(io.BytesIO(result.region_png())) as image:
        assert np.array_equal(np.asarray(image).astype(np.int64), result.masks)


# ----------------------------------------------------------------------------- HTTP: the happy path


def test_page_and_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text
    for asset in ("app.js", "app.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http" not in page.text.replace('href="data:,"', "")  # nothing from the internet
    config = client.get("/api/config").json()
    assert config["model_input"] == 64 and len(config["labels"]) == NUM_LABELS
    assert config["head_oval"]["height"] == HEAD_OVAL.height


def test_upload_segment_relabel_and_download_over_http(client, photo_jpeg):
    described = upload(client, photo_jpeg).json()
    assert (described["width"], described["height"], described["downscaled"]) == (320, 240, False)
    shown = client.get(f"/api/images/{described['id']}")
    assert shown.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(shown.content)).size == (320, 240)

    answer = segment(client, described["id"])
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["box"] == [40, 0, 300, 240] and (result["width"], result["height"]) == (260, 240)
    raw = client.get(f"/api/segmentations/{result['id']}/masks")
    masks = np.frombuffer(raw.content, "<i4").reshape(result["height"], result["width"])
    with Image.open(io.BytesIO(client.get(f"/api/segmentations/{result['id']}/regions.png").content)) as image:
        assert np.array_equal(np.asarray(image), masks)

    region = max(result["regions"], key=lambda region: region["pixels"])
    new_label = (region["label"] + 5) % NUM_LABELS
    edits = {"edits": [{"region": region["id"], "label": new_label}]}

    def label_map(body):
        response = client.post(f"/api/segmentations/{result['id']}/labels.png", json=body)
        return np.asarray(Image.open(io.BytesIO(response.content)))

    before, after = label_map({"edits": []}), label_map(edits)
    assert np.array_equal(before != after, masks == region["id"])
    assert (after[masks == region["id"]] == new_label).all()

    document = client.post(f"/api/segmentations/{result['id']}/edits.json", json=edits).json()
    assert document["edits"] == [{"region": region["id"], "from": region["label"], "to": new_label,
                                  "from_name": LABELS[region["label"]], "to_name": LABELS[new_label]}]
    assert document["box"] == {"x0": 40, "y0": 0, "x1": 300, "y1": 240}
    assert document["crop"] == {"x": 40, "y": -20, "side": 260}
    assert document["photo"]["name"] == "photo.jpg"


# ----------------------------------------------------------------------------- HTTP: bad input


def tiny_png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data: enough for the size check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, name, message", [
    (b"name,size\nshirt,M\n", "sizes.csv", "sizes.csv: not a JPEG, PNG or WebP image"),
    (b"", "empty.jpg", "empty.jpg: the file is empty"),
    (encode(Image.new("RGB", (8, 8)), "GIF"), "anim.gif", "not a JPEG, PNG or WebP image"),
    (tiny_png_header(13_000, 13_000), "huge.png",
     "huge.png: too large, at most 150000000 pixels are accepted (13000x13000 is 169000000 pixels)"),
    (tiny_png_header(20_000, 20_000), "huger.png", "huger.png: too large, at most 150000000 pixels are accepted"),
])
def test_uploads_that_are_not_usable_photos_get_a_clear_message(client, caplog, data, name, message):
    caplog.set_level(logging.WARNING, logger="unet.app")
    assert message in error_of(upload(client, data, name), 400)
    assert message in app_warnings(caplog)
    assert client.get("/api/config").status_code == 200  # the server lives on


def test_a_truncated_photo_gets_a_clear_message(client, caplog, photo_jpeg):
    caplog.set_level(logging.WARNING, logger="unet.app")
    error = error_of(upload(client, photo_jpeg[: len(photo_jpeg) // 2], "cut.jpg"), 400)
    assert error.startswith("cut.jpg: cannot decode the image, the file may be truncated or damaged")
    assert "cut.jpg" in app_warnings(caplog)
    png = encode(figure_photo(), "PNG")
    assert "truncated or damaged" in error_of(upload(client, png[:-200], "cut.png"), 400)


def test_an_upload_over_the_size_limit_is_refused_while_it_streams(client, caplog, monkeypatch, photo_jpeg):
    caplog.set_level(logging.WARNING, logger="unet.app")
    monkeypatch.setattr(server, "MAX_UPLOAD_BYTES", 1000)
    assert "larger than the 1000 bytes accepted" in error_of(upload(client, photo_jpeg, "big.jpg"), 413)
    assert "413" in app_warnings(caplog)


@pytest.mark.slow
def test_a_10000_by_10000_photo_is_decoded_at_reduced_scale_within_the_limit(client):
    big = Image.new("L", (10_000, 10_000), 90)
    big.paste(255, (2_000, 3_000, 8_000, 9_000))
    started = time.perf_counter()
    described = upload(client, encode(big, quality=80), "big.jpg").json()
    seconds = time.perf_counter() - started
    assert (described["original_width"], described["original_height"]) == (10_000, 10_000)
    assert (described["width"], described["height"], described["downscaled"]) == (4096, 4096, True)
    shown = np.asarray(Image.open(io.BytesIO(client.get(f"/api/images/{described['id']}").content)))
    assert shown.shape == (4096, 4096, 3)
    assert abs(int(shown[2048, 2048, 0]) - 255) <= 3 and abs(int(shown[100, 100, 0]) - 90) <= 3  # the same picture
    assert segment(client, described["id"], {"x": 0, "y": 0, "side": 4096}).status_code == 200
    print(f"10,000 x 10,000 JPEG upload and decode: {seconds:.2f} s")


def test_a_photo_with_exif_rotation_is_stored_upright(client):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    described = upload(client, encode(image, exif=exif.tobytes()), "turned.jpg").json()
    assert (described["width"], described["height"]) == (20, 40)


@pytest.mark.parametrize("body, status, message", [
    ({"image": "nope", "crop": {"x": 0, "y": 0, "side": 10}}, 404, "unknown photo 'nope'"),
    ({"crop": {}}, 400, 'expected {"image": photo id'),
    ("[1, 2", 400, "not JSON"),
])
def test_bad_segment_requests_get_a_clear_message(client, caplog, body, status, message):
    caplog.set_level(logging.WARNING, logger="unet.app")
    if isinstance(body, str):
        response = client.post("/api/segment", content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post("/api/segment", json=body)
    assert message in error_of(response, status)
    assert message in app_warnings(caplog)


def test_a_frame_beside_the_photo_gets_a_clear_message(client, photo_jpeg):
    image_id = upload(client, photo_jpeg).json()["id"]
    error = error_of(segment(client, image_id, {"x": 1000, "y": 0, "side": 100}), 400)
    assert "does not cover the photo" in error


def test_unknown_region_and_segmentation_ids_get_a_clear_message(client, caplog, photo_jpeg):
    caplog.set_level(logging.WARNING, logger="unet.app")
    result = segment(client, upload(client, photo_jpeg).json()["id"]).json()
    bad = {"edits": [{"region": 999_999, "label": 3}]}
    for download in ("labels.png", "edits.json"):
        error = error_of(client.post(f"/api/segmentations/{result['id']}/{download}", json=bad), 400)
        assert error.startswith("edits[0]: unknown region id 999999; this segmentation has")
    assert "unknown region id 999999" in app_warnings(caplog)
    error = error_of(client.get("/api/segmentations/0123/masks"), 404)
    assert "unknown segmentation '0123'" in error and "segment it again" in error


class BlockingModel(torch.nn.Module):
    """Wraps a model; its forward waits until released, so a second request arrives while it runs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.input_multiple = model, model.config, model.input_multiple
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.release.wait(timeout=30)
        return self.model(x)


def test_a_segmentation_while_another_runs_is_answered_409_and_both_sides_survive(model, photo_jpeg, caplog):
    caplog.set_level(logging.WARNING, logger="unet.app")
    blocking = BlockingModel(model)
    with TestClient(server.create_app(blocking, "cpu", "blocking.pt"), raise_server_exceptions=False) as client:
        image_id = upload(client, photo_jpeg).json()["id"]
        first = {}
        runner = threading.Thread(target=lambda: first.update(response=segment(client, image_id)))
        runner.start()
        assert blocking.entered.wait(timeout=30)
        error = error_of(segment(client, image_id), 409)
        assert error.startswith("busy: another segmentation has been running for")
        assert "busy" in app_warnings(caplog)
        assert client.get("/api/config").status_code == 200  # other requests are served meanwhile
        blocking.release.set()
        runner.join(timeout=60)
        assert first["response"].status_code == 200
        assert segment(client, image_id).status_code == 200  # and the lock is free again


def test_an_unexpected_failure_is_a_short_500_and_the_server_lives_on(client, caplog, monkeypatch, photo_jpeg):
    def fail(*args):
        raise RuntimeError("the model fell over")

    image_id = upload(client, photo_jpeg).json()["id"]
    monkeypatch.setattr(server, "segment_photo", fail)
    error = error_of(segment(client, image_id), 500)
    assert error == "internal error (RuntimeError); the server log has the details"
    failures = [r for r in caplog.records if r.name == "unet.app" and r.levelno == logging.ERROR]
    assert failures and failures[-1].exc_info[1].args == ("the model fell over",)
    monkeypatch.undo()
    assert segment(client, image_id).status_code == 200


def test_unknown_paths_get_json_errors(client):
    assert error_of(client.get("/api/nothing"), 404)


# ----------------------------------------------------------------------------- command line


def test_without_a_checkpoint_it_says_how_to_train_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--port", "0"]) == 1
    error = capsys.readouterr().err
    assert "runs/tiny/best.pt does not exist" in error and "`python -m unet.train`" in error


def test_the_default_checkpoint_is_the_default_training_runs_best(tmp_path, monkeypatch, checkpoint):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "best.pt").write_bytes(checkpoint.read_bytes())
    assert cli.find_checkpoint(None) == cli.DEFAULT_CHECKPOINT
    assert cli.find_checkpoint("other.pt").name == "other.pt"


def test_a_bad_checkpoint_or_a_taken_port_is_an_error_message(tmp_path, capsys, checkpoint):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert cli.main(["--checkpoint", str(tmp_path / "bad.pt")]) == 1
    assert "is not a readable checkpoint" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["--checkpoint", str(checkpoint), "--port", str(port)]) == 1
    assert "error:" in capsys.readouterr().err


def test_threads_sets_torch_threads_and_must_be_positive(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert cli.main(["--threads", "1", "--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert calls == [1]
    with pytest.raises(SystemExit):
        cli.main(["--threads", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err
