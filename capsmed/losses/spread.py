"""Spread loss of Hinton, Sabour and Frosst (2018) for matrix-capsule class activations."""

from __future__ import annotations

import logging

import torch
from torch import nn

from capsmed.layers.tensors import plain_tensor
from capsmed.losses.margin import as_one_hot

__all__ = ["SpreadLoss"]

logger = logging.getLogger(__name__)

_REDUCTIONS = ("mean", "sum", "none")


class SpreadLoss(nn.Module):
    """Spread loss on class activations, with the margin annealed from 0.2 to 0.9.

    Per sample, with ``a_t`` the activation of the true class:
    ``L = sum_{i != t} max(0, m - (a_t - a_i))^2`` (Hinton et al. 2018, eq. 3). "Starting with a
    small margin of 0.2 and linearly increasing it during training to 0.9": the margin is
    ``m = m_min + (m_max - m_min) * progress`` where ``progress`` in [0, 1] is the elapsed fraction
    of training, set by the training loop through :meth:`set_progress` (it follows the same clock
    as the learning-rate schedule, so a time-budgeted run reaches 0.9 at its end). Before any call
    the margin is ``m_min``.

    Works for classification, activations ``(B, C)``, and per voxel for ``(B, C, *S)``. Targets:
    class indices ``(B,)`` / ``(B, *S)`` / ``(B, 1, *S)`` or one-hot (hard) like the activations.

    Args:
        m_min: margin at the start of training, in (0, 1].
        m_max: margin at the end, in [m_min, 1].
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample / voxel).

    Raises:
        ValueError: when a margin is out of range or the reduction unknown.
    """

    def __init__(self, m_min: float = 0.2, m_max: float = 0.9, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 < m_min <= 1.0:
            raise ValueError(f"m_min must lie in (0, 1]; got {m_min}")
        if not m_min <= m_max <= 1.0:
            raise ValueError(f"m_max must lie in [m_min={m_min}, 1]; got {m_max}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
        self.m_min = float(m_min)
        self.m_max = float(m_max)
        self.reduction = reduction
        self.progress = 0.0

    @property
    def margin(self) -> float:
        """The current margin ``m``."""
        return self.m_min + (self.m_max - self.m_min) * self.progress

    def set_progress(self, progress: float) -> None:
        """Set the elapsed fraction of training (moves the margin linearly from m_min to m_max).

        Raises:
            ValueError: for a progress outside [0, 1].
        """
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must lie in [0, 1]; got {progress}")
        self.progress = float(progress)

    def forward(self, activations: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the spread loss.

        Args:
            activations: ``(B, C)`` or ``(B, C, *S)``.
            target: class indices or one-hot (see the class docstring).

        Returns:
            Scalar for ``"mean"`` / ``"sum"``; ``(B,)`` or ``(B, *S)`` for ``"none"``.

        Raises:
            ValueError: when the target does not fit (see :func:`capsmed.losses.as_one_hot`).
        """
        per_item = self.forward_items(activations, target)
        if self.reduction == "mean":
            return per_item.mean()
        if self.reduction == "sum":
            return per_item.sum()
        return per_item

    def forward_items(self, activations: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss per sample ``(B,)`` (or per voxel ``(B, *S)``), whatever the reduction."""
        activations = plain_tensor(activations)
        one_hot = as_one_hot(target, activations)
        a_true = (one_hot * activations).sum(dim=1, keepdim=True)
        gap = torch.clamp(self.margin - (a_true - activations), min=0.0).pow(2)
        return ((1.0 - one_hot) * gap).sum(dim=1)

    def extra_repr(self) -> str:
        """Describe the settings in the module repr."""
        return f"m_min={self.m_min}, m_max={self.m_max}, reduction={self.reduction!r}"
