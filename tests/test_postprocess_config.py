"""unet.postprocess_config: the settings dataclass, its JSON files (good and bad), and which file a
tool picks up."""

import json
import math

import numpy as np
import pytest

from unet import postprocess, postprocess_config
from unet.postprocess_config import CONFIG_NAME, PostprocessConfig, beside, resolve

TUNED = PostprocessConfig(boundary_threshold=0.35, gap_iterations=2, min_size=4, new_threshold=0.8,
                          join_threshold=0.2, impatience=2.5, boundary_method="close_gaps")


def test_defaults_are_the_libraries():
    assert PostprocessConfig().kwargs() == {
        "boundary_threshold": postprocess.BOUNDARY_THRESHOLD, "gap_iterations": postprocess.GAP_ITERATIONS,
        "min_size": postprocess.MIN_SIZE, "new_threshold": postprocess.NEW_THRESHOLD,
        "join_threshold": postprocess.JOIN_THRESHOLD, "impatience": postprocess.IMPATIENCE,
        "boundary_method": postprocess.BOUNDARY_METHOD,
    }


def test_json_round_trip_keeps_every_field_and_the_tuning_record(tmp_path):
    path = TUNED.save(tmp_path / "sub" / "settings.json", tuning={"seed": 3, "trials_scored": 7})
    assert PostprocessConfig.load(path) == TUNED
    written = json.loads(path.read_text())
    assert written == {**TUNED.to_dict(), "tuning": {"seed": 3, "trials_scored": 7}}
    assert not list(path.parent.glob(".*"))  # the atomic write leaves no temporary file
    PostprocessConfig().save(path)  # overwrites, and without a record
    assert json.loads(path.read_text()) == PostprocessConfig().to_dict()


def test_a_partial_file_keeps_the_defaults_of_the_fields_it_leaves_out(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"boundary_threshold": 0.7, "min_size": 3}')
    assert PostprocessConfig.load(path) == PostprocessConfig(boundary_threshold=0.7, min_size=3)


def test_integers_given_as_numbers_are_stored_as_floats():
    config = PostprocessConfig(boundary_threshold=1, new_threshold=0, join_threshold=1, impatience=2)
    assert all(isinstance(config.to_dict()[name], float)
               for name in ("boundary_threshold", "new_threshold", "join_threshold", "impatience"))


def test_the_settings_drive_the_post_processing_exactly():
    rng = np.random.default_rng(0)
    probs = rng.random((2, 5, 20, 24)) ** 3
    probs /= probs.sum(1, keepdims=True)
    boundary = rng.random((2, 20, 24)) ** 2
    expected = postprocess.postprocess(probs, boundary, 0.35, 2, 4, 0.8, 0.2, 2.5, boundary_method="close_gaps")
    assert np.array_equal(postprocess.postprocess(probs, boundary, **TUNED.kwargs()), expected)
    assert not np.array_equal(postprocess.postprocess(probs, boundary), expected)  # the settings matter here


@pytest.mark.parametrize("values, message", [
    ({"boundary_threshold": 1.5}, "field 'boundary_threshold': expected a number in [0, 1], got 1.5"),
    ({"boundary_threshold": "0.5"}, "field 'boundary_threshold': expected a number in [0, 1], got '0.5'"),
    ({"gap_iterations": -1}, "field 'gap_iterations': expected an integer >= 0, got -1"),
    ({"min_size": 2.5}, "field 'min_size': expected an integer >= 0, got 2.5"),
    ({"min_size": True}, "field 'min_size': expected an integer >= 0, got True"),
    ({"new_threshold": -0.1}, "field 'new_threshold': expected a number >= 0, got -0.1"),
    ({"join_threshold": 0}, "field 'join_threshold': expected a number > 0, got 0"),
    ({"impatience": 1.0}, "field 'impatience': expected a number > 1, got 1.0"),
    ({"impatience": math.nan}, "field 'impatience': expected a number > 1, got nan"),
    ({"boundary_method": "closing"}, "field 'boundary_method': expected one of ['paper', 'close_gaps'], got 'closing'"),
    ({"boundary_treshold": 0.5}, "unknown field(s) ['boundary_treshold']"),
])
def test_a_bad_field_is_named_with_the_file(tmp_path, values, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError) as error:
        PostprocessConfig.load(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


@pytest.mark.parametrize("text, message", [
    ('{"min_size": 3,}', "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 16"),
    ("", "not valid JSON"),
    ("[0.5, 5]", "expected a JSON object of post-processing settings, got list"),
])
def test_a_file_that_is_not_a_settings_object_is_named(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="^" + str(path).replace("\\", "\\\\") + ": ") as error:
        PostprocessConfig.load(path)
    assert message in str(error.value)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="postprocess config: no such file .*missing.json"):
        PostprocessConfig.load(tmp_path / "missing.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="binary.json: cannot read the post-processing settings"):
        PostprocessConfig.load(tmp_path / "binary.json")


def test_resolve_prefers_the_flag_then_the_file_beside_the_checkpoint_then_the_defaults(tmp_path):
    checkpoint = tmp_path / "run" / "best.pt"
    checkpoint.parent.mkdir()
    config, line = resolve(None, checkpoint)
    assert config == PostprocessConfig() and "the defaults (no postprocess.json beside the checkpoint)" in line

    TUNED.save(beside(checkpoint), tuning={"global_step": 40})
    assert beside(checkpoint) == checkpoint.parent / CONFIG_NAME
    config, line = resolve(None, checkpoint, global_step=40)
    assert config == TUNED and line == f"post-processing settings from {beside(checkpoint)} (found beside the checkpoint)"

    other = PostprocessConfig(boundary_threshold=0.9).save(tmp_path / "other.json")
    assert resolve(str(other), checkpoint) == (PostprocessConfig(boundary_threshold=0.9),
                                              f"post-processing settings from {other}")
    config, line = resolve("defaults", checkpoint)
    assert config == PostprocessConfig() and "--postprocess-config defaults" in line


def test_resolve_notes_settings_tuned_on_another_step_of_the_run(tmp_path):
    checkpoint = tmp_path / "best.pt"
    TUNED.save(beside(checkpoint), tuning={"global_step": 40})
    config, line = resolve(None, checkpoint, global_step=80)
    assert config == TUNED
    assert "note: they were tuned on a checkpoint at step 40, this one is at step 80" in line
    PostprocessConfig().save(beside(checkpoint))  # hand-written: no record, no note
    assert "note:" not in resolve(None, checkpoint, global_step=80)[1]


def test_resolve_reports_a_bad_file_beside_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "best.pt"
    beside(checkpoint).write_text('{"min_size": -3}')
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}: field 'min_size': expected an integer >= 0, got -3"):
        resolve(None, checkpoint)


def test_paper_names_the_papers_settings(tmp_path):
    config, line = postprocess_config.resolve("paper", tmp_path / "best.pt")
    assert config == postprocess_config.PAPER_CONFIG and line.endswith("the paper's (--postprocess-config paper)")
    assert config.to_dict() == {"boundary_threshold": 0.5, "gap_iterations": 5, "min_size": 10, "new_threshold": 0.5,
                                "join_threshold": 0.05, "impatience": 1.5, "boundary_method": "paper"}
