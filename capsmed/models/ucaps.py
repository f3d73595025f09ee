"""3D-UCaps (Nguyen et al., MICCAI 2021): capsule encoder, convolutional decoder, 2D and 3D."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers.factories import Act, Conv
from torch import nn

from capsmed.layers import ConvCapsule
from capsmed.models.base import CapsmedModel, capsule_lengths
from capsmed.models.registry import register_model

__all__ = ["UCaps"]

logger = logging.getLogger(__name__)


@register_model("ucaps")
class UCaps(CapsmedModel):
    """3D-UCaps: convolutional stem, capsule encoder with cosine routing, convolutional decoder.

    Follows the 3D-UCaps reference model (``UCaps3D``) with narrower default widths so that
    32^3-48^3 patches train on a CPU: in FLOPs a 32^3 training step costs ~5x a default MONAI
    UNet step with these defaults (0.45M parameters) and ~105x with the paper's widths in
    brackets (3.2M parameters). Pass the bracketed values for the paper's network.

    - stem: MONAI ``Convolution`` blocks (instance norm, PReLU; the last with tanh), dilation 1
      then 2, ``stem_channels`` (8, 8) [16, 32, 64], ``stem_kernel_size`` 3 [5];
    - primary capsules: the stem output read as one capsule, ``ConvCapsule`` 3x3 to
      ``primary_capsules`` x ``primary_dim`` 8 x 4 [16 x 4], one routing iteration;
    - encoder: ``ConvCapsule`` 3x3 layers with strides 2, 1, 2, 1, 2, 1, capsules
      ``encoder_capsules`` (8, 8, 8, 8, 8) [16, 16, 8, 8, 8] then ``C = out_channels`` class
      capsules, pose sizes ``encoder_dims`` (4, 4, 8, 8, 16, 32) [8, 8, 16, 16, 32, 64]; votes
      from one convolution shared by all input capsule types, routed by cosine agreement
      (``routing_iterations`` 3);
    - decoder: MONAI ``UpSample`` (transposed convolution, x2) and ``Convolution`` 3x3 blocks:
      up to ``decoder_channels[0]`` 64 [256], concatenate the 1/4 capsules, convolve to
      ``decoder_channels[1]`` 64 [128]; up to ``decoder_channels[2]`` 32 [128], concatenate the
      1/2 capsules, convolve to ``decoder_channels[3]`` 32 [64]; up to ``decoder_channels[4]``
      16 [64], concatenate the primary capsules; a 1x1 convolution gives the logits;
    - ``forward_train`` also returns the lengths of the class capsules at 1/8 resolution (for the
      3D-UCaps margin loss) and a reconstruction of the input from the last decoder features
      (1x1 convolutions ``reconstruction_hidden`` (16, 32) [64, 128], then in_channels), trained
      inside the labelled foreground.

    Scores are logits ``(B, C, *S)`` (softmax in the loss and :meth:`probabilities`).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``, every size divisible by 8.

    Args:
        spatial_dims: 2 or 3 (3D-UCaps is 3D; 2D uses the same layout with 2D layers).
        in_channels: input channels.
        out_channels: number of classes including background.
        stem_channels: channels of the stem convolutions (at least one).
        stem_kernel_size: odd kernel of the stem convolutions.
        primary_capsules: primary capsule types.
        primary_dim: primary capsule pose size.
        encoder_capsules: capsule types of the first five encoder layers (the sixth has one
            capsule per class).
        encoder_dims: pose sizes of the six encoder layers.
        decoder_channels: five widths, see above.
        routing_iterations: routing iterations of the encoder capsule layers.
        reconstruction_hidden: widths of the 1x1 reconstruction convolutions.
        shared_votes: one vote convolution shared by all input capsule types (3D-UCaps'
            ``ConvSlimCapsule3D`` default, fewer parameters); False gives every input type its
            own kernels, as the 3D-UCaps hippocampus configuration does.

    Raises:
        ValueError: when a tuple has the wrong length or a width or kernel is out of range.

    """

    task = "segmentation"
    output_kind = "logits"
    family = "capsule"
    size_divisible = 8
    has_decoder = True
    has_coarse_capsules = True

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stem_channels: Sequence[int] = (8, 8),
        stem_kernel_size: int = 3,
        primary_capsules: int = 8,
        primary_dim: int = 4,
        encoder_capsules: Sequence[int] = (8, 8, 8, 8, 8),
        encoder_dims: Sequence[int] = (4, 4, 8, 8, 16, 32),
        decoder_channels: Sequence[int] = (64, 64, 32, 32, 16),
        routing_iterations: int = 3,
        reconstruction_hidden: Sequence[int] = (16, 32),
        shared_votes: bool = True,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if len(stem_channels) < 1:
            raise ValueError("stem_channels must list at least one width")
        if stem_kernel_size < 1 or stem_kernel_size % 2 == 0:
            raise ValueError(f"stem_kernel_size must be odd and >= 1; got {stem_kernel_size}")
        if len(encoder_capsules) != 5:
            raise ValueError(f"encoder_capsules must list 5 values; got {tuple(encoder_capsules)}")
        if len(encoder_dims) != 6:
            raise ValueError(f"encoder_dims must list 6 values; got {tuple(encoder_dims)}")
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels must list 5 values; got {tuple(decoder_channels)}")
        widths = [*stem_channels, primary_capsules, primary_dim, *encoder_capsules, *encoder_dims,
                  *decoder_channels, routing_iterations]
        if any(int(v) < 1 for v in widths):
            raise ValueError("all widths, capsule counts and routing_iterations must be >= 1")
        self.loss_defaults = {
            "margin_weight": 0.1,
            "reconstruction_weight": 0.1,
            "reconstruction_region": "foreground",
        }
        dims, k = spatial_dims, int(stem_kernel_size)

        stem: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(stem_channels):
            dilation = 1 if i == 0 else 2
            last = i == len(stem_channels) - 1
            stem.append(
                Convolution(
                    dims, c_in, int(c_out), kernel_size=k, dilation=dilation,
                    padding=dilation * (k // 2), bias=False, act="TANH" if last else "PRELU",
                )
            )
            c_in = int(c_out)
        self.stem = nn.Sequential(*stem)
        self.primary = ConvCapsule(
            dims, 1, c_in, primary_capsules, primary_dim, kernel_size=3, stride=1, padding=1,
            routing_iterations=1, agreement="cosine", shared_votes=shared_votes,
        )
        caps = [primary_capsules, *[int(c) for c in encoder_capsules], out_channels]
        pose = [primary_dim, *[int(d) for d in encoder_dims]]
        self.encoder = nn.ModuleList(
            ConvCapsule(
                dims, caps[i], pose[i], caps[i + 1], pose[i + 1], kernel_size=3,
                stride=2 if i % 2 == 0 else 1, padding=1, routing_iterations=routing_iterations,
                agreement="cosine", shared_votes=shared_votes,
            )
            for i in range(6)
        )
        flat = [c * d for c, d in zip(caps, pose, strict=True)]  # channels of each capsule map
        dec = [int(c) for c in decoder_channels]
        self.up1 = UpSample(dims, flat[6], dec[0], scale_factor=2, mode="deconv")
        self.conv1 = Convolution(dims, dec[0] + flat[4], dec[1], kernel_size=3, bias=False)
        self.up2 = UpSample(dims, dec[1], dec[2], scale_factor=2, mode="deconv")
        self.conv2 = Convolution(dims, dec[2] + flat[2], dec[3], kernel_size=3, bias=False)
        self.up3 = UpSample(dims, dec[3], dec[4], scale_factor=2, mode="deconv")
        features = dec[4] + flat[0]
        conv = Conv[Conv.CONV, dims]
        self.head = conv(features, out_channels, kernel_size=1)
        recon: list[nn.Module] = []
        widths_r = [features, *[int(h) for h in reconstruction_hidden]]
        for w_in, w_out in zip(widths_r[:-1], widths_r[1:], strict=True):
            recon += [conv(w_in, w_out, kernel_size=1), Act[Act.RELU](inplace=True)]
        recon.append(conv(widths_r[-1], in_channels, kernel_size=1))
        self.reconstruct = nn.Sequential(*recon)

    @staticmethod
    def _flat(capsules: torch.Tensor) -> torch.Tensor:
        """``(B, N, D, *S) -> (B, N * D, *S)``."""
        return capsules.flatten(1, 2)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the last decoder features ``(B, F, *S)`` and the class capsules at 1/8."""
        self.check_input(x)
        primary = self.primary(self.stem(x).unsqueeze(1))  # (B, P, Dp, *S)
        skips = []
        h = primary
        for layer in self.encoder:
            h = layer(h)
            skips.append(h)
        # skips[1]: 1/2, skips[3]: 1/4, skips[5]: class capsules at 1/8
        y = self.conv1(torch.cat([self.up1(self._flat(skips[5])), self._flat(skips[3])], dim=1))
        y = self.conv2(torch.cat([self.up2(y), self._flat(skips[1])], dim=1))
        y = torch.cat([self.up3(y), self._flat(primary)], dim=1)
        return y, skips[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return segmentation logits.

        Args:
            x: ``(B, in_channels, *S)``, sizes divisible by 8.

        Returns:
            Logits ``(B, out_channels, *S)``.

        """
        features, _ = self._features(x)
        return self.head(features)

    def forward_train(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return logits, coarse class-capsule lengths and the reconstruction.

        Args:
            x: ``(B, in_channels, *S)``, sizes divisible by 8.
            target: unused (the reconstruction comes from the decoder features; the loss masks
                it by the label).

        Returns:
            ``{"scores": logits (B, C, *S), "coarse_lengths": (B, C, *S/8),
            "reconstruction": (B, in_channels, *S)}``.

        """
        features, coarse = self._features(x)
        return {
            "scores": self.head(features),
            "coarse_lengths": capsule_lengths(coarse, dim=2),
            "reconstruction": self.reconstruct(features),
        }

    def extra_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"reconstruction": (B, in_channels, *S)}``.

        Args:
            x: ``(B, in_channels, *S)``.

        Returns:
            The reconstruction of the input from the decoder features.

        """
        return {"reconstruction": self.forward_train(x)["reconstruction"]}
