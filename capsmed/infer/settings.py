"""Inference settings: decided once by the run's config, recorded beside the model, read by predict.

Two kinds of setting:

- **Result settings** (:data:`RESULT_KEYS`) change what a prediction is: the sliding-window
  ``overlap`` and blending ``mode``, test-time augmentation (``tta``, and which flips:
  ``tta_flips``), ``largest_component`` post-processing and the forward pass's ``precision``.
  They come from the config (``inference`` < ``datasets.NAME.inference``), and
  :func:`record_settings` writes them to ``inference.json`` in the model folder, beside
  ``best.pt``, when the model is trained and again whenever it is evaluated. ``capsmed predict``
  reads that file from the checkpoint's folder (:func:`read_settings`), so a new study is predicted
  as the validated stages were. A command-line flag may override one; the override is written into
  the outputs' provenance (:func:`apply_overrides`).
- **Run-time settings** (:data:`RUNTIME_KEYS`): ``sw_batch_size`` and the memory budget
  ``memory_mb`` (:mod:`capsmed.infer.bounded` derives the band and window batch of a study from
  it) change only memory and time, not the result, and are chosen where inference runs; they are
  never recorded as part of a model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capsmed.config import INFERENCE_RUNTIME_KEYS, inference_config
from capsmed.errors import CapsmedError
from capsmed.fileio import json_dumps, read_json, write_text_if_changed

logger = logging.getLogger(__name__)

#: The file in a model folder that holds its inference settings.
SETTINGS_FILE = "inference.json"
#: Settings that change a prediction, with the schema's defaults (used for model folders written
#: before the settings were recorded).
RESULT_DEFAULTS: dict[str, Any] = {"overlap": 0.25, "mode": "gaussian", "tta": True,
                                   "tta_flips": "axes", "largest_component": False,
                                   "precision": "float32"}
RESULT_KEYS = tuple(RESULT_DEFAULTS)
#: Settings that change only memory and time.
RUNTIME_DEFAULTS: dict[str, Any] = {"sw_batch_size": 2, "memory_mb": None}
RUNTIME_KEYS = INFERENCE_RUNTIME_KEYS  # the config's evaluation hash leaves these out
_CHOICES = {"mode": ("gaussian", "constant"), "tta_flips": ("axes", "mirror"),
            "precision": ("float32", "bfloat16")}


def result_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The result settings of ``settings``, in :data:`RESULT_KEYS` order (defaults filled in)."""
    return {k: settings.get(k, RESULT_DEFAULTS[k]) for k in RESULT_KEYS}


def config_settings(cfg: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Every inference setting the config gives a dataset: result and run-time keys.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.

    Returns:
        ``{overlap, mode, tta, tta_flips, largest_component, precision, sw_batch_size,
        memory_mb}``.
    """
    icfg = inference_config(cfg, dataset)
    out = result_settings(icfg)
    out.update({k: icfg.get(k, v) for k, v in RUNTIME_DEFAULTS.items()})
    return out


def check_settings(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check result and run-time settings; returns them with defaults filled in.

    Raises:
        CapsmedError: An unknown key or a value out of range, naming ``where`` (a file or flag).
    """
    unknown = sorted(set(settings) - set(RESULT_KEYS) - set(RUNTIME_KEYS))
    if unknown:
        raise CapsmedError(f"{where}: unknown inference settings {unknown}; known: "
                           f"{list(RESULT_KEYS + RUNTIME_KEYS)}")
    out = {**RESULT_DEFAULTS, **RUNTIME_DEFAULTS, **dict(settings)}
    overlap = out["overlap"]
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise CapsmedError(f"{where}: overlap must be a number in [0, 1), got {overlap!r}")
    for key in ("tta", "largest_component"):
        if not isinstance(out[key], bool):
            raise CapsmedError(f"{where}: {key} must be true or false, got {out[key]!r}")
    for key, choices in _CHOICES.items():
        if out[key] not in choices:
            raise CapsmedError(f"{where}: {key} must be one of {list(choices)}, got {out[key]!r}")
    batch = out["sw_batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CapsmedError(f"{where}: sw_batch_size must be a positive integer, got {batch!r}")
    budget = out["memory_mb"]
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or budget <= 0):
        raise CapsmedError(f"{where}: memory_mb must be a positive number of MB or null, "
                           f"got {budget!r}")
    return out


def record_settings(model_dir: Path, settings: Mapping[str, Any]) -> Path:
    """Write the result settings to ``{model_dir}/inference.json`` (only when they change).

    Args:
        model_dir: The model folder (``best.pt``'s folder).
        settings: Inference settings; only :data:`RESULT_KEYS` are recorded.

    Returns:
        The file's path.
    """
    path = Path(model_dir) / SETTINGS_FILE
    write_text_if_changed(path, json_dumps({"settings": result_settings(settings)}))
    return path


def read_settings(checkpoint: Path) -> tuple[dict[str, Any], str]:
    """The recorded result settings of a checkpoint's model: ``(settings, source)``.

    Args:
        checkpoint: A ``.pt`` file; its folder's ``inference.json`` is read.

    Returns:
        The settings and where they came from (the file's path, or ``"defaults"`` with a warning
        when the folder has none, as model folders written before the settings were recorded).

    Raises:
        CapsmedError: The file exists but is unreadable or holds bad settings.
    """
    path = Path(checkpoint).parent / SETTINGS_FILE
    if not path.is_file():
        logger.warning("%s: no %s beside the checkpoint; using the default inference settings %s",
                       checkpoint, SETTINGS_FILE, RESULT_DEFAULTS)
        return dict(RESULT_DEFAULTS), "defaults"
    doc = read_json(path, "inference settings")
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
        raise CapsmedError(f"{path}: not an inference settings file (no 'settings' object)")
    unknown = sorted(set(doc["settings"]) - set(RESULT_KEYS))
    if unknown:
        raise CapsmedError(f"{path}: unknown inference settings {unknown}")
    return result_settings(check_settings(doc["settings"], str(path))), str(path)


def apply_overrides(settings: Mapping[str, Any], overrides: Mapping[str, Any] | None,
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings with command-line overrides applied: ``(settings, overrides that changed one)``.

    ``None`` values in ``overrides`` mean "not given". The second dict holds each override that
    differs from the recorded value as ``{key: {"recorded": old, "used": new}}``, for provenance.
    """
    out = dict(settings)
    changed: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in RESULT_KEYS and out.get(key) != value:
            changed[key] = {"recorded": out.get(key), "used": value}
        out[key] = value
    return check_settings(out, "command-line inference settings"), changed


def flip_sets(axes: list[int] | tuple[int, ...], flips: str) -> list[tuple[int, ...]]:
    """The test-time flips over spatial ``axes`` (0-based): the unflipped pass first.

    Args:
        axes: Spatial axes that may be flipped.
        flips: ``axes`` (none, then each axis alone) or ``mirror`` (every combination: nnU-Net's
            mirroring, ``2^len(axes)`` passes).

    Returns:
        One tuple of spatial axes per pass; ``()`` is the image itself.
    """
    from itertools import combinations

    axes = tuple(int(a) for a in axes)
    if flips == "mirror":
        return [c for r in range(len(axes) + 1) for c in combinations(axes, r)]
    return [()] + [(a,) for a in axes]
