"""Squashing non-linearities for capsule vectors.

Both functions map a vector ``s`` to a vector with the same direction and a length in ``[0, 1)``:

* :func:`squash` (Sabour et al. 2017, eq. 1): ``|s|^2 / (1 + |s|^2) * s / |s|``.
* :func:`squash_efficient` (Mazzia et al. 2021, Efficient-CapsNet): ``(1 - exp(-|s|)) * s / |s|``.

Public PyTorch ports compute ``s / |s|`` with ``torch.norm``, whose gradient is NaN at ``s = 0``. Here
the norm is ``sqrt(|s|^2 + eps)``, so value and gradient are finite everywhere, also at zero. Half
precision inputs (float16, bfloat16) are squashed in float32 (where ``eps`` does not underflow) and
returned in their own dtype.
"""

from __future__ import annotations

import torch

__all__ = ["squash", "squash_efficient"]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def squash(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Squash capsule vectors along ``dim`` (Sabour et al. 2017, eq. 1).

    ``v = |x|^2 / (1 + |x|^2) * x / sqrt(|x|^2 + eps)``. With ``eps > 0`` the value and the gradient
    are finite at ``x = 0`` (both are 0 there); for ``|x|^2 >> eps`` the result equals the paper's
    formula to float precision.

    Args:
        x: capsule tensor of any shape, e.g. ``(B, capsules, dim, *spatial)`` or ``(B, capsules, dim)``.
        dim: the capsule (pose) dimension to squash along.
        eps: added to the squared norm before the square root; must be > 0 for a finite gradient at 0.

    Returns:
        Tensor with the shape of ``x``; vectors along ``dim`` have length in ``[0, 1)``.
    """
    xf = _at_least_float32(x)
    sq = xf.pow(2).sum(dim=dim, keepdim=True)
    scale = sq / (1.0 + sq) / torch.sqrt(sq + eps)
    return (xf * scale).to(x.dtype)


def squash_efficient(x: torch.Tensor, dim: int = -1, eps: float = 1e-20) -> torch.Tensor:
    """Efficient-CapsNet squash along ``dim``: ``(1 - 1/exp(|x|)) * x / |x|`` (Mazzia et al. 2021).

    ``|x|`` is computed as ``sqrt(|x|^2 + eps)`` so the value is 0 and the gradient is finite (the
    identity, the limit of ``(1 - exp(-n)) / n`` as ``n -> 0``) at ``x = 0``. The paper's TensorFlow
    code adds ``eps`` to ``exp(|x|)`` and to ``|x|`` instead; the values agree to float precision
    away from 0. ``1 - exp(-n)`` is computed with ``expm1`` to stay accurate for small ``n``.

    Args:
        x: capsule tensor of any shape, e.g. ``(B, capsules, dim)``.
        dim: the capsule (pose) dimension to squash along.
        eps: added to the squared norm before the square root (> 0; 1e-20 is representable in float32).

    Returns:
        Tensor with the shape of ``x``; vectors along ``dim`` have length in ``[0, 1)``.
    """
    xf = _at_least_float32(x)
    norm = torch.sqrt(xf.pow(2).sum(dim=dim, keepdim=True) + eps)
    return (xf * (-torch.expm1(-norm) / norm)).to(x.dtype)
