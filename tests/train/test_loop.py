import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from capsmed.errors import CapsmedError
from capsmed.infer.checkpoint import build_model, load_checkpoint
from capsmed.train.loop import train_model
from tests.pipeline_helpers import prepare_all, tiny_config, write_config


def _history(model_dir):
    with open(model_dir / "history.csv") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


@pytest.fixture
def prepared(tmp_path):
    cfg = tiny_config(tmp_path / "results", train={"epochs": 3, "batch_size": 8})
    path = write_config(cfg, tmp_path / "config.yaml")
    prepare_all(path)
    return cfg, path


def test_train_writes_checkpoints_history_and_record(prepared):
    cfg, _ = prepared
    record = train_model(cfg, "ds", "seed_cnn")
    model_dir = cfg_dir = __import__("pathlib").Path(cfg["results"]) / "ds" / "models" / "seed_cnn"
    assert (cfg_dir / "last.pt").is_file() and (model_dir / "best.pt").is_file()
    assert len(_history(model_dir)) == 3
    saved = json.loads((model_dir / "train.json").read_text())
    assert saved == record
    assert record["params"] == sum(p.numel() for p in build_model(
        load_checkpoint(model_dir / "best.pt")).parameters())
    assert record["flops"] > 0 and len(record["checkpoint_sha256"]) == 64
    assert 1 <= record["best_epoch"] <= 3


def test_recorded_family_drives_the_comparison_page(tmp_path):
    """train.json records the registry class's family; the comparison page reads it."""
    from capsmed.report import write_comparison_report

    cfg = tiny_config(tmp_path / "results", train={"epochs": 1, "batch_size": 8},
                      models=["seed_cnn", "capsnet"])
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    assert train_model(cfg, "ds", "capsnet")["family"] == "capsule"
    assert train_model(cfg, "ds", "seed_cnn")["family"] == "cnn"
    page = write_comparison_report(cfg["results"], "ds", ["capsnet", "seed_cnn", "custom"])
    cells = re.findall(r"<tr[^>]*>\s*<td[^>]*>(\w+)</td>\s*<td[^>]*>(\w+)</td>", page.read_text())
    assert ("capsnet", "capsule") in cells and ("seed_cnn", "CNN") in cells
    assert ("custom", "unknown") in cells


def test_an_ablation_is_recorded_and_set_against_its_reference(tmp_path):
    """train.json records every model option; the comparison page pairs a variant of one model
    class with its reference and says what changed, what it cost and whether it mattered."""
    from capsmed.config import validate_config
    from capsmed.evaluate.run import evaluate_stage
    from capsmed.report import write_comparison_report
    from capsmed.report.render import fmt_metric

    cfg = tiny_config(tmp_path / "results", train={"epochs": 1, "batch_size": 8},
                      models=["rescapsnet", "seed_cnn", "rescapsnet_1iter"])
    cfg["models"]["rescapsnet_1iter"] = {"model": "rescapsnet", "args": {"routing_iterations": 1}}
    cfg = validate_config(cfg)
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    records = {m: train_model(cfg, "ds", m) for m in ("rescapsnet", "rescapsnet_1iter")}
    assert records["rescapsnet"]["model_args"]["routing_iterations"] == 3  # the class default
    assert records["rescapsnet_1iter"]["model_args"]["routing_iterations"] == 1
    assert {k: v for k, v in records["rescapsnet"]["model_args"].items()
            if records["rescapsnet_1iter"]["model_args"][k] != v} == {"routing_iterations": 3}
    auc = {m: evaluate_stage(cfg, "ds", m, "test")["metrics"]["auc"] for m in records}
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", write_comparison_report(
        cfg["results"], "ds", ["rescapsnet", "seed_cnn", "rescapsnet_1iter"]).read_text()))
    diff = auc["rescapsnet_1iter"] - auc["rescapsnet"]
    word = "better" if diff > 0 else ("worse" if diff else "equal")
    a, r = records["rescapsnet_1iter"], records["rescapsnet"]
    assert a["params"] == r["params"] and a["flops"] < r["flops"]  # routing iterations add FLOPs
    assert (f"Ablation of rescapsnet: rescapsnet_1iter (routing_iterations 1 instead of 3; the "
            f"same parameters, {a['flops'] / r['flops']:.3f}x the FLOPs) reaches AUC "
            f"{fmt_metric(auc['rescapsnet_1iter'], 'auc')}"
            f" against {fmt_metric(auc['rescapsnet'], 'auc')} ({fmt_metric(abs(diff), 'auc')} "
            f"{word})") in text
    assert "Ablations" in text and f"{diff:+.3f}" in text
    # seed_cnn (not trained) and entries of other classes are no ablation
    assert "Ablation of seed_cnn" not in text


def test_a_resumed_fold_keeps_its_checkpoint_when_only_split_fold_changes(tmp_path):
    """split.fold chooses the reported fold; it must not make fold 1's last.pt "another config"."""
    from capsmed.config import validate_config

    cfg = tiny_config(tmp_path / "results", train={"epochs": 2, "batch_size": 8},
                      split={"test_fraction": 0.25, "folds": 2, "fold": 0})
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    assert train_model(cfg, "ds", "seed_cnn", fold=1, max_epochs=1)["partial"]
    moved = validate_config({**cfg, "datasets": {"ds": {
        **cfg["datasets"]["ds"], "split": {**cfg["datasets"]["ds"]["split"], "fold": 1}}}})
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("capsmed.train.loop")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        record = train_model(moved, "ds", "seed_cnn", fold=1)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert "resuming after epoch 1" in stream.getvalue()
    assert "another config" not in stream.getvalue()
    assert record["epochs"] == 2


def test_two_runs_give_identical_numbers(tmp_path):
    histories = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = tiny_config(tmp_path / name / "results", train={"epochs": 2, "batch_size": 8})
        prepare_all(write_config(cfg, tmp_path / name / "config.yaml"))
        train_model(cfg, "ds", "seed_cnn")
        histories.append(_history(tmp_path / name / "results" / "ds" / "models" / "seed_cnn"))
    assert histories[0] == histories[1]


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    """Kill a training subprocess with SIGKILL after its first epoch, rerun, compare."""
    ref_cfg = tiny_config(tmp_path / "ref" / "results", train={"epochs": 3, "batch_size": 8})
    prepare_all(write_config(ref_cfg, tmp_path / "ref.yaml"))
    train_model(ref_cfg, "ds", "seed_cnn")
    reference = _history(tmp_path / "ref" / "results" / "ds" / "models" / "seed_cnn")

    cfg = tiny_config(tmp_path / "run" / "results", train={"epochs": 3, "batch_size": 8})
    path = write_config(cfg, tmp_path / "run.yaml")
    prepare_all(path)
    model_dir = tmp_path / "run" / "results" / "ds" / "models" / "seed_cnn"
    cmd = [sys.executable, "-m", "capsmed", "-q", "train", "-c", str(path), "-d", "ds",
           "-m", "seed_cnn", "--threads", "1"]
    env = {**os.environ, "CAPSMED_TEST_EPOCH_SLEEP": "3"}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (model_dir / "history.csv").is_file():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _history(model_dir)
    assert 1 <= len(partial) < 3, "the kill should land mid-training"
    assert not (model_dir / "train.json").exists()
    subprocess.run(cmd, check=True, timeout=300)
    assert _history(model_dir) == reference
    ref_ckpt = load_checkpoint(tmp_path / "ref" / "results" / "ds" / "models" / "seed_cnn" / "best.pt")
    ckpt = load_checkpoint(model_dir / "best.pt")
    for key, value in ref_ckpt["state_dict"].items():
        assert torch.equal(value, ckpt["state_dict"][key]), key


def test_non_finite_loss_stops_with_epoch_and_batch(prepared, monkeypatch):
    cfg, _ = prepared
    import capsmed.losses

    real = capsmed.losses.build_loss

    def nan_after_first_epoch(model, **weights):
        inner = real(model, **weights)
        calls = {"n": 0}

        def loss(outputs, target, image):
            calls["n"] += 1
            value = inner(outputs, target, image)
            return value * math.nan if calls["n"] > 2 else value  # 2 batches per epoch

        return loss

    monkeypatch.setattr(capsmed.losses, "build_loss", nan_after_first_epoch)
    model_dir = __import__("pathlib").Path(cfg["results"]) / "ds" / "models" / "seed_cnn"
    with pytest.raises(CapsmedError, match=r"loss is nan at epoch 2, batch 1; .*last good checkpoint"):
        train_model(cfg, "ds", "seed_cnn")
    assert load_checkpoint(model_dir / "last.pt")["epoch"] == 1
    assert not (model_dir / "train.json").exists()


def test_model_task_mismatch_is_a_clear_error(prepared):
    cfg, _ = prepared
    cfg["datasets"]["ds"]["models"] = ["unet"]
    with pytest.raises(CapsmedError, match="segmentation model but dataset ds is a classification"):
        train_model(cfg, "ds", "unet")


def test_unknown_model_is_a_clear_error(prepared):
    cfg, _ = prepared
    with pytest.raises(CapsmedError, match="model 'nope' .* is unknown"):
        train_model(cfg, "ds", "nope")


def test_missing_plan_names_the_file(tmp_path):
    cfg = tiny_config(tmp_path / "results")
    with pytest.raises(CapsmedError, match=r"cases.json: case list not found"):
        train_model(cfg, "ds", "seed_cnn")


def test_each_fold_trains_into_its_own_folder_on_its_own_cases(tmp_path, capsys):
    import csv
    import json

    from tests.pipeline_helpers import prepare_all, run_cli, tiny_config, write_config

    cfg = tiny_config(tmp_path / "results", train={"epochs": 1, "batch_size": 8},
                      split={"test_fraction": 0.25, "folds": 2, "fold": 1})
    path = write_config(cfg, tmp_path / "c.yaml")
    prepare_all(path)
    splits = json.loads((tmp_path / "results/ds/splits.json").read_text())
    for k in (0, 1):
        assert run_cli("-q", "train", "-c", path, "-d", "ds", "-m", "seed_cnn", "--fold", k) == 0
        assert run_cli("-q", "evaluate", "-c", path, "-d", "ds", "-m", "seed_cnn", "-s", "val",
                       "--fold", k) == 0
        record = json.loads((tmp_path / f"results/ds/models/seed_cnn/fold{k}/train.json")
                            .read_text())
        assert record["fold"] == k
        with open(tmp_path / f"results/ds/eval/seed_cnn/fold{k}/val/cases.csv") as fh:
            ids = sorted(row["case_id"] for row in csv.DictReader(fh))
        assert ids == sorted(splits["folds"][k]["val"])
    assert set(splits["folds"][0]["val"]).isdisjoint(splits["folds"][1]["val"])
    assert not (tmp_path / "results/ds/models/seed_cnn/train.json").exists()
    # without --fold: the config's split.fold
    assert run_cli("-q", "evaluate", "-c", path, "-d", "ds", "-m", "seed_cnn", "-s", "test") == 0
    assert (tmp_path / "results/ds/eval/seed_cnn/fold1/test/metrics.json").is_file()
    assert run_cli("-q", "train", "-c", path, "-d", "ds", "-m", "seed_cnn", "--fold", "2") == 2
    assert "dataset ds: fold 2 does not exist (split.folds is 2" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_a_disk_cache_filled_by_another_job_still_collates(tmp_path, task):
    """Folds and models of one dataset share the disk cache; a batch of read and computed items
    used to fail ("'Tensor' object has no attribute 'meta'")."""
    from monai.data import DataLoader

    from capsmed.paths import read_json
    from capsmed.train.loop import build_datasets, model_input_items, stage_cases

    cfg = tiny_config(tmp_path / "results", task=task)
    prepare_all(write_config(cfg, tmp_path / "c.yaml"))
    ds_dir = tmp_path / "results/ds"
    plan = read_json(ds_dir / "preprocessed/plan.json", "plan")
    cases_doc = read_json(ds_dir / "data/cases.json", "cases")
    splits = read_json(ds_dir / "splits.json", "splits")
    cases = [c for stage in ("train", "val", "test") for c in stage_cases(cases_doc, splits, stage, 0)]
    items = model_input_items(cases, task)
    cache = tmp_path / "cache"
    assert len(items) >= 3
    other_train, other_val = build_datasets(plan, items[:1], items[1:2], "disk", cache, True)
    fresh = [other_train[0], other_val[0]]  # another job caches two items
    train_ds, val_ds = build_datasets(plan, items, items, "disk", cache, True)
    for ds in (train_ds, val_ds):
        batch = next(iter(DataLoader(ds, batch_size=len(items))))
        assert batch["image"].shape[0] == len(items)
    read = val_ds[1]
    assert type(read["image"]) is type(fresh[1]["image"]) is torch.Tensor
    assert torch.equal(read["image"], fresh[1]["image"])


def test_cosine_schedule_follows_the_steps(tmp_path):
    """Without a budget the cosine runs over epochs * steps per epoch, one value per step."""
    cfg = tiny_config(tmp_path / "results", train={"epochs": 3, "batch_size": 8,
                                                   "scheduler": "cosine", "learning_rate": 0.01})
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    train_model(cfg, "ds", "seed_cnn")
    rows = _history(tmp_path / "results" / "ds" / "models" / "seed_cnn")
    steps = 2  # 12 training cases, batch 8
    for row in rows:
        last_step = int(row["epoch"]) * steps - 1  # the lr of the epoch's last step
        expected = 0.01 * 0.5 * (1 + math.cos(math.pi * last_step / (3 * steps)))
        assert float(row["lr"]) == pytest.approx(expected)


def test_a_budget_that_does_not_bind_changes_nothing(tmp_path, monkeypatch):
    """With ``max_minutes`` far from binding the run equals the run without it, bit for bit.

    The loop's clock is replaced by one that ticks 0.1 s per reading, so the first step reads
    t = 0.1 s / 30 s = 0.0033 of the budget: read directly (before CLOCK_SLACK) that lowered the
    first learning rates, and the weights differed from run to run with the machine's timing.
    """
    import types

    import capsmed.train.loop as loop

    ticks = iter(0.1 * k for k in range(100_000))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(
        perf_counter=lambda: next(ticks), sleep=time.sleep))
    weights, histories = [], []
    for name, budget in (("none", None), ("budget", 0.5)):
        train = {"epochs": 3, "batch_size": 8, "scheduler": "cosine", "learning_rate": 0.01}
        if budget is not None:
            train["max_minutes"] = budget
        (tmp_path / name).mkdir()
        cfg = tiny_config(tmp_path / name / "results", train=train)
        prepare_all(write_config(cfg, tmp_path / name / "config.yaml"))
        train_model(cfg, "ds", "seed_cnn")
        model_dir = tmp_path / name / "results" / "ds" / "models" / "seed_cnn"
        weights.append(load_checkpoint(model_dir / "last.pt")["state_dict"])
        histories.append(_history(model_dir))
    assert histories[0] == histories[1]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key

def test_ema_select_last_and_resume(tmp_path):
    """EMA weights are validated and saved; select=last keeps the last; resuming is exact."""
    train = {"epochs": 3, "batch_size": 8, "ema_decay": 0.9, "select": "last",
             "class_weights": "balanced", "scheduler": "cosine"}
    ref = tiny_config(tmp_path / "ref", train=train)
    prepare_all(write_config(ref, tmp_path / "ref.yaml"))
    record = train_model(ref, "ds", "seed_cnn")
    model_dir = tmp_path / "ref" / "ds" / "models" / "seed_cnn"
    best, last = load_checkpoint(model_dir / "best.pt"), load_checkpoint(model_dir / "last.pt")
    assert record["select"] == "last" and best["epoch"] == last["epoch"] == 3
    assert record["checkpoint_epoch"] == 3
    for key, value in best["state_dict"].items():
        assert torch.equal(value, last["state_dict"][key])  # the EMA weights, in both
    assert int(last["ema"]["n_averaged"]) == 3 * 2 + 1  # the initial copy and six steps
    raw = last["train_state_dict"]
    assert any(not torch.equal(raw[k], v) for k, v in best["state_dict"].items())

    run = tiny_config(tmp_path / "run", train=train)
    prepare_all(write_config(run, tmp_path / "run.yaml"))
    assert train_model(run, "ds", "seed_cnn", max_epochs=1)["partial"]
    train_model(run, "ds", "seed_cnn")
    resumed = load_checkpoint(tmp_path / "run" / "ds" / "models" / "seed_cnn" / "best.pt")
    for key, value in best["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert _history(tmp_path / "run" / "ds" / "models" / "seed_cnn") == _history(model_dir)


def test_a_model_variant_trains_under_its_own_name(tmp_path):
    cfg = tiny_config(tmp_path / "results", models=["seed_small"])
    cfg["models"]["seed_small"] = {"model": "seed_cnn", "args": {"channels": 4}, "train": {}}
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    record = train_model(cfg, "ds", "seed_small")
    assert record["model"] == "seed_small" and record["model_class"] == "seed_cnn"
    ckpt = load_checkpoint(tmp_path / "results" / "ds" / "models" / "seed_small" / "best.pt")
    assert ckpt["model"]["name"] == "seed_cnn" and ckpt["model"]["entry"] == "seed_small"
    model = build_model(ckpt)
    assert model.num_parameters() == record["params"]


def test_early_stop_and_validation_interval_survive_resuming(tmp_path):
    """val_every validates every other epoch (and the last); patience stops at the first epoch
    where it runs out; a run resumed across the stop, or started again after it, ends where an
    uninterrupted run ends, with the same weights."""
    train = {"epochs": 8, "batch_size": 8, "val_every": 2, "patience": 1}
    ref = tiny_config(tmp_path / "ref", train=train)
    prepare_all(write_config(ref, tmp_path / "ref.yaml"))
    record = train_model(ref, "ds", "seed_cnn")
    model_dir = tmp_path / "ref" / "ds" / "models" / "seed_cnn"
    rows = _history(model_dir)
    best, bad, stop = -math.inf, 0, None
    for row in rows:
        epoch, metric = int(row["epoch"]), float(row["val_metric"])
        assert math.isnan(metric) == (epoch % 2 == 1), row
        if not math.isnan(metric):
            best, bad = (metric, 0) if metric > best else (best, bad + 1)
        if bad >= 1:
            stop = epoch
            break
    assert stop is not None and stop < 8, "this seed stops early; the test needs it to"
    assert len(rows) == record["epochs"] == stop
    assert load_checkpoint(model_dir / "last.pt")["bad_epochs"] == 1

    again = train_model(ref, "ds", "seed_cnn")  # after the stop: nothing more to train
    assert _history(model_dir) == rows and again["epochs"] == stop
    assert again["checkpoint_sha256"] == record["checkpoint_sha256"]

    run = tiny_config(tmp_path / "run", train=train)
    prepare_all(write_config(run, tmp_path / "run.yaml"))
    assert train_model(run, "ds", "seed_cnn", max_epochs=1)["partial"]
    resumed = train_model(run, "ds", "seed_cnn")
    run_dir = tmp_path / "run" / "ds" / "models" / "seed_cnn"
    assert _history(run_dir) == rows and resumed["best_epoch"] == record["best_epoch"]
    best_ref, best_run = load_checkpoint(model_dir / "best.pt"), load_checkpoint(run_dir / "best.pt")
    for key, value in best_ref["state_dict"].items():
        assert torch.equal(value, best_run["state_dict"][key]), key


def _ticking_clock(monkeypatch, tick: float) -> None:
    """Replace the loop's clock by one that advances ``tick`` seconds per reading."""
    import types

    import capsmed.train.loop as loop

    ticks = iter(tick * k for k in range(1_000_000))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(
        perf_counter=lambda: next(ticks), sleep=time.sleep))


def _log_of(fn, *args, **kwargs):
    """Run ``fn`` and return ``(its result, what capsmed.train.loop logged)``."""
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("capsmed.train.loop")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        result = fn(*args, **kwargs)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    return result, stream.getvalue()


def test_a_binding_budget_stops_on_a_validated_epoch_and_a_restart_trains_no_more(
        tmp_path, monkeypatch):
    """A 6 s budget on a clock ticking 1 s per reading (5 readings per epoch: its start, one per
    batch, after the training pass, at its end) is spent in the training pass of epoch 2, which
    val_every 5 would not validate: it is validated, the run stops there with stop_reason
    time_budget, and started again (whole, or resumed after epoch 1) it trains nothing more."""
    _ticking_clock(monkeypatch, 1.0)
    train = {"epochs": 8, "batch_size": 8, "val_every": 5, "max_minutes": 0.1,
             "scheduler": "cosine"}
    ref = tiny_config(tmp_path / "ref", train=train)
    prepare_all(write_config(ref, tmp_path / "ref.yaml"))
    record = train_model(ref, "ds", "seed_cnn")
    model_dir = tmp_path / "ref" / "ds" / "models" / "seed_cnn"
    rows = _history(model_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert math.isnan(float(rows[0]["val_metric"])) and not math.isnan(float(rows[1]["val_metric"]))
    assert record["stop_reason"] == "time_budget" and record["epochs"] == 2
    assert record["train_seconds"] == 8.0  # 4 s per epoch; epoch 2 starts at 4 s < 6 s
    last, best = load_checkpoint(model_dir / "last.pt"), load_checkpoint(model_dir / "best.pt")
    assert last["stop_reason"] == "time_budget" and last["epoch"] == 2
    assert best["epoch"] == record["best_epoch"] == 2 == record["checkpoint_epoch"]
    assert best["best_metric"] == float(rows[1]["val_metric"]) == record["best_metric"]

    again, log = _log_of(train_model, ref, "ds", "seed_cnn")
    assert "stopped after epoch 2 (time_budget); nothing left to train" in log
    assert _history(model_dir) == rows
    assert load_checkpoint(model_dir / "last.pt")["epoch"] == 2
    drop = ("peak_memory_mb",)  # the process's resident set, not the run's
    assert {k: v for k, v in again.items() if k not in drop} == \
        {k: v for k, v in record.items() if k not in drop}

    run = tiny_config(tmp_path / "run", train=train)
    prepare_all(write_config(run, tmp_path / "run.yaml"))
    assert train_model(run, "ds", "seed_cnn", max_epochs=1)["partial"]
    resumed = train_model(run, "ds", "seed_cnn")
    run_dir = tmp_path / "run" / "ds" / "models" / "seed_cnn"
    assert _history(run_dir) == rows and resumed["stop_reason"] == "time_budget"
    assert train_model(run, "ds", "seed_cnn", max_epochs=1)["epochs"] == 2  # stopped: a record
    best_ref, best_run = load_checkpoint(model_dir / "best.pt"), load_checkpoint(run_dir / "best.pt")
    for key, value in best_ref["state_dict"].items():
        assert torch.equal(value, best_run["state_dict"][key]), key


def test_stop_reasons_of_epochs_and_early_stopping_are_recorded(tmp_path):
    cfg = tiny_config(tmp_path / "a", train={"epochs": 2, "batch_size": 8})
    prepare_all(write_config(cfg, tmp_path / "a.yaml"))
    assert train_model(cfg, "ds", "seed_cnn")["stop_reason"] == "epochs"
    assert load_checkpoint(tmp_path / "a/ds/models/seed_cnn/last.pt")["stop_reason"] == "epochs"
    early = tiny_config(tmp_path / "b", train={"epochs": 8, "batch_size": 8, "patience": 1})
    prepare_all(write_config(early, tmp_path / "b.yaml"))
    record = train_model(early, "ds", "seed_cnn")
    assert record["stop_reason"] == "early_stop" and record["epochs"] < 8


def _partial_run(tmp_path, **train):
    cfg = tiny_config(tmp_path / "results", train={"epochs": 2, "batch_size": 8, **train},
                      preprocess={"cache": "disk"})
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    assert train_model(cfg, "ds", "seed_cnn", max_epochs=1)["partial"]
    return cfg


def test_memory_settings_do_not_restart_training(tmp_path):
    """threads, preprocess.cache and inference.sw_batch_size change memory or speed only."""
    from capsmed.config import validate_config

    cfg = _partial_run(tmp_path)
    ds = cfg["datasets"]["ds"]
    changed = validate_config({**cfg, "threads": 2, "datasets": {"ds": {
        **ds, "preprocess": {**ds["preprocess"], "cache": "memory"},
        "inference": {"sw_batch_size": 7}}}})
    record, log = _log_of(train_model, changed, "ds", "seed_cnn", threads=1)
    assert "resuming after epoch 1" in log and "from scratch" not in log
    assert record["epochs"] == 2


def test_data_edited_in_place_retrains_from_scratch(tmp_path):
    """A training case's file rewritten (same size, new modification time) is another run."""
    import json

    cfg = _partial_run(tmp_path)
    results = tmp_path / "results" / "ds"
    splits = json.loads((results / "splits.json").read_text())
    cases = {c["case_id"]: c for c in json.loads((results / "data/cases.json").read_text())["cases"]}
    image = __import__("pathlib").Path(cases[splits["folds"][0]["train"][0]]["image"])
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    record, log = _log_of(train_model, cfg, "ds", "seed_cnn")
    assert ("the cases' files (size or modification time) changed since it was written; "
            "training ds/seed_cnn from scratch") in log
    assert "resuming" not in log and record["epochs"] == 2


def test_a_changed_plan_retrains_from_scratch(tmp_path):
    import json

    cfg = _partial_run(tmp_path)
    plan_path = tmp_path / "results/ds/preprocessed/plan.json"
    plan = json.loads(plan_path.read_text())
    plan["normalization"] = "percentile"
    plan_path.write_text(json.dumps(plan))
    _, log = _log_of(train_model, cfg, "ds", "seed_cnn")
    assert "the preprocessing plan (spacing, patch size, normalisation) changed" in log
    assert "resuming" not in log


def test_a_checkpoint_without_resume_identity_is_trained_over(tmp_path):
    from capsmed.infer.runtime import atomic_torch_save

    cfg = _partial_run(tmp_path)
    last = tmp_path / "results/ds/models/seed_cnn/last.pt"
    ckpt = load_checkpoint(last)
    del ckpt["resume_identity"]
    atomic_torch_save(last, ckpt)
    _, log = _log_of(train_model, cfg, "ds", "seed_cnn")
    assert "written without a resume identity (an older capsmed); training ds/seed_cnn" in log


def test_the_disk_cache_key_follows_the_files(tmp_path):
    """An edited file is preprocessed again, not read back from the cache as it was."""
    from capsmed.train.loop import _cache_key, data_digest

    image = tmp_path / "a.nii.gz"
    image.write_bytes(b"x" * 10)
    item = {"image": str(image), "case_id": "a", "class": 0}
    key, digest = _cache_key(item), data_digest([item])
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    touched = data_digest([item])
    assert _cache_key(item) != key and touched != digest
    image.write_bytes(b"y" * 11)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the same time, another size
    assert data_digest([item]) != touched


def _folder_stamps(folder):
    """``{name: (size, mtime_ns)}`` of the files directly in ``folder``."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
            if p.is_file()}


def test_a_fraction_model_trains_on_its_subset_in_its_own_folder(tmp_path):
    """train.fractions: the nested subset's model lands in models/MODEL/fraction-F with the same
    validation cases, budget rule and record; the ordinary model is left as it was."""
    from pathlib import Path

    from capsmed.config import model_config_hash
    from capsmed.data.splits import fraction_cases, stage_cases
    from capsmed.paths import Layout

    cfg = tiny_config(tmp_path / "results", train={"epochs": 1, "batch_size": 8,
                                                   "fractions": [0.5, 1.0],
                                                   "minority_fraction": [0.5]})
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    layout = Layout(Path(cfg["results"]))
    ordinary = train_model(cfg, "ds", "seed_cnn")
    plain_dir = layout.model_dir("ds", "seed_cnn")
    before = _folder_stamps(plain_dir)
    record = train_model(cfg, "ds", "seed_cnn", fraction="0.5")
    assert _folder_stamps(plain_dir) == before
    fdir = layout.fraction_model_dir("ds", "seed_cnn", "0.5")
    assert fdir == plain_dir / "fraction-0.5"
    for name in ("best.pt", "last.pt", "train.json", "history.csv", "inference.json"):
        assert (fdir / name).is_file(), name
    cases = json.loads(layout.cases("ds").read_text())
    splits = json.loads(layout.splits("ds").read_text())
    train_cases = stage_cases(cases, splits, "train", 0)
    expected = fraction_cases(train_cases, 0.5, seed=0, task="classification")
    assert record["train_cases"] == len(expected) == math.floor(len(train_cases) * 0.5 + 0.5)
    assert ordinary["train_cases"] == len(train_cases)
    assert record["val_cases"] == ordinary["val_cases"] == len(splits["folds"][0]["val"])
    assert record["subset"] == {"label": "0.5", "kind": "fraction", "value": 0.5,
                                "minority_class": None, "train_cases": len(expected),
                                "fold_train_cases": len(train_cases)}
    assert ordinary["subset"] is None
    assert record["budget"]["binding"] == ordinary["budget"]["binding"] == "epochs"
    assert record["budget"]["steps"] == math.ceil(len(expected) / 8)
    assert ordinary["budget"]["steps"] == math.ceil(len(train_cases) / 8)
    assert record["budget"]["rule"] == ordinary["budget"]["rule"]
    ckpt = load_checkpoint(fdir / "best.pt")
    assert ckpt["config_hash"] == model_config_hash(cfg, "ds", "seed_cnn", "0.5")
    assert ckpt["config_hash"] != ordinary["config_hash"]
    assert ckpt["subset"]["label"] == "0.5"
    # the minority variant: every case of the other class, half of the rarer one
    minority = train_model(cfg, "ds", "seed_cnn", fraction="minority0.5")
    rare = minority["subset"]["minority_class"]
    n_rare = sum(int(c["class"]) == rare for c in train_cases)
    assert minority["train_cases"] == len(train_cases) - n_rare + math.floor(n_rare * 0.5 + 0.5)
    assert (plain_dir / "fraction-minority0.5" / "best.pt").is_file()
    assert _folder_stamps(plain_dir) == before
    with pytest.raises(CapsmedError, match="fraction 0.25 is not in train.fractions"):
        train_model(cfg, "ds", "seed_cnn", fraction="0.25")


def test_spatial_augment_off_trains_without_flips_but_with_the_crop(tmp_path):
    from capsmed.train.loop import prepare_training, training_data

    cfg = tiny_config(tmp_path / "results", task="segmentation",
                      train={"epochs": 1, "batch_size": 2, "samples_per_case": 1,
                             "spatial_augment": False})
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    train_ds, _ = training_data(prepare_training(cfg, "ds", "unet"))
    names = [type(t).__name__ for t in train_ds.transform.transforms]
    assert "RandCropByPosNegLabeld" in names
    assert not {"RandFlipd", "RandRotate90d", "RandAffined"} & set(names)
    cfg_on = tiny_config(tmp_path / "results", task="segmentation")
    on, _ = training_data(prepare_training(cfg_on, "ds", "unet"))
    assert "RandFlipd" in [type(t).__name__ for t in on.transform.transforms]
