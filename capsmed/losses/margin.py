"""Margin loss of Sabour et al. (2017) for capsule lengths, for classification and segmentation."""

from __future__ import annotations

import logging

import torch
from torch import nn

from capsmed.layers.tensors import plain_tensor

__all__ = ["MarginLoss", "as_one_hot"]

logger = logging.getLogger(__name__)

_REDUCTIONS = ("mean", "sum", "none")


def as_one_hot(target: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Turn class indices or a one-hot target into a float one-hot tensor shaped like ``scores``.

    Accepted targets for ``scores`` of shape ``(B, C, *S)`` (``S`` empty for classification):

    - one-hot (or soft) targets of the same shape ``(B, C, *S)``, any dtype, values in [0, 1];
    - class indices ``(B, *S)``;
    - class indices with a channel axis ``(B, 1, *S)`` (MONAI label layout).

    Indices may be integer tensors or floating tensors holding whole numbers (MONAI loads label maps
    as float).

    Args:
        target: class indices or one-hot target, see above.
        scores: tensor ``(B, C, *S)`` whose shape the result takes.

    Returns:
        Float tensor ``(B, C, *S)`` with the dtype and device of ``scores``.

    Raises:
        ValueError: when the shapes do not fit one of the layouts above, when indices are not whole
            numbers or fall outside ``[0, C)``, or when one-hot values fall outside [0, 1].

    """
    target = plain_tensor(target)
    if scores.dim() < 2:
        raise ValueError(f"scores must have shape (B, C, *S); got shape {tuple(scores.shape)}")
    num_classes = scores.shape[1]
    shape = tuple(scores.shape)
    index_shape = shape[:1] + shape[2:]
    if tuple(target.shape) == shape:
        one_hot = target.to(dtype=scores.dtype, device=scores.device)
        if one_hot.numel() and (one_hot.min() < 0 or one_hot.max() > 1):
            raise ValueError("one-hot target values must lie in [0, 1]")
        return one_hot
    channel_axis = target.dim() == scores.dim() and target.shape[1] == 1
    if channel_axis and tuple(target.shape[2:]) == shape[2:]:
        target = target[:, 0]
    if tuple(target.shape) != index_shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not fit scores shape {shape}: expected class "
            f"indices {index_shape} or {shape[:1] + (1,) + shape[2:]}, or one-hot {shape}"
        )
    if target.is_floating_point():
        if not torch.equal(target, target.round()):
            raise ValueError("target class indices must be whole numbers")
    elif target.dtype == torch.bool:
        target = target.long()
    index = target.long().to(scores.device)
    if index.numel() and (index.min() < 0 or index.max() >= num_classes):
        raise ValueError(
            f"target class indices must lie in [0, {num_classes}); got values from "
            f"{int(index.min())} to {int(index.max())}"
        )
    one_hot = torch.nn.functional.one_hot(index, num_classes)  # (B, *S, C)
    return one_hot.movedim(-1, 1).to(scores.dtype)


class MarginLoss(nn.Module):
    """Margin loss on capsule lengths (Sabour, Frosst and Hinton 2017, eq. 4).

    Per sample (or voxel):
    ``sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2`` where ``T_k`` is 1
    for the true class and ``|v_k|`` the length of class capsule ``k``.

    Works for classification, lengths ``(B, C)``, and for segmentation, lengths ``(B, C, *S)`` with
    one loss value per voxel. Targets: class indices ``(B,)`` / ``(B, *S)`` / ``(B, 1, *S)``, or
    one-hot (soft values allowed) of the same shape as the lengths.

    Args:
        m_plus: margin a present class's length should exceed, in (0, 1].
        m_minus: margin an absent class's length should stay below, in [0, m_plus).
        lambda_: down-weighting of the absent-class term, >= 0.
        reduction: ``"mean"`` (over batch and voxels), ``"sum"``, or ``"none"`` (returns the
            per-sample ``(B,)`` or per-voxel ``(B, *S)`` loss).

    Raises:
        ValueError: when a margin is outside its range, ``lambda_`` is negative, or the reduction
            is unknown.

    """

    def __init__(
        self,
        m_plus: float = 0.9,
        m_minus: float = 0.1,
        lambda_: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if not 0.0 < m_plus <= 1.0:
            raise ValueError(f"m_plus must lie in (0, 1]; got {m_plus}")
        if not 0.0 <= m_minus < m_plus:
            raise ValueError(f"m_minus must lie in [0, m_plus={m_plus}); got {m_minus}")
        if lambda_ < 0:
            raise ValueError(f"lambda_ must be >= 0; got {lambda_}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
        self.m_plus = float(m_plus)
        self.m_minus = float(m_minus)
        self.lambda_ = float(lambda_)
        self.reduction = reduction

    def forward(self, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the margin loss.

        Args:
            lengths: capsule lengths ``(B, C)`` or ``(B, C, *S)``, values in [0, 1).
            target: class indices ``(B,)`` / ``(B, *S)`` / ``(B, 1, *S)`` or one-hot like
                ``lengths``.

        Returns:
            Scalar for ``"mean"`` and ``"sum"``; ``(B,)`` or ``(B, *S)`` for ``"none"``.

        Raises:
            ValueError: when the target does not fit the lengths (see :func:`as_one_hot`).

        """
        lengths = plain_tensor(lengths)
        one_hot = as_one_hot(target, lengths)
        present = one_hot * torch.clamp(self.m_plus - lengths, min=0.0).pow(2)
        absent = torch.clamp(lengths - self.m_minus, min=0.0).pow(2)
        absent = self.lambda_ * (1.0 - one_hot) * absent
        per_item = (present + absent).sum(dim=1)  # (B, *S)
        if self.reduction == "mean":
            return per_item.mean()
        if self.reduction == "sum":
            return per_item.sum()
        return per_item

    def extra_repr(self) -> str:
        """Describe the settings in the module repr."""
        return (
            f"m_plus={self.m_plus}, m_minus={self.m_minus}, lambda_={self.lambda_}, "
            f"reduction={self.reduction!r}"
        )
