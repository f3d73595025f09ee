"""Matrix capsules with EM routing (Hinton, Sabour and Frosst 2018): classifier and segmenter."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from monai.networks.layers.factories import Conv
from torch import nn

from capsmed.layers import ClassMatrixCapsule, ConvMatrixCapsule, PrimaryMatrixCapsule
from capsmed.layers.em import FINAL_LAMBDA
from capsmed.models.base import CapsmedModel, plain_tensor
from capsmed.models.registry import register_model

__all__ = ["EMCapsNet", "EMCapsUNet"]

logger = logging.getLogger(__name__)

#: EMCapsNet widths (A, B, C, D of the paper) per spatial_dims: the paper's small smallNORB network
#: in 2D (A=64, B=8, C=D=16); narrower in 3D, where a 3x3x3 window holds 27 positions.
_EMCAPS_DEFAULTS: dict[int, dict[str, int]] = {
    2: {"conv_channels": 64, "primary_capsules": 8, "capsules": (16, 16)},
    3: {"conv_channels": 16, "primary_capsules": 4, "capsules": (8, 8)},
}


def _flat(poses: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """``(B, J, 16, *S), (B, J, *S) -> (B, J * 17, *S)``: poses and activations as channels."""
    return torch.cat([poses.flatten(1, 2), acts], dim=1)


@register_model("emcapsnet")
class EMCapsNet(CapsmedModel):
    """Matrix capsules with EM routing (Hinton et al. 2018) for whole-image classification, 2D and 3D.

    ``Conv 5x5 stride 2 (A channels, batch norm, ReLU) -> PrimaryMatrixCapsule 1x1 (B types) ->
    ConvMatrixCapsule 3x3 stride 2 (C types) -> ConvMatrixCapsule 3x3 stride 1 (D types) ->
    ClassMatrixCapsule with coordinate addition (one capsule per class)``, 3 EM iterations per
    routed layer. The 2D defaults are the paper's small smallNORB network (A=64, B=8, C=D=16); 3D
    defaults are narrower (A=16, B=4, C=D=8). The inverse temperature schedule
    (``final_lambda * (1 - 0.95^(t+1))``, 0.01), the cost scale and the betas follow Gritzman
    (2019) / IBM's reference implementation (see :mod:`capsmed.layers.em`). Trained with the spread
    loss, margin 0.2 -> 0.9 (``class_loss = "spread"``, :class:`capsmed.losses.SpreadLoss`).

    Scores are the class capsules' activations ``(B, C)`` in [0, 1] (a sigmoid, which reaches 1.0
    in float32 where the votes agree very closely), not logits and not lengths (``output_kind`` is
    ``"lengths"``, the kind for scores in [0, 1] that :meth:`probabilities` normalises by their
    sum). Any input size of at least ``min_size`` (13)
    in every axis works: the class capsules share their transformations across positions.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        conv_channels: A, width of the first convolution (64 in 2D, 16 in 3D by default).
        primary_capsules: B, primary capsule types (8 / 4).
        capsules: (C, D), types of the two convolutional capsule layers ((16, 16) / (8, 8)).
        routing_iterations: EM iterations of every routed layer (3).
        final_lambda: inverse temperature scale (0.01).
        coordinate_addition: coordinate addition in the class capsules (True).

    Raises:
        ValueError: when a width is below 1 or ``capsules`` does not list two widths.

    """

    task = "classification"
    output_kind = "lengths"
    family = "capsule"
    class_loss: ClassVar[str] = "spread"
    min_size = 13

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        conv_channels: int | None = None,
        primary_capsules: int | None = None,
        capsules: Sequence[int] | None = None,
        routing_iterations: int = 3,
        final_lambda: float = FINAL_LAMBDA,
        coordinate_addition: bool = True,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        defaults = _EMCAPS_DEFAULTS[spatial_dims]
        a = defaults["conv_channels"] if conv_channels is None else conv_channels
        b = defaults["primary_capsules"] if primary_capsules is None else primary_capsules
        caps = tuple(defaults["capsules"] if capsules is None else capsules)
        if len(caps) != 2:
            raise ValueError(f"capsules must list 2 widths (C, D); got {caps}")
        for key, value in (("conv_channels", a), ("primary_capsules", b), ("capsules", min(caps))):
            if value < 1:
                raise ValueError(f"{key} must be >= 1; got {value}")
        c, d = (int(v) for v in caps)
        self.conv = Convolution(spatial_dims, in_channels, int(a), strides=2, kernel_size=5,
                                padding=2, act="RELU", norm="BATCH")
        self.primary = PrimaryMatrixCapsule(spatial_dims, int(a), int(b), kernel_size=1)
        em = {"routing_iterations": routing_iterations, "final_lambda": final_lambda}
        self.caps1 = ConvMatrixCapsule(spatial_dims, int(b), c, kernel_size=3, stride=2, **em)
        self.caps2 = ConvMatrixCapsule(spatial_dims, c, d, kernel_size=3, stride=1, **em)
        self.classes = ClassMatrixCapsule(spatial_dims, d, out_channels,
                                          coordinate_addition=coordinate_addition, **em)

    def class_capsules(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the class capsules.

        Args:
            x: ``(B, in_channels, *S)``, every size >= 13 (checked).

        Returns:
            ``(poses (B, C, 16), activations (B, C))``.

        """
        self.check_input(x)
        poses, acts = self.primary(self.conv(plain_tensor(x)))
        poses, acts = self.caps1(poses, acts)
        poses, acts = self.caps2(poses, acts)
        return self.classes(poses, acts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the class activations ``(B, out_channels)`` in [0, 1]."""
        return self.class_capsules(x)[1]

    def forward_train(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return ``{"scores": activations (B, C), "poses": (B, C, 16)}`` (``target`` unused)."""
        poses, acts = self.class_capsules(x)
        return {"scores": acts, "poses": poses}

    def extra_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"lengths": (B, C)}``: the class activations, under the key reports read."""
        return {"lengths": self(x)}


@register_model("emcapsunet")
class EMCapsUNet(CapsmedModel):
    """Segmenter with matrix capsules and EM routing at 1/4 and 1/8 size, 2D and 3D.

    The layout of ``capsunet`` with EM routing in place of dynamic routing:

    - encoder: MONAI ``ResidualUnit`` blocks (instance norm, PReLU) ``encoder_channels`` (16, 32),
      stride 2 each: features at 1/2 and 1/4;
    - primary matrix capsules at 1/4 (1x1, ``primary_capsules`` 8 types);
    - a ``ConvMatrixCapsule`` 3x3 stride 2 (padding 1) to ``capsules`` (8) types at 1/8, then one
      3x3 ``ConvMatrixCapsule`` (padding 1) to one capsule type per class at 1/8; EM routing with
      ``routing_iterations`` (3) and Gritzman's schedule (see :mod:`capsmed.layers.em`);
    - decoder: transposed convolutions (x2) and convolutions; its input at 1/8 is both capsule
      layers' poses and activations (17 channels per capsule type), at 1/4 the primary
      capsules', at 1/2 the encoder's features and at full size the image (1x1 there), then a
      1x1 convolution to the logits (``decoder_channels`` (32, 16, 8)).

    ``forward_train`` also returns the class capsules' activations at 1/8 (``"coarse_lengths"``),
    which the loss supervises with the margin loss against the area-downsampled label, as for
    ``capsunet`` (activations lie in [0, 1] like lengths).

    Scores are logits ``(B, C, *S)``. Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``,
    every size divisible by 8.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes including background.
        encoder_channels: widths at 1/2 and 1/4.
        primary_capsules: primary capsule types at 1/4.
        capsules: capsule types of the strided capsule layer at 1/8.
        routing_iterations: EM iterations of both routed layers.
        final_lambda: inverse temperature scale (0.01).
        decoder_channels: decoder widths at 1/4, 1/2 and full size.

    Raises:
        ValueError: when a tuple has the wrong length or a width is below 1.

    """

    task = "segmentation"
    output_kind = "logits"
    family = "capsule"
    size_divisible = 8
    has_coarse_capsules = True

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        encoder_channels: Sequence[int] = (16, 32),
        primary_capsules: int = 8,
        capsules: int = 8,
        routing_iterations: int = 3,
        final_lambda: float = FINAL_LAMBDA,
        decoder_channels: Sequence[int] = (32, 16, 8),
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if len(encoder_channels) != 2:
            raise ValueError(f"encoder_channels must list 2 widths; got {tuple(encoder_channels)}")
        if len(decoder_channels) != 3:
            raise ValueError(f"decoder_channels must list 3 widths; got {tuple(decoder_channels)}")
        if any(int(v) < 1 for v in (*encoder_channels, primary_capsules, capsules,
                                    *decoder_channels)):
            raise ValueError("all widths and capsule counts must be >= 1")
        self.loss_defaults = {"margin_weight": 0.5}
        dims = spatial_dims
        e1, e2 = (int(c) for c in encoder_channels)
        d4, d2, d1 = (int(c) for c in decoder_channels)
        self.down1 = ResidualUnit(dims, in_channels, e1, strides=2, kernel_size=3, subunits=1,
                                  act="PRELU", norm="INSTANCE")
        self.down2 = ResidualUnit(dims, e1, e2, strides=2, kernel_size=3, subunits=2,
                                  act="PRELU", norm="INSTANCE")
        self.primary = PrimaryMatrixCapsule(dims, e2, primary_capsules, kernel_size=1)
        em = {"routing_iterations": routing_iterations, "final_lambda": final_lambda}
        self.caps1 = ConvMatrixCapsule(dims, primary_capsules, capsules, kernel_size=3, stride=2,
                                       padding=1, **em)
        self.caps2 = ConvMatrixCapsule(dims, capsules, out_channels, kernel_size=3, stride=1,
                                       padding=1, **em)
        self.up4 = UpSample(dims, (capsules + out_channels) * 17, d4, scale_factor=2, mode="deconv")
        self.conv4 = Convolution(dims, d4 + primary_capsules * 17, d4, kernel_size=3, bias=False)
        self.up2 = UpSample(dims, d4, d2, scale_factor=2, mode="deconv")
        self.conv2 = Convolution(dims, d2 + e1, d2, kernel_size=3, bias=False)
        self.up1 = UpSample(dims, d2, d1, scale_factor=2, mode="deconv")
        self.conv1 = Convolution(dims, d1 + in_channels, d1, kernel_size=1, bias=False)
        self.head: nn.Module = Conv[Conv.CONV, dims](d1, out_channels, kernel_size=1)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits (B, C, *S), class activations (B, C, *S/8))``."""
        self.check_input(x)
        x = plain_tensor(x)
        f2 = self.down1(x)
        primary = self.primary(self.down2(f2))
        caps = self.caps1(*primary)
        cls = self.caps2(*caps)
        y = self.up4(torch.cat([_flat(*caps), _flat(*cls)], dim=1))
        y = self.conv4(torch.cat([y, _flat(*primary)], dim=1))
        y = self.conv2(torch.cat([self.up2(y), f2], dim=1))
        y = self.conv1(torch.cat([self.up1(y), x], dim=1))
        return self.head(y), cls[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return segmentation logits ``(B, out_channels, *S)`` (sizes divisible by 8)."""
        return self._run(x)[0]

    def forward_train(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return ``{"scores": logits (B, C, *S), "coarse_lengths": activations (B, C, *S/8)}``."""
        logits, acts = self._run(x)
        return {"scores": logits, "coarse_lengths": acts}

    def extra_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"coarse_lengths": (B, C, *S/8)}``: the class capsules' activations."""
        return {"coarse_lengths": self._run(x)[1]}
