"""CNN baselines: the seed's plain CNN, MONAI ``UNet`` and MONAI ``DenseNet`` (logits)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Act, Conv
from monai.networks.nets import DenseNet, UNet
from torch import nn

from capsmed.models.base import CapsmedModel
from capsmed.models.registry import register_model

__all__ = ["DenseNetClassifier", "SeedCNN", "UNetSegmenter"]

logger = logging.getLogger(__name__)


@register_model("seed_cnn")
class SeedCNN(CapsmedModel):
    """The seed project's plain CNN classifier: two 3x3 convolutions, flatten, one dense layer.

    ``Conv(in, 64, 3) -> ReLU -> Conv(64, 64, 3) -> ReLU -> flatten -> Linear(C)``, convolutions
    without padding, so an ``n``-voxel axis becomes ``n - 4``. Scores are logits (the softmax lives
    in the loss and in :meth:`probabilities`).

    Shapes: ``(B, in_channels, *[image_size] * spatial_dims) -> (B, out_channels)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        image_size: input size in every spatial axis (the dense layer fixes it), >= 5.
        channels: filters of each convolution.

    Raises:
        ValueError: when ``image_size`` < 5 or ``channels`` < 1.

    """

    task = "classification"
    output_kind = "logits"
    fixed_size = True

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        image_size: int = 28,
        channels: int = 64,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if image_size < 5:
            raise ValueError(
                f"image_size must be >= 5 for two unpadded 3x3 convolutions; got {image_size}"
            )
        if channels < 1:
            raise ValueError(f"channels must be >= 1; got {channels}")
        self.image_size = int(image_size)
        conv = Conv[Conv.CONV, spatial_dims]
        relu = Act[Act.RELU]
        self.features = nn.Sequential(
            conv(in_channels, channels, kernel_size=3),
            relu(),
            conv(channels, channels, kernel_size=3),
            relu(),
        )
        flat = channels * (self.image_size - 4) ** spatial_dims
        self.classifier = nn.Linear(flat, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits.

        Args:
            x: ``(B, in_channels, *[image_size] * spatial_dims)``.

        Returns:
            Logits ``(B, out_channels)``.

        """
        self.check_input(x)
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("unet")
class UNetSegmenter(CapsmedModel):
    """MONAI ``UNet`` (residual units, instance norm, PReLU) returning segmentation logits.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)`` logits, every size in ``S``
    divisible by ``prod(strides)`` (``size_divisible``, 16 by default).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes including background.
        channels: feature channels per level.
        strides: downsampling stride between levels (``len(channels) - 1`` values).
        num_res_units: residual units per block.
        kernel_size: convolution kernel size.
        up_kernel_size: transposed-convolution kernel size.
        act: activation (MONAI name or tuple).
        norm: normalisation (MONAI name or tuple).
        dropout: dropout probability.

    Raises:
        ValueError: when ``strides`` does not have ``len(channels) - 1`` entries.

    """

    task = "segmentation"
    output_kind = "logits"
    size_divisible = 16  # default strides; instances set prod(strides)

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 2,
        kernel_size: int = 3,
        up_kernel_size: int = 3,
        act: str | tuple = "PRELU",
        norm: str | tuple = "INSTANCE",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if len(strides) != len(channels) - 1:
            raise ValueError(
                f"strides must have len(channels) - 1 = {len(channels) - 1} entries; "
                f"got {len(strides)}"
            )
        self.size_divisible = math.prod(int(s) for s in strides)
        self.net = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            num_res_units=num_res_units,
            act=act,
            norm=norm,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return segmentation logits.

        Args:
            x: ``(B, in_channels, *S)``, every size divisible by ``size_divisible``.

        Returns:
            Logits ``(B, out_channels, *S)``.

        """
        self.check_input(x)
        return self.net(x)


@register_model("densenet")
class DenseNetClassifier(CapsmedModel):
    """MONAI ``DenseNet`` classifier (DenseNet-121 by default) returning class logits.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels)`` logits, any size ``S`` with every axis
    at least ``min_size = 2 ** (len(block_config) + 1) - 3``: the stem halves the size twice
    (rounding up) and each transition between dense blocks once more (rounding down).
    DenseNet-121 therefore needs 29 voxels per axis; for 28 x 28 MedMNIST images pass three
    blocks, e.g. ``block_config=(6, 12, 24)`` (min 13).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        init_features: channels after the stem.
        growth_rate: channels each dense layer adds.
        block_config: dense layers per block.
        bn_size: bottleneck width multiplier.
        dropout_prob: dropout after each dense layer.

    Raises:
        ValueError: when ``block_config`` is empty.

    """

    task = "classification"
    output_kind = "logits"
    fixed_size = False

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        bn_size: int = 4,
        dropout_prob: float = 0.0,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if len(block_config) < 1:
            raise ValueError("block_config must list at least one dense block")
        self.min_size = 2 ** (len(block_config) + 1) - 3
        self.net = DenseNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            bn_size=bn_size,
            dropout_prob=dropout_prob,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits.

        Args:
            x: ``(B, in_channels, *S)``, every size >= ``min_size``.

        Returns:
            Logits ``(B, out_channels)``.

        """
        self.check_input(x)
        return self.net(x)
