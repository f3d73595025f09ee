"""capsmed predict reproduces what capsmed evaluate wrote: one inference path, recorded settings."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from capsmed.evaluate.run import evaluate_stage
from capsmed.infer.settings import SETTINGS_FILE
from capsmed.train.loop import train_model
from tests.pipeline_helpers import prepare_all, run_cli, tiny_config, write_config


def _trained(tmp_path, task, model, **overrides):
    cfg = tiny_config(tmp_path / "results", task=task, models=[model], **overrides)
    prepare_all(write_config(cfg, tmp_path / "c.yaml"))
    train_model(cfg, "ds", model)
    evaluate_stage(cfg, "ds", model, "test")
    results = Path(cfg["results"])
    rows = list(csv.DictReader((results / f"ds/eval/{model}/test/cases.csv").open()))
    return cfg, results, rows


def _image(results, row):
    image = Path(row["image"])
    return image if image.is_absolute() else results / image


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    # settings other than the defaults, so predict must read them from the model folder
    return _trained(tmp_path_factory.mktemp("seg"), "segmentation", "unet",
                    inference={"overlap": 0.5, "tta": True, "largest_component": True})


def test_segmentation_predict_writes_the_files_evaluate_wrote(seg_run, tmp_path):
    cfg, results, rows = seg_run
    recorded = json.loads((results / "ds/models/unet" / SETTINGS_FILE).read_text())["settings"]
    assert recorded["overlap"] == 0.5 and recorded["largest_component"] and recorded["tta"]
    assert "sw_batch_size" not in recorded  # memory and time only: not part of the model
    row = rows[0]
    assert run_cli("-q", "predict", "--model", results / "ds/models/unet/best.pt",
                   _image(results, row), "--out", tmp_path / "pred") == 0
    stem = Path(row["image"]).name.split(".nii")[0]
    pairs = {"prediction": f"{stem}_seg.nii.gz", "uncertainty": f"{stem}_uncertainty.nii.gz",
             "probability_maps": f"{stem}_probs.nii.gz", "evidence": f"{stem}_evidence.nii.gz"}
    for column, name in pairs.items():
        evaluated = (results / row[column]).read_bytes()
        assert (tmp_path / "pred" / name).read_bytes() == evaluated, column  # byte for byte
    provenance = json.loads((tmp_path / "pred" / "provenance.json").read_text())
    assert provenance["inference"] == recorded and provenance["inference_overrides"] == {}
    metrics = json.loads((results / "ds/eval/unet/test/metrics.json").read_text())
    assert {k: metrics["inference"][k] for k in recorded} == recorded


def test_window_batch_changes_memory_not_the_result(seg_run, tmp_path):
    _, results, rows = seg_run
    ckpt = results / "ds/models/unet/best.pt"
    for batch in (1, 5):
        assert run_cli("-q", "predict", "--model", ckpt, _image(results, rows[0]), "--out",
                       tmp_path / str(batch), "--sw-batch-size", str(batch)) == 0
    for name in ("seg", "probs"):
        files = [next((tmp_path / str(b)).glob(f"*_{name}.nii.gz")).read_bytes() for b in (1, 5)]
        assert files[0] == files[1], name


def test_an_override_is_used_and_written_into_the_provenance(seg_run, tmp_path):
    _, results, rows = seg_run
    assert run_cli("-q", "predict", "--model", results / "ds/models/unet/best.pt",
                   _image(results, rows[0]), "--out", tmp_path, "--no-tta", "--overlap",
                   "0.25") == 0
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert provenance["inference"]["tta"] is False and provenance["inference"]["overlap"] == 0.25
    assert provenance["inference_overrides"] == {
        "overlap": {"recorded": 0.5, "used": 0.25}, "tta": {"recorded": True, "used": False}}
    assert not list(tmp_path.glob("*_uncertainty.nii.gz"))  # no TTA, no uncertainty map


def test_classifier_predict_gives_the_probabilities_evaluate_wrote(tmp_path):
    cfg, results, rows = _trained(tmp_path, "classification", "seed_cnn",
                                  train={"epochs": 1, "batch_size": 8},
                                  inference={"tta": True, "tta_flips": "mirror"})
    metrics = json.loads((results / "ds/eval/seed_cnn/test/metrics.json").read_text())
    assert metrics["inference"]["tta_flips"] == "mirror"
    images = [_image(results, r) for r in rows]
    assert run_cli("-q", "predict", "--model", results / "ds/models/seed_cnn/best.pt", *images,
                   "--out", tmp_path / "pred") == 0
    predicted = {r["case_id"]: r for r in
                 csv.DictReader((tmp_path / "pred" / "probabilities.csv").open())}
    for row in rows:
        new = predicted[Path(row["image"]).name.split(".nii")[0]]
        for k in range(2):
            assert new[f"prob_{k}"] == row[f"prob_{k}"]  # equal as stored
    # without TTA the probabilities are those of one pass, and they differ
    assert run_cli("-q", "predict", "--model", results / "ds/models/seed_cnn/best.pt", *images,
                   "--out", tmp_path / "one", "--no-tta") == 0
    one = list(csv.DictReader((tmp_path / "one" / "probabilities.csv").open()))
    assert any(r["prob_0"] != predicted[r["case_id"]]["prob_0"] for r in one)


def test_a_model_folder_without_settings_predicts_with_the_defaults(seg_run, tmp_path, caplog):
    import shutil

    _, results, rows = seg_run
    folder = tmp_path / "old"
    shutil.copy(results / "ds/models/unet/best.pt", folder.mkdir() or folder / "best.pt")
    assert run_cli("predict", "--model", folder / "best.pt", _image(results, rows[0]), "--out",
                   tmp_path / "pred") == 0
    provenance = json.loads((tmp_path / "pred" / "provenance.json").read_text())
    assert provenance["inference_source"] == "defaults"
    assert provenance["inference"]["overlap"] == 0.25 and provenance["inference"]["tta"] is True


def test_a_bad_settings_file_is_named(seg_run, tmp_path, capsys):
    import shutil

    _, results, rows = seg_run
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(results / "ds/models/unet/best.pt", folder / "best.pt")
    (folder / SETTINGS_FILE).write_text(json.dumps({"settings": {"overlap": 1.5}}))
    capsys.readouterr()
    assert run_cli("predict", "--model", folder / "best.pt", _image(results, rows[0]), "--out",
                   tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert f"{folder / SETTINGS_FILE}: overlap must be a number in [0, 1), got 1.5" in err
    assert "Traceback" not in err


def test_evaluated_label_maps_keep_each_studys_shape(seg_run):
    _, results, rows = seg_run
    for row in rows:
        label = np.asarray(nib.load(results / row["prediction"]).dataobj)
        assert label.shape == nib.load(_image(results, row)).shape


def test_the_labels_snomed_codes_travel_with_the_checkpoint(tmp_path):
    """The config's codes reach predict's DICOM SEG through best.pt, as names do."""
    from capsmed.infer.checkpoint import load_checkpoint
    from capsmed.infer.predictor import Predictor

    hippo = {"value": "5366008", "meaning": "Hippocampal structure"}
    category = {"value": "91723000", "meaning": "Anatomical Structure"}
    labels = {"0": "background", "1": {"name": "a", "snomed": {"category": category,
                                                                "type": hippo}}, "2": "b"}
    cfg = tiny_config(tmp_path / "results", task="segmentation", labels=labels,
                      train={"epochs": 1, "batch_size": 2, "samples_per_case": 1})
    prepare_all(write_config(cfg, tmp_path / "c.yaml"))
    train_model(cfg, "ds", "unet")
    cases = json.loads((tmp_path / "results/ds/data/cases.json").read_text())
    ckpt = load_checkpoint(tmp_path / "results/ds/models/unet/best.pt")
    assert ckpt["label_codes"] == cases["label_codes"]
    assert ckpt["label_codes"]["1"]["type"]["value"] == "5366008"
    predictor = Predictor.from_checkpoint(tmp_path / "results/ds/models/unet/best.pt")
    assert predictor.label_codes == cases["label_codes"] and predictor.names["1"] == "a"
