"""Helpers for tests that run pipeline stages on tiny data in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import yaml

from capsmed.cli import main as capsmed_main
from capsmed.config import validate_config


def tiny_config(results: Path, task: str = "classification", **dataset_overrides) -> dict:
    """A validated config with one tiny synthetic dataset named ``ds``."""
    if task == "classification":
        ds = {"source": "synthetic", "task": "classification", "spatial_dims": 2,
              "synthetic": {"num_cases": 24, "size": [28, 28], "num_classes": 2},
              "split": {"test_fraction": 0.25, "val_fraction": 0.25},
              "models": ["seed_cnn"], "train": {"epochs": 3, "batch_size": 8},
              "preprocess": {"cache": "none"}}
    else:
        ds = {"source": "synthetic", "task": "segmentation", "spatial_dims": 3,
              "labels": {"0": "background", "1": "a", "2": "b"},
              "synthetic": {"num_cases": 6, "size": [24, 24, 24], "num_classes": 3},
              "preprocess": {"patch_size": [16, 16, 16], "cache": "none"},
              "split": {"test_fraction": 0.34, "val_fraction": 0.34},
              "models": ["unet"], "train": {"epochs": 2, "batch_size": 2, "samples_per_case": 1}}
    ds.update(dataset_overrides)
    cfg = {"results": str(results), "seed": 0, "threads": 1, "datasets": {"ds": ds},
           "models": {"unet": {"args": {"channels": [4, 8], "strides": [2],
                                        "num_res_units": 0}}},
           "evaluate": {"bootstrap": 20}}
    return validate_config(cfg)


def write_config(cfg: dict, path: Path) -> Path:
    """Write a config dict as YAML."""
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str) -> int:
    """Run ``capsmed`` in-process; returns its exit status."""
    return capsmed_main([str(a) for a in args])


def prepare_all(config_path: Path, dataset: str = "ds") -> None:
    """prepare, preprocess and split a dataset."""
    for stage in ("prepare", "preprocess", "split"):
        assert run_cli("-q", stage, "-c", config_path, "-d", dataset) == 0, stage
