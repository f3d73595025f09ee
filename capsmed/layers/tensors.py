"""Tensor helpers shared by layers, losses and models."""

from __future__ import annotations

import torch

__all__ = ["plain_tensor"]


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` without MONAI ``MetaTensor`` metadata (a no-op for plain tensors).

    Indexing, one-hot and capsule arithmetic then run on a plain ``torch.Tensor``.

    Args:
        x: any tensor.

    Returns:
        The same data as a plain ``torch.Tensor`` (no copy).
    """
    as_tensor = getattr(x, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else x
