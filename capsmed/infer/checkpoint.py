"""Checkpoints: self-describing, written atomically, loaded as data (``weights_only=True``).

A checkpoint is a dict of tensors and plain Python values:

``{"format": 1, "model": {"name" (registered model), "entry" (config entry), "spatial_dims",
"in_channels", "out_channels", "args"}, "state_dict" (the evaluated weights: the EMA average when
``train.ema_decay`` is set), "task", "plan", "labels" | "classes", "config_hash", "seed",
"versions", "label_codes" (the labels' SNOMED CT codes, or None), "epoch", "step", "best_metric",
"best_epoch", "metric_name", "history", "resume_identity", "subset"}`` (``subset``: the training
share of a learning-curve model, None for the ordinary one) (the hashes of model, training
settings, plan, cases, data digest and validation that a resume must share) and, in ``last.pt``
only, ``"stop_reason"`` (None while training goes on, else ``epochs``, ``time_budget`` or
``early_stop``), the ``"optimizer"`` state and, with EMA, ``"train_state_dict"`` (the raw weights)
and ``"ema"`` (the ``torch.optim.swa_utils.AveragedModel`` state) for resuming; the learning rate is
recomputed from ``step`` and the training seconds. ``best.pt`` carries all that inference needs.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from capsmed.errors import CapsmedError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint as data; never executes code from the file.

    Args:
        path: A ``.pt`` file written by capsmed.
        map_location: Where tensors go.

    Returns:
        The checkpoint dict.

    Raises:
        CapsmedError: If the file is missing, truncated, not a capsmed checkpoint, or would need
            arbitrary code to load.
    """
    path = Path(path)
    if not path.is_file():
        raise CapsmedError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CapsmedError(f"{path}: not a readable capsmed checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CapsmedError(f"{path}: not a capsmed checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return ckpt


def build_model(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the model described by a checkpoint and load its weights.

    Args:
        ckpt: A dict from :func:`load_checkpoint`.

    Returns:
        The model in eval mode, on the CPU.
    """
    from capsmed.models import get_model

    spec = ckpt["model"]
    model = get_model(
        spec["name"], spec["spatial_dims"], spec["in_channels"], spec["out_channels"], **spec["args"]
    )
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model
