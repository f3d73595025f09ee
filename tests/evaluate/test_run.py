"""Evaluation and prediction keep each study's geometry; metrics files have the contract's keys."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from capsmed.errors import CapsmedError
from capsmed.evaluate.run import evaluate_stage
from capsmed.train.loop import train_model
from tests.pipeline_helpers import prepare_all, run_cli, tiny_config, write_config

SHAPES = [(23, 27, 19), (25, 21, 22), (24, 26, 20), (21, 25, 23), (26, 22, 21), (22, 24, 25)]


def _affine(k: int) -> np.ndarray:
    """An oblique, flipped, anisotropic affine (not the identity)."""
    theta = 0.2 + 0.1 * k
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                    [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.1, 0.9, 1.7])
    aff[:3, 3] = [10.0 * k, -5.0, 3.5]
    return aff


def _make_csv_dataset(root):
    rng = np.random.default_rng(0)
    rows = []
    for k, shape in enumerate(SHAPES):
        label = np.zeros(shape, np.uint8)
        c = np.array(shape) // 2
        label[c[0] - 4:c[0] + 3, c[1] - 5:c[1] + 2, c[2] - 3:c[2] + 4] = 1
        label[c[0] + 3:c[0] + 7, c[1] + 2:c[1] + 6, c[2] - 3:c[2] + 2] = 2
        image = label * 1.0 + rng.normal(0, 0.2, shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), _affine(k)), root / f"img{k}.nii.gz")
        nib.save(nib.Nifti1Image(label, _affine(k)), root / f"lab{k}.nii.gz")
        rows.append({"case_id": f"c{k}", "image": f"img{k}.nii.gz", "label": f"lab{k}.nii.gz"})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case_id", "image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def trained_seg(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    data = root / "data"
    data.mkdir()
    manifest = _make_csv_dataset(data)
    cfg = tiny_config(root / "results", task="segmentation", source="csv", path=str(manifest),
                      synthetic={"size": [16, 16, 16]},
                      preprocess={"patch_size": [16, 16, 16], "cache": "none"})
    path = write_config(cfg, root / "config.yaml")
    prepare_all(path)
    train_model(cfg, "ds", "unet")
    return cfg, path, data


def test_segmentation_predictions_keep_shape_and_affine(trained_seg):
    cfg, _, data = trained_seg
    doc = evaluate_stage(cfg, "ds", "unet", "test")
    assert doc["task"] == "segmentation" and doc["n_cases"] >= 1
    for key in ("dice", "dice_a", "dice_b", "hd95", "assd"):
        assert key in doc["metrics"]
    out = cfg["results"] + "/ds/eval/unet/test"
    with open(out + "/cases.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == doc["n_cases"]
    for row in rows:
        src = nib.load(row["image"])
        pred = nib.load(cfg["results"] + "/" + row["prediction"])
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
        assert 0.0 <= float(row["dice"]) <= 1.0
    saved = json.loads(open(out + "/metrics.json").read())
    assert saved["metrics"] == doc["metrics"]
    # test-time augmentation is on by default: its cost, the entropy map, the volume spread
    assert saved["cost"]["tta_passes"] == 4 and saved["cost"]["tta_time_factor"] > 1.0
    for row in rows:
        unc = nib.load(cfg["results"] + "/" + row["uncertainty"])
        assert unc.shape == nib.load(row["image"]).shape
        values = np.asarray(unc.dataobj)
        assert values.min() >= 0.0 and values.max() <= 1.0
        assert 0.0 <= float(row["uncertainty_mean"]) <= 1.0
        assert float(row["volume_spread_ml_a"]) >= 0.0
        assert not any(k.startswith("_") for k in row)
        # the evidence beside the prediction: a CNN's softmax, saved for the study reports
        ev = nib.load(cfg["results"] + "/" + row["evidence"])
        probs = nib.load(cfg["results"] + "/" + row["probability_maps"])
        assert ev.shape == probs.shape == (*nib.load(row["image"]).shape, 3)
        np.testing.assert_allclose(ev.get_fdata().sum(-1), 1.0, atol=0.02)
        label_map = np.asarray(nib.load(cfg["results"] + "/" + row["prediction"]).dataobj)
        stored = probs.get_fdata()
        differ = label_map != stored.argmax(-1)
        top2 = np.sort(stored[differ], axis=-1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] <= 1 / 255 + 1e-6)  # only 8-bit rounding ties
    assert saved["evidence_kind"] == "softmax" and "evidence_disagreement" not in rows[0]


def test_validation_stage_calibrates_the_uncertainty_thresholds(trained_seg):
    cfg, _, _ = trained_seg
    doc = evaluate_stage(cfg, "ds", "unet", "val")
    cal = doc["uncertainty_calibration"]
    assert cal["n_cases"] == doc["n_cases"]
    assert 0.0 <= cal["voxel_threshold"] <= 1.0 and 0.0 <= cal["voxel_auc"] <= 1.0
    with open(cfg["results"] + "/ds/eval/unet/val/cases.csv") as fh:
        means = [float(r["uncertainty_mean"]) for r in csv.DictReader(fh)]
    assert cal["study_threshold"] == pytest.approx(max(means), abs=1e-6)
    saved = json.loads(open(cfg["results"] + "/ds/eval/unet/val/metrics.json").read())
    assert saved["uncertainty_calibration"] == cal


def test_predict_keeps_the_largest_component_when_asked(trained_seg, tmp_path):
    from scipy import ndimage

    cfg, _, data = trained_seg
    ckpt = cfg["results"] + "/ds/models/unet/best.pt"
    study = str(data / "img3.nii.gz")
    for flag, out in ((["--no-largest-component"], "plain"), (["--largest-component"], "kept")):
        assert run_cli("-q", "predict", "--model", ckpt, study, "--out", str(tmp_path / out),
                       *flag) == 0
    plain = np.asarray(nib.load(tmp_path / "plain" / "img3_seg.nii.gz").dataobj)
    kept = np.asarray(nib.load(tmp_path / "kept" / "img3_seg.nii.gz").dataobj)
    for label in np.unique(plain[plain > 0]):
        components, n = ndimage.label(plain == label, structure=np.ones((3, 3, 3)))  # full
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        largest = components == 1 + int(sizes.argmax())
        np.testing.assert_array_equal(kept == label, largest)  # the largest one, exactly
    assert (kept != plain).any()  # the tiny model's map had stray islands to remove


def test_predict_new_study_round_trip(trained_seg, tmp_path):
    cfg, _, data = trained_seg
    ckpt = cfg["results"] + "/ds/models/unet/best.pt"
    status = run_cli("-q", "predict", "--model", ckpt, str(data / "img3.nii.gz"), "--out",
                     str(tmp_path / "pred"), "--tta")
    assert status == 0
    src = nib.load(data / "img3.nii.gz")
    seg = nib.load(tmp_path / "pred" / "img3_seg.nii.gz")
    unc = nib.load(tmp_path / "pred" / "img3_uncertainty.nii.gz")
    assert seg.shape == src.shape == unc.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    html = (tmp_path / "pred" / "img3.html").read_text(encoding="utf-8")
    # the sections of a pipeline study page, from the same writers: a CNN's softmax per structure
    evidence = nib.load(tmp_path / "pred" / "img3_evidence.nii.gz")
    assert evidence.shape == (*src.shape, 3)
    assert '<section id="evidence">' in html and "Softmax: " in html
    assert '"name": "Softmax: ' in html  # ... and as layers of the viewer


def test_predict_missing_study_names_the_file(trained_seg, tmp_path, capsys):
    cfg, _, _ = trained_seg
    ckpt = cfg["results"] + "/ds/models/unet/best.pt"
    status = run_cli("predict", "--model", ckpt, str(tmp_path / "nope.nii.gz"), "--out",
                     str(tmp_path / "o"))
    assert status == 2
    assert "nope.nii.gz: study not found" in capsys.readouterr().err


def test_predict_unreadable_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    study = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), study)
    assert run_cli("predict", "--model", str(bad), str(study)) == 2
    assert "model.pt: not a readable capsmed checkpoint" in capsys.readouterr().err


def test_classification_metrics_and_probabilities(tmp_path):
    cfg = tiny_config(tmp_path / "results", train={"epochs": 1, "batch_size": 8})
    prepare_all(write_config(cfg, tmp_path / "c.yaml"))
    train_model(cfg, "ds", "seed_cnn")
    doc = evaluate_stage(cfg, "ds", "seed_cnn", "val")
    for key in ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity", "ece"):
        assert key in doc["metrics"]
    assert np.array(doc["confusion_matrix"]).sum() == doc["n_cases"]
    with open(tmp_path / "results/ds/eval/seed_cnn/val/cases.csv") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        assert abs(float(row["prob_0"]) + float(row["prob_1"]) - 1) < 1e-5
        assert int(row["predicted"]) == int(float(row["prob_1"]) > float(row["prob_0"]))


# Per-case evaluation jobs (evaluate.per_case_jobs): the same tables as one job per stage.


def _read(path):
    return path.read_text()


def test_per_case_jobs_give_the_same_tables_as_one_job(trained_seg):
    cfg, cfg_path, _ = trained_seg
    results = Path(cfg["results"])
    stage_dir = results / "ds/eval/unet/test"
    whole = evaluate_stage(cfg, "ds", "unet", "test")
    cases_csv, metrics = _read(stage_dir / "cases.csv"), json.loads(_read(stage_dir / "metrics.json"))
    ids = [row["case_id"] for row in csv.DictReader((stage_dir / "cases.csv").open())]
    assert len(ids) >= 2
    for case_id in ids:
        doc = evaluate_stage(cfg, "ds", "unet", "test", case=case_id)
        assert doc["row"]["case_id"] == case_id
        assert (stage_dir / "cases" / f"{case_id}.json").is_file()
    (stage_dir / "cases.csv").unlink()
    gathered = evaluate_stage(cfg, "ds", "unet", "test", from_cases=True)
    assert _read(stage_dir / "cases.csv") == cases_csv
    assert gathered["metrics"] == metrics["metrics"] and gathered["ci95"] == metrics["ci95"]
    assert gathered["n_cases"] == whole["n_cases"] == len(ids)


def test_per_case_unknown_case_is_named(trained_seg, capsys):
    _, cfg_path, _ = trained_seg
    assert run_cli("evaluate", "-c", cfg_path, "-d", "ds", "-m", "unet", "-s", "test",
                   "--case", "no_such_case") == 2
    assert "dataset ds: no case 'no_such_case' in the test stage" in capsys.readouterr().err


def test_gathering_without_a_case_file_names_it(trained_seg, capsys):
    cfg, cfg_path, _ = trained_seg
    results = Path(cfg["results"])
    cases_dir = results / "ds/eval/unet/val/cases"
    if cases_dir.exists():
        for f in cases_dir.iterdir():
            f.unlink()
    assert run_cli("evaluate", "-c", cfg_path, "-d", "ds", "-m", "unet",
                   "-s", "val", "--from-cases") == 2
    err = capsys.readouterr().err
    assert str(cases_dir) in err and "evaluation of case" in err and "not found" in err


def test_gathering_a_case_file_of_another_checkpoint_is_refused(trained_seg, capsys):
    cfg, cfg_path, _ = trained_seg
    results = Path(cfg["results"])
    ids = json.loads((results / "ds/splits.json").read_text())["test"]
    for case_id in ids:
        evaluate_stage(cfg, "ds", "unet", "test", case=case_id)
    path = results / "ds/eval/unet/test/cases" / f"{ids[0]}.json"
    doc = json.loads(path.read_text())
    doc["checkpoint_sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    assert run_cli("evaluate", "-c", cfg_path, "-d", "ds", "-m", "unet",
                   "-s", "test", "--from-cases") == 2
    assert f"{path}: made with another checkpoint" in capsys.readouterr().err


def test_predict_dicom_series_folder_keeps_its_geometry(trained_seg, tmp_path):
    from monai.transforms import LoadImage

    from tests.data.data_helpers import make_dicom_dir

    cfg, _, _ = trained_seg
    series = make_dicom_dir(tmp_path / "dicom") / "studyC"  # pydicom's oblique MR series
    ckpt = cfg["results"] + "/ds/models/unet/best.pt"
    assert run_cli("-q", "predict", "--model", ckpt, str(series), "--out",
                   str(tmp_path / "pred")) == 0
    seg = nib.load(tmp_path / "pred" / "studyC_seg.nii.gz")
    src = LoadImage(image_only=True)(str(series))
    assert seg.shape == tuple(src.shape)
    np.testing.assert_allclose(seg.affine, src.affine.numpy(), atol=1e-4)
    assert (tmp_path / "pred" / "studyC.html").is_file()


def test_spacing_is_read_from_the_affine_as_every_stage_reads_it(tmp_path):
    """A header whose pixdim disagrees with its affine: evaluation (HD95 in mm), the data reader
    and the fingerprint all use the affine (nibabel.affines.voxel_sizes)."""
    from capsmed.data._io import read_volume
    from capsmed.evaluate.run import _load_label

    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.diag([1.5, 1.0, 2.0, 1.0]))
    img.header["pixdim"][1:4] = 1.0  # pixdim says 1 mm, the sform 1.5 x 1 x 2 mm
    path = tmp_path / "l.nii.gz"
    nib.save(img, path)
    assert nib.load(path).header.get_zooms() == (1.0, 1.0, 1.0)
    assert _load_label(str(path))[1] == (1.5, 1.0, 2.0)
    assert tuple(read_volume(path, load=False)[0].spacing) == (1.5, 1.0, 2.0)


def test_capsule_classifier_pose_perturbation_reaches_the_study_report(tmp_path, capsys):
    from capsmed.report import write_study_reports
    from capsmed.report.figures import pose_effects

    cfg = tiny_config(tmp_path / "results", models=["capsnet"],
                      train={"epochs": 1, "batch_size": 8})
    cfg["models"]["capsnet"] = {"args": {"conv_channels": 16, "primary_capsules": 4}}
    prepare_all(write_config(cfg, tmp_path / "c.yaml"))
    train_model(cfg, "ds", "capsnet")
    evaluate_stage(cfg, "ds", "capsnet", "test")
    results = Path(cfg["results"])
    rows = list(csv.DictReader((results / "ds/eval/capsnet/test/cases.csv").open()))
    with np.load(results / rows[0]["pose_perturbation"]) as doc:
        panel, steps = doc["reconstructions"].astype(np.float32), doc["steps"]
    np.testing.assert_allclose(steps, np.arange(-0.25, 0.2501, 0.05), atol=1e-9)
    assert panel.shape == (16, 11, 28, 28)
    recon = np.load(results / rows[0]["reconstruction"])[0]
    np.testing.assert_allclose(panel[:, 5], np.broadcast_to(recon, panel[:, 5].shape), atol=2e-3)
    page = write_study_reports(results, "ds", "capsnet")[rows[0]["case_id"]]
    html = page.read_text(encoding="utf-8")
    effects = pose_effects(panel, 5)
    ranked = [int(d) for d in np.argsort(-effects, kind="mergesort")]
    assert "Pose perturbation" in html and "moved in steps of 0.05 from -0.25 to +0.25" in html
    assert "Largest effects: " + ", ".join(
        f"dimension {d} ({effects[d]:.3g})" for d in ranked[:5]) + "." in html
    # capsmed predict on the same study: the same capsule section, from the same writer
    image = Path(rows[0]["image"])
    out = tmp_path / "pred"
    assert run_cli("-q", "predict", "--model", str(results / "ds/models/capsnet/best.pt"),
                   str(image if image.is_absolute() else results / image), "--out", str(out)) == 0
    new = next(out.glob("*.html")).read_text(encoding="utf-8")
    assert "Pose perturbation" in new and len(list(out.glob("*_poses.npz"))) == 1
    capsys.readouterr()
    assert run_cli("predict", "--model", str(results / "ds/models/capsnet/best.pt"),
                   str(image if image.is_absolute() else results / image), "--largest-component",
                   "--out", str(tmp_path / "lc")) == 2
    assert "--largest-component applies to segmentation models" in capsys.readouterr().err
    assert not (tmp_path / "lc").exists()
    section = 'id="capsules"'
    assert section in html and section in new
    assert new.split(section, 1)[1].split("</section>", 1)[0].count("<img") == \
        html.split(section, 1)[1].split("</section>", 1)[0].count("<img")


def test_study_pages_show_the_volumes_the_evaluation_wrote(trained_seg, tmp_path):
    """A study page takes each structure's volume from cases.csv; it does not count voxels again."""
    import shutil

    from capsmed.report import write_study_reports

    cfg, _, _ = trained_seg
    evaluate_stage(cfg, "ds", "unet", "test")
    results = tmp_path / "results"
    shutil.copytree(cfg["results"], results)
    table = results / "ds/eval/unet/test/cases.csv"
    rows = list(csv.DictReader(table.open()))
    pages = write_study_reports(results, "ds", "unet")
    for row in rows:
        html = pages[row["case_id"]].read_text(encoding="utf-8")
        for name in ("a", "b"):
            assert f"{float(row[f'volume_ml_{name}']):.2f} mL" in html, (row["case_id"], name)
    with table.open("w", newline="") as fh:  # a table without the volume columns
        kept = [k for k in rows[0] if not k.startswith("volume_")]
        writer = csv.DictWriter(fh, fieldnames=kept, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    html = write_study_reports(results, "ds", "unet")[rows[0]["case_id"]].read_text("utf-8")
    assert html.count("n/a mL") == 2


def test_a_fraction_model_is_evaluated_on_the_test_stage_only(tmp_path):
    cfg = tiny_config(tmp_path / "results", train={"fractions": [0.5]})
    with pytest.raises(CapsmedError, match=r"evaluate: a learning-curve model \(fraction 0.5\) is "
                                           r"evaluated on the test stage only, not val"):
        evaluate_stage(cfg, "ds", "seed_cnn", "val", fraction="0.5")
