"""``CapsmedModel``: the interface every capsmed model implements (PLAN "Model API")."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from capsmed.errors import CapsmedError
from capsmed.layers.tensors import plain_tensor

__all__ = ["CapsmedModel", "capsule_lengths", "plain_tensor"]

logger = logging.getLogger(__name__)

_EPS = 1e-8


def capsule_lengths(poses: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Return capsule lengths with a finite gradient at the zero vector.

    Args:
        poses: capsule pose vectors, e.g. ``(B, C, D)`` or ``(B, C, D, *S)``.
        dim: the pose axis.

    Returns:
        ``|poses|`` along ``dim`` (removed), e.g. ``(B, C)`` or ``(B, C, *S)``; values below 1 for
        squashed capsules. ``sqrt(|v|^2 + 1e-12)``, so a zero capsule has length 1e-6, not a NaN
        gradient.

    """
    return torch.sqrt(poses.pow(2).sum(dim=dim) + 1e-12)


class CapsmedModel(nn.Module):
    """Base class of capsmed models: one class per architecture, 2D and 3D via ``spatial_dims``.

    Class attributes describe the model to the rest of the pipeline:

    - ``task``: ``"classification"`` or ``"segmentation"``.
    - ``output_kind``: ``"logits"`` or ``"lengths"`` (capsule lengths in [0, 1)).
    - ``family``: ``"capsule"`` (a capsule network) or ``"cnn"`` (a baseline); recorded in
      ``train.json`` and read by the comparison page.
    - ``size_divisible``: segmenters need every spatial size divisible by it (instances may set a
      value that depends on their configuration); 1 for classifiers.
    - ``fixed_size``: classifiers built for one input size (``image_size``, e.g. 28 in every
      spatial axis) set it True; ``self.image_size`` then holds that size.
    - ``has_decoder``: the model reconstructs its input in ``forward_train`` (capsule decoders).
    - ``has_coarse_capsules``: ``forward_train`` also returns ``"coarse_lengths"`` (3D-UCaps).
    - ``loss_defaults``: the paper defaults of this model's loss weights (read by
      :func:`capsmed.losses.build_loss`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: number of input channels, >= 1.
        out_channels: number of classes ``C`` (segmentation: including background), >= 2.

    Raises:
        ValueError: when an argument breaks one of the rules above.

    """

    task: ClassVar[str] = "classification"
    output_kind: ClassVar[str] = "logits"
    family: ClassVar[str] = "cnn"
    size_divisible: int = 1
    fixed_size: ClassVar[bool] = False
    has_decoder: ClassVar[bool] = False
    has_coarse_capsules: ClassVar[bool] = False
    #: Smallest spatial size the model accepts in every axis (for non-fixed classifiers).
    min_size: int = 1

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1; got {in_channels!r}")
        if not isinstance(out_channels, int) or out_channels < 2:
            raise ValueError(
                f"out_channels (number of classes, background included) must be an integer >= 2; "
                f"got {out_channels!r}"
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size: int | None = None
        self.loss_defaults: dict[str, Any] = {}

    # ------------------------------------------------------------------ interface
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Return class scores: ``(B, C)`` for classifiers, ``(B, C, *S)`` for segmenters."""
        raise NotImplementedError

    def forward_train(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return the outputs the training loss needs; at least ``{"scores": forward(x)}``.

        Args:
            x: input batch ``(B, in_channels, *S)``.
            target: class indices ``(B,)`` (classification) or label map ``(B, 1, *S)``
                (segmentation); capsule decoders are fed the true class when given, the longest
                capsule otherwise. Unused by models without a decoder.

        Returns:
            Dictionary with at least ``"scores"``.

        """
        return {"scores": self(x)}

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Turn scores into class probabilities that sum to 1 over dim 1.

        Args:
            scores: output of :meth:`forward`, ``(B, C)`` or ``(B, C, *S)``.

        Returns:
            Tensor of the same shape: softmax of logits, or capsule lengths divided by their sum
            (``(l + eps) / sum(l + eps)``, so all-zero lengths give a uniform distribution).

        """
        if self.output_kind == "logits":
            return torch.softmax(scores, dim=1)
        shifted = scores.clamp_min(0.0) + _EPS
        return shifted / shifted.sum(dim=1, keepdim=True)

    def extra_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return auxiliary outputs for reports (none for plain CNNs).

        Capsule classifiers return ``"lengths"`` ``(B, C)`` and, with a decoder,
        ``"reconstruction"`` ``(B, in_channels, *S)`` from the winning capsule.

        Args:
            x: input batch ``(B, in_channels, *S)``.

        Returns:
            Dictionary of tensors (possibly empty).

        """
        return {}

    # ------------------------------------------------------------------ helpers
    def num_parameters(self, trainable_only: bool = True) -> int:
        """Return the number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def input_size(self) -> tuple[int, ...] | None:
        """Return the fixed spatial input size, or None when the model accepts many sizes."""
        if self.image_size is None:
            return None
        return (self.image_size,) * self.spatial_dims

    def check_input(self, x: torch.Tensor) -> None:
        """Check the shape of an input batch against the model's rules.

        Args:
            x: input batch, expected ``(B, in_channels, *S)`` with ``len(S) == spatial_dims``.

        Raises:
            CapsmedError: (a ValueError) naming the model, the rule and the shape received, when
                the rank or channel count is wrong, the size differs from a fixed ``image_size``,
                a size is below ``min_size``, or a segmenter's size is not divisible by
                ``size_divisible``.

        """
        name = type(self).__name__
        shape = tuple(x.shape)
        if x.dim() != self.spatial_dims + 2:
            raise CapsmedError(
                f"{name} expects input (B, {self.in_channels}, {self._axes()}) with "
                f"{self.spatial_dims} spatial axes; got shape {shape}"
            )
        if shape[1] != self.in_channels:
            raise CapsmedError(
                f"{name} was built for {self.in_channels} input channel(s); got {shape[1]} "
                f"(input shape {shape})"
            )
        spatial = shape[2:]
        if self.image_size is not None and any(s != self.image_size for s in spatial):
            raise CapsmedError(
                f"{name} was built for inputs of size {self.input_size()}; got spatial size "
                f"{spatial} (resize the images or rebuild the model with image_size)"
            )
        if any(s < self.min_size for s in spatial):
            raise CapsmedError(
                f"{name} needs every spatial size >= {self.min_size}; got {spatial}"
            )
        div = int(self.size_divisible)
        if div > 1 and any(s % div for s in spatial):
            raise CapsmedError(
                f"{name} needs every spatial size divisible by {div}; got {spatial} "
                f"(pad or crop the patch, e.g. to {_round_up(spatial, div)})"
            )

    def _axes(self) -> str:
        return ", ".join("HWD"[: self.spatial_dims])


def _round_up(spatial: Sequence[int], div: int) -> tuple[int, ...]:
    return tuple(-(-s // div) * div for s in spatial)
