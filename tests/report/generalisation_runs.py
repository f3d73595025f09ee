"""Real tiny runs with shifted stages, for the generalisation page's tests (the real writers only).

Each run trains a CNN baseline and a capsule model of the tiny synthetic dataset ``ds``
(:func:`tests.pipeline_helpers.tiny_config`), evaluates them on the test stage, on the clean
reference (shift ``none``) and under two shifts (:func:`capsmed.evaluate.shift.evaluate_shift`),
and writes ``generalisation.json`` with ``capsmed generalisation``. The classification run also
trains both models on half of their training cases (the learning curve).
"""

from __future__ import annotations

from pathlib import Path

from tests.pipeline_helpers import prepare_all, run_cli, tiny_config, write_config

SHIFTS = ("rotation", "noise")
#: Severities per task: the gallery shows 1, 3 and 5 where they ran, else those that ran.
SEVERITIES = {"segmentation": [1, 3], "classification": [1, 3, 5]}
MODELS = {"segmentation": ("unet", "capsunet"), "classification": ("seed_cnn", "capsnet")}
FRACTION = "0.5"


def build_run(root: Path, task: str) -> tuple[dict, Path]:
    """Train, evaluate and summarise one tiny run under ``root``; returns ``(config, path)``."""
    from capsmed.config import load_config
    from capsmed.evaluate.run import evaluate_stage
    from capsmed.evaluate.shift import evaluate_shift
    from capsmed.train.loop import train_model

    models = list(MODELS[task])
    extra = {"shift": {"shifts": list(SHIFTS), "severities": SEVERITIES[task]}}
    if task == "segmentation":
        extra["inference"] = {"tta": False}
    else:
        extra["train"] = {"epochs": 3, "batch_size": 8, "fractions": [float(FRACTION), 1.0]}
    cfg = tiny_config(root / "results", task=task, models=models, **extra)
    if task == "segmentation":
        cfg["models"]["capsunet"] = {"args": {
            "encoder_channels": [4, 8], "primary_capsules": 2, "primary_dim": 4, "capsules": 2,
            "capsule_dim": 4, "class_dim": 4, "decoder_channels": [8, 4, 4]}}
    else:
        cfg["models"]["capsnet"] = {"args": {"conv_channels": 16, "primary_capsules": 4}}
    path = write_config(cfg, root / "config.yaml")
    prepare_all(path)
    cfg = load_config(path)
    for model in models:
        train_model(cfg, "ds", model)
        evaluate_stage(cfg, "ds", model, "test")
        evaluate_shift(cfg, "ds", model, "none")
        for shift in SHIFTS:
            evaluate_shift(cfg, "ds", model, shift)
        if task == "classification":
            train_model(cfg, "ds", model, fraction=FRACTION)
            evaluate_stage(cfg, "ds", model, "test", fraction=FRACTION)
    assert run_cli("-q", "generalisation", "-c", path, "-d", "ds") == 0
    return cfg, path
