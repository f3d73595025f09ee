"""Training recipe parts shared by every model: schedules that end with the budget, EMA, class weights.

The same recipe serves capsule networks and CNN baselines, so that a comparison measures models,
not recipes:

- :func:`training_progress` and :func:`lr_factor`: the learning rate follows the elapsed fraction
  of training, which is the larger of the step fraction (``epochs``) and the time fraction
  (``max_minutes``). A cosine or poly schedule then reaches its end when the budget does, however
  fast the machine is, instead of counting to an epoch number a time budget never reaches. The
  clock only takes over once it runs ahead of the step count by more than ``CLOCK_SLACK`` of the
  budget, so that a run whose budget does not bind follows the step count alone and repeats bit
  for bit (read to the microsecond, the clock changed the first steps' learning rates, and with
  them every later weight, from one run of the same config to the next).
- :class:`ModelEMA`: an exponential moving average of the weights (torch's ``AveragedModel``
  with the usual warm-up of the decay), evaluated and checkpointed in place of the raw weights
  when enabled.
- :func:`balanced_class_weights`: inverse class frequencies for the loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["CLOCK_SLACK", "SCHEDULES", "ModelEMA", "balanced_class_weights", "lr_factor",
           "training_progress"]

logger = logging.getLogger(__name__)

#: Learning-rate schedules by elapsed fraction of training.
SCHEDULES = ("none", "cosine", "poly", "step")

#: Share of the time budget by which the clock must run ahead of the step count before it sets
#: the schedule (18 s of a 15-minute budget: start-up and the first batches' timing never count).
CLOCK_SLACK = 0.02


def training_progress(step: int, total_steps: int, seconds: float,
                      max_minutes: float | None) -> float:
    """Return the elapsed fraction of training in [0, 1].

    Args:
        step: optimiser steps taken so far.
        total_steps: steps of the full ``epochs`` (at least 1).
        seconds: training seconds so far (validation included, as the budget counts them).
        max_minutes: the wall-clock budget, or None.

    Returns:
        ``max(s, (t - CLOCK_SLACK) / (1 - CLOCK_SLACK))`` clipped to [0, 1], with the step
        fraction ``s = step / total_steps`` and the time fraction
        ``t = seconds / (60 * max_minutes)``; ``s`` alone without a budget. The time term is 0 at
        ``t = CLOCK_SLACK`` and 1 when the budget is spent, so a schedule still ends with the
        budget, and a run that ends by ``epochs`` well inside it never lets the clock set it.

    Raises:
        ValueError: when ``total_steps`` < 1 or ``max_minutes`` is not positive.

    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps}")
    progress = step / total_steps
    if max_minutes is not None:
        if max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0; got {max_minutes}")
        clock = seconds / (60.0 * max_minutes)
        progress = max(progress, (clock - CLOCK_SLACK) / (1.0 - CLOCK_SLACK))
    return min(max(progress, 0.0), 1.0)


def lr_factor(schedule: str, progress: float, *, poly_exponent: float = 0.9) -> float:
    """Return the learning-rate multiplier at ``progress`` (elapsed fraction of training).

    Args:
        schedule: ``"none"`` (1), ``"cosine"`` (``(1 + cos(pi p)) / 2``), ``"poly"``
            (``(1 - p) ** 0.9``, nnU-Net's) or ``"step"`` (x0.1 after each third).
        progress: elapsed fraction in [0, 1].
        poly_exponent: exponent of the poly schedule.

    Returns:
        The multiplier in [0, 1].

    Raises:
        ValueError: for an unknown schedule or a progress outside [0, 1].

    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1]; got {progress}")
    if schedule == "none":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1.0 - progress) ** poly_exponent
    if schedule == "step":
        return 0.1 ** min(int(3 * progress), 2)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")


class ModelEMA(AveragedModel):
    """Exponential moving average of a model's weights, with warm-up of the decay.

    PyTorch's :class:`torch.optim.swa_utils.AveragedModel`, averaging with
    :func:`torch.optim.swa_utils.get_ema_multi_avg_fn` at a decay that warms up: the average
    starts as a copy of the initial weights, and after optimiser step ``t`` (counting from 1) it
    moves towards the weights by ``1 - d_t`` with ``d_t = min(decay, (1 + t) / (10 + t))``.
    Early steps, whose weights are far from the final ones, are forgotten quickly, and the
    average is over about ``1 / (1 - decay)`` steps later. Buffers (batch-norm statistics) are
    copied from the model, not averaged (``use_buffers=False``), so the average is normalised with
    the statistics of the weights it was last updated from.

    This is exactly what the earlier hand-written average computed (the same ``lerp`` per step):
    a fixed tiny run (seed_cnn, efficient_capsnet with batch norm, unet; ``ema_decay`` 0.9, three
    epochs) gives the same validation metrics and bit-identical weights with both. torch's
    fixed-decay ``get_ema_multi_avg_fn(decay)`` alone, without the warm-up, keeps the initial
    weights in the average for much longer and changed those runs' validation metrics.

    ``state_dict()`` is ``AveragedModel``'s: ``n_averaged`` (optimiser steps taken plus one, the
    initial copy) and the averaged module's entries under ``module.``.

    Args:
        model: the model being trained.
        decay: the decay in (0, 1).

    Raises:
        ValueError: when ``decay`` is outside (0, 1).

    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1); got {decay}")
        self.decay = float(decay)
        super().__init__(model, multi_avg_fn=self._warm_ema, use_buffers=False)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.update_parameters(model)  # n_averaged 0 -> 1: the average starts as the weights

    @property
    def steps(self) -> int:
        """Optimiser steps averaged in (updates after the initial copy)."""
        return int(self.n_averaged) - 1

    def current_decay(self) -> float:
        """Return the decay the next update uses."""
        t = self.steps + 1
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def _warm_ema(self, averaged: list[torch.Tensor], current: list[torch.Tensor],
                  n_averaged: torch.Tensor | int) -> None:
        """``AveragedModel``'s ``multi_avg_fn``: torch's EMA step at the warmed-up decay.

        ``n_averaged`` is the optimiser step ``t`` being averaged in (1 after the initial copy).
        """
        t = int(n_averaged)
        get_ema_multi_avg_fn(min(self.decay, (1.0 + t) / (10.0 + t)))(averaged, current, t)


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Return inverse-frequency class weights ``n / (K * n_k)`` (scikit-learn's "balanced").

    Args:
        labels: class index of every training case.
        num_classes: ``K``.

    Returns:
        Float tensor ``(K,)``; a class absent from ``labels`` gets weight 0 (nothing to weigh).

    Raises:
        ValueError: when ``labels`` is empty or holds an index outside ``[0, K)``.

    """
    if len(labels) == 0:
        raise ValueError("cannot weigh classes of an empty training set")
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes)
    if counts.numel() != num_classes:
        raise ValueError(f"class indices must lie in [0, {num_classes}); got {sorted(set(labels))}")
    weights = torch.zeros(num_classes, dtype=torch.float32)
    present = counts > 0
    weights[present] = len(labels) / (num_classes * counts[present].float())
    return weights
