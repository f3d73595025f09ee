"""The capsmed command: every stage reachable, clear one-line errors, no tracebacks."""

import subprocess
import sys

import numpy as np

from tests.pipeline_helpers import run_cli


def test_help_lists_every_stage(capsys):
    try:
        run_cli("--help")
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for cmd in ("validate", "prepare", "preprocess", "split", "train", "evaluate", "report",
                "report-studies", "report-dataset", "summarize", "predict", "models", "crossval"):
        assert cmd in out


def test_models_lists_capsule_models_and_baselines(capsys):
    assert run_cli("models") == 0
    out = capsys.readouterr().out
    for name in ("capsnet", "efficient_capsnet", "segcaps", "ucaps", "seed_cnn", "unet",
                 "densenet"):
        assert name in out


def test_bad_config_is_one_line_per_problem_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets:\n  d:\n    source: synthetic\n    task: typo\n")
    res = subprocess.run([sys.executable, "-m", "capsmed", "prepare", "-c", str(cfg), "-d", "d"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "datasets.d.task: 'typo' is not one of" in res.stderr


def test_unknown_dataset_is_named(tmp_path, repo_root, capsys):
    status = run_cli("prepare", "-c", repo_root / "config/config.yaml", "-d", "nope",
                     "--set", f"results={tmp_path}")
    assert status == 2
    assert "dataset 'nope' is not in the config" in capsys.readouterr().err


def test_validate_reports_problems_and_exit_code(tmp_path, capsys):
    npz = tmp_path / "bad.npz"
    np.savez(npz, train_images=np.zeros((3, 28, 28), np.uint8))
    assert run_cli("validate", str(npz)) == 1
    err = capsys.readouterr().err
    assert "bad.npz" in err and "problem" in err


def test_validate_ok_exit_zero(tmp_path, capsys):
    npz = tmp_path / "ok.npz"
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(n, dtype=np.uint8) % 2
    np.savez(npz, **arrays)
    assert run_cli("validate", str(npz)) == 0
    assert "OK" in capsys.readouterr().out


def test_validate_a_config_and_its_datasets(tmp_path, repo_root, capsys):
    assert run_cli("validate", "-c", repo_root / "config/config.yaml") == 0
    assert "config.yaml: OK" in capsys.readouterr().out
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,image,class\na,missing.nii.gz,0\n")
    status = run_cli("validate", "-c", repo_root / "config/config.yaml", "--set",
                     f"datasets={{d: {{source: csv, task: classification, spatial_dims: 2, "
                     f"path: {manifest}, models: [seed_cnn]}}}}")
    err = capsys.readouterr().err
    assert status == 1 and "datasets.d: " in err and "missing.nii.gz" in err
    assert run_cli("validate") == 2 and "give a dataset PATH or a config" in capsys.readouterr().err


def test_bad_dataset_stops_prepare_with_message_on_console_and_in_log(tmp_path, capsys):
    """The workflow's first rule: one line per problem, on stderr and in the rule's log."""
    import yaml

    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("case_id,image,label\nc1,missing_image.nii.gz,missing_label.nii.gz\n")
    cfg = {"results": str(tmp_path / "results"),
           "datasets": {"bad": {"source": "csv", "task": "segmentation", "path": str(manifest),
                                "labels": {"0": "background", "1": "lesion"}}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "prepare.log"
    assert run_cli("--log", str(log), "prepare", "-c", str(path), "-d", "bad") == 2
    err = capsys.readouterr().err
    assert "missing_image.nii.gz" in err and "Traceback" not in err
    assert "missing_image.nii.gz" in log.read_text()
    assert not (tmp_path / "results" / "bad" / "data" / "cases.json").exists()


def test_train_and_evaluate_a_fraction_model(tmp_path, capsys):
    """capsmed train/evaluate --fraction: the learning-curve model and its test stage in their own
    folders (models/MODEL/fraction-F, eval/MODEL/fraction-F/test), the ordinary ones untouched."""
    import csv
    import json

    from tests.pipeline_helpers import prepare_all, tiny_config, write_config

    cfg = tiny_config(tmp_path / "results", train={"epochs": 1, "batch_size": 8,
                                                   "fractions": [0.5]})
    path = write_config(cfg, tmp_path / "c.yaml")
    prepare_all(path)
    base = ("-q", "-c", path, "-d", "ds", "-m", "seed_cnn")
    assert run_cli(base[0], "train", *base[1:], "--fraction", "0.5") == 0
    assert run_cli(base[0], "evaluate", *base[1:], "-s", "test", "--fraction", "0.5") == 0
    results = tmp_path / "results" / "ds"
    assert (results / "models/seed_cnn/fraction-0.5/best.pt").is_file()
    assert (results / "models/seed_cnn/fraction-0.5/inference.json").is_file()
    assert not (results / "models/seed_cnn/best.pt").exists()
    doc = json.loads((results / "eval/seed_cnn/fraction-0.5/test/metrics.json").read_text())
    splits = json.loads((results / "splits.json").read_text())
    with open(results / "eval/seed_cnn/fraction-0.5/test/cases.csv") as fh:
        assert sorted(r["case_id"] for r in csv.DictReader(fh)) == sorted(splits["test"])
    assert doc["fraction"] == "0.5" and doc["stage"] == "test"
    assert not (results / "eval/seed_cnn/test").exists()
    assert run_cli(base[0], "train", *base[1:], "--fraction", "1.0") == 2
    assert "fraction 1.0 is the ordinary model" in capsys.readouterr().err
