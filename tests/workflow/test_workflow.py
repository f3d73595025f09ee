"""The Snakemake workflow: lint, dry run, and one tiny end-to-end run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _run(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(SNAKEMAKE + args, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _run_in(repo_root, workdir, config: str, timeout: int = 900):
    """Run the workflow with a config of tests/workflow in ``workdir`` (results in workdir/results)."""
    return _run(["--snakefile", str(repo_root / "Snakefile"), "--directory", str(workdir),
                 "--configfile", str(repo_root / "tests/workflow" / config),
                 "--cores", "2", "--config", "results=results"], cwd=workdir, timeout=timeout)


def test_lint_is_clean(repo_root, tmp_path):
    res = _run(["--lint", "--snakefile", str(repo_root / "Snakefile"),
                "--config", f"results={tmp_path}/results"], cwd=repo_root)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dry_run_plans_the_default_demo(repo_root, tmp_path):
    res = _run(["-n", "--snakefile", str(repo_root / "Snakefile"), "--directory", str(repo_root),
                "--config", f"results={tmp_path}/results", "--cores", "1"], cwd=repo_root, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1], re.M))
    # 2 datasets x 2 models, each evaluated and reported on 3 stages, the classifiers also
    # trained and tested on half their cases (the learning curve); the shifted stages' jobs join
    # the plan once the preprocess checkpoint has written each dataset's plan
    assert counts == {"prepare": "2", "preprocess": "2", "split": "2", "train": "4",
                      "train_fraction": "2", "evaluate": "12", "evaluate_fraction": "2",
                      "report_stage": "12", "report_studies": "4", "report_dataset": "2",
                      "generalisation": "2", "report_generalisation": "2", "summarize": "1",
                      "all": "1", "total": "50"}
    assert "The run involves checkpoint jobs" in out


def test_train_processes_make_one_torchrun_job(repo_root, tmp_path):
    """train.processes 2 (tests/workflow/ddp_config.yaml, threads 1): the train job is one job
    running torchrun with 2 processes of 1 thread, asking for 2 threads and 2 CPUs per task."""
    res = _run(["-n", "-p", "--snakefile", str(repo_root / "Snakefile"), "--directory",
                str(tmp_path), "--configfile", str(repo_root / "tests/workflow/ddp_config.yaml"),
                "--config", "results=results", "--cores", "2",
                "results/ddp_cls2d/models/seed_cnn/train.json"], cwd=repo_root, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    job = res.stdout.split("rule train:")[1].split("Job stats:")[0]
    assert re.search(r"^\s+threads: 2$", job, re.M) and "cpus_per_task=2" in job, job
    assert re.search(r"-m torch\.distributed\.run --standalone --nproc_per_node 2 -m capsmed "
                     r"--log-file \S+ train .* --threads 1$", job, re.M), job


def test_invalid_config_stops_before_any_job(repo_root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  x:\n    source: nowhere\n    task: segmentation\n")
    res = _run(["-n", "--snakefile", str(repo_root / "Snakefile"), "--configfile", str(bad),
                "--config", f"results={tmp_path}/results", "--cores", "1"], cwd=repo_root, timeout=120)
    assert res.returncode != 0
    assert "nowhere" in res.stdout + res.stderr


TYPO_CONFIG = """\
datasets:
  a:
    source: synthetic
    task: segmentation
    models: [ucaps, unett]
  b:
    source: csv
    task: classification
    path: no/such/manifest.csv
    models: [seed_cnn]
models:
  unet: {args: {chanels: [4, 8]}}
"""


def test_typos_stop_the_parse_and_capsmed_validate_alike(repo_root, tmp_path):
    """Unknown models and options and a missing source path: named at parse time, with the
    accepted values, by Snakemake and by `capsmed validate -c` through the same code."""
    bad = tmp_path / "typo.yaml"
    bad.write_text(TYPO_CONFIG)
    expected = ["datasets.a.models: unknown model 'unett'; accepted: capsnet,",
                "models.unet.args: unknown option 'chanels' of unet; accepted: channels,",
                "datasets.b.path: no/such/manifest.csv does not exist"]
    res = _run(["-n", "--snakefile", str(repo_root / "Snakefile"), "--configfile", str(bad),
                "--config", f"results={tmp_path}/results", "--cores", "1"], cwd=tmp_path,
               timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Job stats" not in out
    for line in expected:
        assert line in out, out
    res = subprocess.run([sys.executable, "-m", "capsmed", "validate", "-c", str(bad)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    for line in expected:
        assert line in res.stderr, res.stderr


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = 0

    def handle_starttag(self, tag, attrs):
        self.tags += 1


def test_export_config_adds_export_jobs_to_the_default_target(repo_root, tmp_path):
    """export: [onnx, bundle] plans one export job per trained model and format (none by default,
    see the default demo's plan above); several folds export the reported fold."""
    for config, rule, n, path in (
            ([], "export", "8", "results/demo_seg3d/export/capsunet/bundle.json"),
            (["--configfile", str(repo_root / "tests/workflow/cv_config.yaml")], "export_fold", "2",
             "results/cv_cls2d/export/seed_cnn/fold1/onnx.json")):
        res = _run(["-n", "--snakefile", str(repo_root / "Snakefile"), "--directory",
                    str(repo_root), *config, "--config", f"results={tmp_path}/results",
                    "export=[onnx,bundle]", "--cores", "1"], cwd=repo_root, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        out = res.stdout + res.stderr
        assert _job_counts(out)[rule] == n
        assert path in out


@pytest.mark.slow
def test_tiny_demo_end_to_end(repo_root, tmp_path):
    """The whole workflow on the reduced demo config, in a temporary folder."""
    res = _run_in(repo_root, tmp_path, "tiny_config.yaml", timeout=1500)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    results = tmp_path / "results"
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary["datasets"]) == {"demo_seg3d", "demo_cls2d"}
    seg = summary["datasets"]["demo_seg3d"]
    cls = summary["datasets"]["demo_cls2d"]
    assert seg["task"] == "segmentation" and cls["task"] == "classification"
    assert set(seg["models"]) == {"ucaps", "unet"} and set(cls["models"]) == {"capsnet", "seed_cnn"}
    for ds in (seg, cls):
        for model in ds["models"].values():
            assert model["params"] > 0
            assert set(model["stages"]) == {"train", "val", "test"}
            for stage in model["stages"].values():
                assert (results / stage["report"]).is_file()
                parser = _Parser()
                parser.feed((results / stage["report"]).read_text())
                assert parser.tags > 20
            assert model["studies"], "every test study gets a report"
            for path in model["studies"].values():
                assert (results / path).is_file()
    for key in ("dice", "dice_structure_a", "dice_structure_b", "hd95", "assd"):
        assert key in seg["models"]["ucaps"]["stages"]["test"]["metrics"]
    for key in ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity", "ece"):
        assert key in cls["models"]["capsnet"]["stages"]["test"]["metrics"]
    assert (results / "index.html").is_file()
    # the shifted stages: every model under its dataset's shift, beside its clean reference
    for name, shift, reference in (("demo_seg3d", "rotation", "unet"),
                                   ("demo_cls2d", "noise", "seed_cnn")):
        gen = summary["datasets"][name]["generalisation"]
        assert gen["reference"] == reference and set(gen["models"]) == set(
            summary["datasets"][name]["models"])
        for model, entry in gen["models"].items():
            assert list(entry["shifts"]) == [shift] and list(entry["shifts"][shift]) == ["3"]
            assert (results / name / "eval" / model / "shift/none/s0/metrics.json").is_file()
        page = (results / gen["report"]).read_text()
        assert 'id="corruption-error"' in page and 'id="gallery"' in page
    # a learning curve: each classifier also trained on half of its training cases
    curve = cls["learning_curve"]["models"]
    assert set(curve) == {"capsnet", "seed_cnn"} and all(set(c) == {"0.5", "1.0"}
                                                          for c in curve.values())
    assert (results / "demo_cls2d/models/capsnet/fraction-0.5/best.pt").is_file()
    # segmentation study pages carry the viewer (one shared NiiVue copy) and the TTA uncertainty,
    # whose flag the validation stage calibrated
    assert len(list(results.rglob("niivue.umd.js"))) == 1
    study = (results / next(iter(seg["models"]["ucaps"]["studies"].values()))).read_text()
    assert 'id="cv-data"' in study and "assets/niivue-" in study
    val = json.loads((results / "demo_seg3d/eval/ucaps/val/metrics.json").read_text())
    assert val["cost"]["tta_passes"] == 4 and "uncertainty_calibration" in val
    assert "uncertainty_mean" in (results / "demo_seg3d/eval/ucaps/test/cases.csv").read_text()
    # snakemake --report bundles the reports into one offline HTML file
    rep = _run(["--snakefile", str(repo_root / "Snakefile"), "--directory", str(tmp_path),
                "--configfile", str(repo_root / "tests/workflow/tiny_config.yaml"),
                "--config", "results=results", "--report", str(tmp_path / "report.html")],
               cwd=tmp_path, timeout=300)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    assert (tmp_path / "report.html").stat().st_size > 10_000
    # a second run has nothing to do
    again = _run(["--snakefile", str(repo_root / "Snakefile"), "--directory", str(tmp_path),
                  "--configfile", str(repo_root / "tests/workflow/tiny_config.yaml"),
                  "--cores", "2", "--config", "results=results"], cwd=tmp_path, timeout=300)
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    # a model added to the config is trained and reported, also when Snakemake's records of the
    # earlier run are gone (a copied results folder, a deleted .snakemake): without the model
    # lists as input Snakemake found summary.json up to date and did nothing
    shutil.rmtree(tmp_path / ".snakemake" / "metadata")
    added = _run(["-n", "--snakefile", str(repo_root / "Snakefile"), "--directory", str(tmp_path),
                  "--configfile", str(repo_root / "tests/workflow/tiny_config.yaml"),
                  "--cores", "2", "--config", "results=results",
                  "models={seed_cnn_wide: {model: seed_cnn, args: {channels: 16}}}",
                  "datasets={demo_cls2d: {models: [capsnet, seed_cnn, seed_cnn_wide]}}"],
                 cwd=tmp_path, timeout=300)
    out = added.stdout + added.stderr
    assert added.returncode == 0, out[-3000:]
    assert re.search(r"rule train:\n(.*\n)*?\s+wildcards: dataset=demo_cls2d, model=seed_cnn_wide",
                     out), out[-3000:]
    assert "rule summarize:" in out and "rule report_dataset:" in out
    assert out.count("rule train:") == 1  # the models trained before are not trained again


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_command(repo_root, tmp_path):
    """SIGKILL the whole Snakemake run during training; `make demo`'s commands finish it."""
    import signal
    import time

    import yaml

    cfg = yaml.safe_load((repo_root / "tests/workflow/tiny_config.yaml").read_text())
    cfg["datasets"] = {"demo_cls2d": cfg["datasets"]["demo_cls2d"]}
    cfg["datasets"]["demo_cls2d"]["models"] = ["seed_cnn"]
    cfg["datasets"]["demo_cls2d"]["train"]["epochs"] = 3
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ["--snakefile", str(repo_root / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(config), "--profile", str(repo_root / "workflow/profiles/default"),
            "--config", "results=results"]
    env = {**os.environ, "CAPSMED_TEST_EPOCH_SLEEP": "4"}
    proc = subprocess.Popen(SNAKEMAKE + args, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "results/demo_cls2d/models/seed_cnn/history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not history.is_file():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert history.is_file() and not (history.parent / "train.json").exists()
    # what `make demo` runs: unlock a stale lock, then the same command
    _run(["--unlock"] + args, cwd=tmp_path, timeout=120)
    res = _run(args, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = tmp_path / "results/demo_cls2d/logs/train_seed_cnn.log"
    assert "resuming after epoch" in log.read_text()
    summary = json.loads((tmp_path / "results/summary.json").read_text())
    assert "test" in summary["datasets"]["demo_cls2d"]["models"]["seed_cnn"]["stages"]


def test_configfile_replaces_the_demo_config(repo_root, tmp_path):
    """--configfile runs the user's datasets only (Snakemake would merge them into the demo's)."""
    (tmp_path / "breastmnist.npz").touch()  # the parse checks that the source path exists
    res = _run(["-n", "--snakefile", str(repo_root / "Snakefile"), "--directory", str(repo_root),
                "--configfile", str(repo_root / "config/examples/breastmnist.yaml"),
                "--config", f"data_root={tmp_path}", f"results={tmp_path}/results", "--cores", "1"],
               cwd=repo_root, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "breastmnist" in out and "demo_seg3d" not in out and "demo_cls2d" not in out


def _job_counts(out: str) -> dict:
    return dict(re.findall(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1], re.M))


def test_dry_run_plans_every_fold_of_a_cross_validation(repo_root, tmp_path):
    """3 folds: each trained and validated ({fold} wildcard), fold 1 evaluated on every stage."""
    res = _run(["-n", "--snakefile", str(repo_root / "Snakefile"), "--directory", str(repo_root),
                "--configfile", str(repo_root / "tests/workflow/cv_config.yaml"),
                "--config", f"results={tmp_path}/results", "--cores", "1"], cwd=repo_root,
               timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert _job_counts(out) == {
        "prepare": "1", "preprocess": "1", "split": "1", "train_fold": "3", "evaluate_fold": "5",
        "crossval": "1", "report_stage": "3", "report_studies": "1", "report_dataset": "1",
        "generalisation": "1", "report_generalisation": "1", "summarize": "1", "all": "1",
        "total": "21"}
    for k in range(3):
        assert f"results/cv_cls2d/eval/seed_cnn/fold{k}/val/metrics.json" in out
    for stage in ("train", "test"):
        assert f"results/cv_cls2d/eval/seed_cnn/fold1/{stage}/metrics.json" in out
        assert f"results/cv_cls2d/eval/seed_cnn/fold0/{stage}/metrics.json" not in out


@pytest.mark.slow
def test_cross_validation_end_to_end(repo_root, tmp_path):
    res = _run_in(repo_root, tmp_path, "cv_config.yaml")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    results = tmp_path / "results"
    ds = results / "cv_cls2d"
    model = json.loads((results / "summary.json").read_text())["datasets"]["cv_cls2d"]["models"][
        "seed_cnn"]
    assert model["fold"] == 1 and set(model["stages"]) == {"train", "val", "test"}
    cv = model["cross_validation"]
    assert cv["folds"] == [0, 1, 2] and (results / cv["path"]).is_file()
    aucs = [json.loads((ds / f"eval/seed_cnn/fold{k}/val/metrics.json").read_text())["metrics"]
            ["auc"] for k in range(3)]
    assert cv["mean"]["auc"] == pytest.approx(sum(aucs) / 3)
    assert model["stages"]["val"]["metrics"]["auc"] == aucs[1]
    splits = json.loads((ds / "splits.json").read_text())
    for k in range(3):
        assert json.loads((ds / f"models/seed_cnn/fold{k}/train.json").read_text())["fold"] == k
        assert (ds / f"models/seed_cnn/fold{k}/best.pt").is_file()
    assert len(model["studies"]) == len(splits["test"])
    for path in model["studies"].values():
        assert (results / path).is_file()
    assert "Cross-validation" in (ds / "reports/comparison.html").read_text()


@pytest.mark.slow
def test_per_case_evaluation_jobs_end_to_end(repo_root, tmp_path):
    """evaluate.per_case_jobs: one job per case, gathered into the tables one job would write."""
    res = _run_in(repo_root, tmp_path, "per_case_config.yaml")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-8000:]
    ds = tmp_path / "results/pc_seg3d"
    splits = json.loads((ds / "splits.json").read_text())
    n_cases = len(splits["test"]) + len(splits["folds"][0]["val"])
    assert len(re.findall(r"^(?:local)?rule evaluate_case:", out, re.M)) == n_cases
    for case_id in splits["test"]:
        assert (ds / f"eval/unet/test/cases/{case_id}.json").is_file()
    gathered = json.loads((ds / "eval/unet/test/metrics.json").read_text())
    gathered_csv = (ds / "eval/unet/test/cases.csv").read_text()
    assert gathered["n_cases"] == len(splits["test"])
    # one whole-stage evaluation of the same checkpoint writes the same tables
    one = subprocess.run([sys.executable, "-m", "capsmed", "-q", "evaluate", "-c",
                          str(tmp_path / "results/.capsmed/config.yaml"), "-d", "pc_seg3d",
                          "-m", "unet", "-s", "test", "--threads", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    whole = json.loads((ds / "eval/unet/test/metrics.json").read_text())
    assert whole["metrics"] == gathered["metrics"] and whole["ci95"] == gathered["ci95"]
    assert (ds / "eval/unet/test/cases.csv").read_text() == gathered_csv
