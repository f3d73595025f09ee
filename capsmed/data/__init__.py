"""capsmed.data: dataset sources, validation, fingerprint and plan, MONAI transforms, splits, shifts.

Public API (PLAN.md, "Data API"), importable from here or from the submodules:

- :func:`capsmed.data.sources.prepare_dataset`, :func:`capsmed.data.sources.load_cases`
- :func:`capsmed.data.validate.validate_path`, :func:`capsmed.data.validate.validate_dataset_config`
- :func:`capsmed.data.fingerprint.compute_fingerprint`, :func:`capsmed.data.fingerprint.make_plan`
- :func:`capsmed.data.transforms.build_transforms`,
  :func:`capsmed.data.transforms.build_preprocess_transforms`,
  :func:`capsmed.data.transforms.build_augment_transforms`
- :func:`capsmed.data.splits.make_splits`, :func:`capsmed.data.splits.load_or_create_splits`,
  :func:`capsmed.data.splits.fraction_cases` (learning-curve subsets)
- :func:`capsmed.data.shifts.apply_shift`, :func:`capsmed.data.shifts.default_shifts`,
  :func:`capsmed.data.shifts.shift_settings`

Names are imported lazily so that ``capsmed validate`` does not pay for importing torch and MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "prepare_dataset": "sources",
    "load_cases": "sources",
    "validate_path": "validate",
    "validate_dataset_config": "validate",
    "compute_fingerprint": "fingerprint",
    "make_plan": "fingerprint",
    "build_transforms": "transforms",
    "build_preprocess_transforms": "transforms",
    "build_augment_transforms": "transforms",
    "make_splits": "splits",
    "load_or_create_splits": "splits",
    "fold_cases": "splits",
    "fraction_cases": "splits",
    "apply_shift": "shifts",
    "default_shifts": "shifts",
    "shift_settings": "shifts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"capsmed.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'capsmed.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
