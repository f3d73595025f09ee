"""Inference settings: checked, recorded in one file, overridden with a record."""

import json

import pytest

from capsmed.config import evaluation_hash
from capsmed.errors import CapsmedError
from capsmed.infer.settings import (
    RESULT_DEFAULTS,
    apply_overrides,
    check_settings,
    config_settings,
    flip_sets,
    read_settings,
    record_settings,
)
from tests.pipeline_helpers import tiny_config


def test_config_settings_merge_global_and_dataset(tmp_path):
    cfg = tiny_config(tmp_path, inference={"overlap": 0.5})
    s = config_settings(cfg, "ds")
    assert s["overlap"] == 0.5 and s["tta"] is True and s["tta_flips"] == "axes"
    assert s["mode"] == "gaussian" and s["precision"] == "float32" and s["sw_batch_size"] == 2


def test_record_and_read_back(tmp_path):
    path = record_settings(tmp_path, {**RESULT_DEFAULTS, "overlap": 0.5, "sw_batch_size": 7})
    doc = json.loads(path.read_text())
    assert doc == {"settings": {**RESULT_DEFAULTS, "overlap": 0.5}}
    settings, source = read_settings(tmp_path / "best.pt")
    assert settings["overlap"] == 0.5 and source == str(path)
    mtime = path.stat().st_mtime_ns
    record_settings(tmp_path, {**RESULT_DEFAULTS, "overlap": 0.5, "sw_batch_size": 1})
    assert path.stat().st_mtime_ns == mtime  # unchanged settings: the file is not rewritten


def test_missing_file_means_the_defaults(tmp_path, caplog):
    settings, source = read_settings(tmp_path / "best.pt")
    assert settings == RESULT_DEFAULTS and source == "defaults"
    assert "no inference.json beside the checkpoint" in caplog.text


@pytest.mark.parametrize("settings, message", [
    ({"overlapp": 0.5}, "unknown inference settings ['overlapp']; known: ['overlap', 'mode', "
                        "'tta', 'tta_flips', 'largest_component', 'precision', 'sw_batch_size', "
                        "'memory_mb']"),
    ({"overlap": 1.0}, "overlap must be a number in [0, 1), got 1.0"),
    ({"tta": "yes"}, "tta must be true or false, got 'yes'"),
    ({"mode": "mean"}, "mode must be one of ['gaussian', 'constant'], got 'mean'"),
    ({"sw_batch_size": 0}, "sw_batch_size must be a positive integer, got 0"),
    ({"memory_mb": 0}, "memory_mb must be a positive number of MB or null, got 0"),
])
def test_bad_settings_one_line_each(settings, message):
    with pytest.raises(CapsmedError) as err:
        check_settings(settings, "where")
    assert str(err.value) == f"where: {message}"


def test_a_settings_file_without_settings_is_named(tmp_path):
    (tmp_path / "inference.json").write_text("[]")
    with pytest.raises(CapsmedError, match="not an inference settings file"):
        read_settings(tmp_path / "best.pt")


def test_overrides_record_only_what_they_change():
    settings, changed = apply_overrides({**RESULT_DEFAULTS},
                                        {"tta": False, "overlap": 0.25, "sw_batch_size": 4,
                                         "largest_component": None})
    assert settings["tta"] is False and settings["sw_batch_size"] == 4
    assert changed == {"tta": {"recorded": True, "used": False}}


def test_flip_sets_axes_and_mirror():
    assert flip_sets([0, 1, 2], "axes") == [(), (0,), (1,), (2,)]
    mirror = flip_sets([0, 1, 2], "mirror")
    assert len(mirror) == 8 and mirror[0] == () and len(set(mirror)) == 8
    assert flip_sets([1], "mirror") == [(), (1,)]


def test_window_batch_reruns_no_evaluation(tmp_path):
    a = tiny_config(tmp_path, inference={"sw_batch_size": 1})
    b = tiny_config(tmp_path, inference={"sw_batch_size": 8, "memory_mb": 3000})
    c = tiny_config(tmp_path, inference={"overlap": 0.5})
    assert evaluation_hash(a, "ds", "seed_cnn") == evaluation_hash(b, "ds", "seed_cnn")
    assert evaluation_hash(a, "ds", "seed_cnn") != evaluation_hash(c, "ds", "seed_cnn")
