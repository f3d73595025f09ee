"""CapsUNet: a capsule segmenter sized for a CPU budget, capsules at 1/4 and 1/8 only, 2D and 3D."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from monai.networks.layers.factories import Act, Conv, Norm
from torch import nn

from capsmed.layers import ConvCapsule, PrimaryCapsule
from capsmed.models.base import CapsmedModel, capsule_lengths, plain_tensor
from capsmed.models.registry import register_model

__all__ = ["CapsUNet"]

logger = logging.getLogger(__name__)

#: What stands between the primary capsules and the decoder (``capsule_block``).
CAPSULE_BLOCKS = ("capsule", "conv")


class _ConvCapsuleStandIn(nn.Module):
    """Ablation: a plain convolution with the parameters and FLOPs of an unshared ``ConvCapsule``.

    ``(B, I, Din, *S) -> Conv(I * Din -> J * Dout) -> norm -> PReLU -> (B, J, Dout, *S')``. With
    unshared votes a ``ConvCapsule`` is a grouped convolution ``I * Din -> I * J * Dout`` with
    ``groups = I``: the same weights and multiply-adds as this dense convolution. What differs is
    what happens to them: routing sums the ``I`` votes with agreement-weighted couplings and
    squashes, the convolution sums them with fixed weights and a PReLU.
    """

    def __init__(
        self, spatial_dims: int, in_capsules: int, in_dim: int, out_capsules: int, out_dim: int,
        stride: int,
    ) -> None:
        super().__init__()
        self.out_capsules, self.out_dim = out_capsules, out_dim
        self.conv = Conv[Conv.CONV, spatial_dims](
            in_capsules * in_dim, out_capsules * out_dim, 3, stride=stride, padding=1, bias=False
        )
        self.norm = Norm[Norm.INSTANCE, spatial_dims](out_capsules * out_dim, affine=True)
        self.act = Act[Act.PRELU]()

    def forward(self, x: torch.Tensor, return_coupling: bool = False) -> torch.Tensor:
        """``(B, I, Din, *S) -> (B, J, Dout, *S')``; ``return_coupling`` must be False."""
        if return_coupling:
            raise ValueError("a convolution block has no couplings")
        y = self.act(self.norm(self.conv(x.flatten(1, 2))))
        return y.view(y.shape[0], self.out_capsules, self.out_dim, *y.shape[2:])


@register_model("capsunet")
class CapsUNet(CapsmedModel):
    """Capsule U-Net for a compute budget: convolutions at full and 1/2 size, capsules at 1/4 and 1/8.

    Where 3D-UCaps routes capsules at every resolution (5x a MONAI UNet's FLOPs at our widths,
    100x at the paper's), this network routes them only where the grid is small, so that a
    training step costs about what the UNet's does:

    - encoder: MONAI ``ResidualUnit`` blocks (instance norm, PReLU), ``encoder_channels`` (16, 32),
      each with stride 2: features at 1/2 and 1/4;
    - primary capsules at 1/4: a 3x3 ``PrimaryCapsule``, ``primary_capsules`` x ``primary_dim``
      8 x 8, squashed;
    - capsule block at 1/8: a strided ``ConvCapsule`` 3x3 to ``capsules`` x ``capsule_dim``
      8 x 16, then the class capsules ``C`` x ``class_dim`` 16 (``C = out_channels``), each with
      ``routing_iterations`` (3) of dynamic routing by ``agreement`` ("cosine", as 3D-UCaps) and
      one vote kernel per input capsule type (``shared_votes`` False, as the 3D-UCaps hippocampus
      run); vote weights He-normal, as SegCaps;
    - decoder: transposed convolutions (MONAI ``UpSample``, x2) and 3x3 ``Convolution`` blocks.
      Its input at 1/8 is the two capsule layers' poses, and at 1/4 the primary capsules' poses:
      below 1/2 size every path to the output goes through capsules. At 1/2 it takes the encoder's
      first features, at full size the image itself (a 1x1 convolution there: full-size 3x3
      convolutions would cost a third of the budget); a 1x1 convolution gives the logits
      (``decoder_channels`` (32, 16, 8)).

    ``forward_train`` also returns the class-capsule lengths at 1/8 (``"coarse_lengths"``), which
    the loss supervises with the margin loss against the area-downsampled label (3D-UCaps' deep
    supervision), so the class capsules stand for the structures.

    ``capsule_block="conv"`` is the ablation: each capsule layer becomes a convolution with
    instance norm and PReLU of exactly the same parameters and FLOPs (see
    :class:`_ConvCapsuleStandIn`), a plain CNN trained with Dice-CE alone (no capsules, so no
    margin loss). ``routing_iterations=1`` is the other ablation (uniform couplings, same cost).

    Cost at a 32^3 patch, one channel, three classes, defaults: 0.65M parameters and 0.39
    forward GFLOPs (MONAI's UNet with channels 16-256 and 2 residual units: 4.8M and 0.40), and
    about the UNet's time per training step on a CPU.

    Scores are logits ``(B, C, *S)`` (softmax in the loss and :meth:`probabilities`).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``, every size divisible by 8.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes including background.
        encoder_channels: widths of the two strided residual units (1/2 and 1/4).
        primary_capsules: primary capsule types at 1/4.
        primary_dim: primary capsule pose size.
        capsules: capsule types of the strided capsule layer at 1/8.
        capsule_dim: its pose size.
        class_dim: pose size of the class capsules.
        routing_iterations: routing iterations of both capsule layers.
        agreement: ``"cosine"`` (3D-UCaps) or ``"dot"`` (Sabour et al.).
        shared_votes: one vote kernel shared by all input capsule types (fewer parameters, same
            FLOPs) instead of one per type.
        decoder_channels: widths of the decoder at 1/4, 1/2 and full size.
        capsule_block: ``"capsule"`` or the ``"conv"`` ablation.

    Raises:
        ValueError: when a tuple has the wrong length, a width is below 1, or ``agreement`` /
            ``capsule_block`` is unknown.

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
        primary_dim: int = 8,
        capsules: int = 8,
        capsule_dim: int = 16,
        class_dim: int = 16,
        routing_iterations: int = 3,
        agreement: str = "cosine",
        shared_votes: bool = False,
        decoder_channels: Sequence[int] = (32, 16, 8),
        capsule_block: str = "capsule",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if len(encoder_channels) != 2:
            raise ValueError(f"encoder_channels must list 2 widths; got {tuple(encoder_channels)}")
        if len(decoder_channels) != 3:
            raise ValueError(f"decoder_channels must list 3 widths; got {tuple(decoder_channels)}")
        widths = [*encoder_channels, primary_capsules, primary_dim, capsules, capsule_dim,
                  class_dim, routing_iterations, *decoder_channels]
        if any(int(v) < 1 for v in widths):
            raise ValueError("all widths, capsule counts and routing_iterations must be >= 1")
        if capsule_block not in CAPSULE_BLOCKS:
            raise ValueError(
                f"capsule_block must be one of {', '.join(CAPSULE_BLOCKS)}; got {capsule_block!r}"
            )
        self.capsule_block = capsule_block
        self.loss_defaults = {"margin_weight": 0.5}
        if capsule_block == "conv":
            self.has_coarse_capsules = False  # type: ignore[misc]  # no capsules to supervise
            self.family = "cnn"  # type: ignore[misc]  # the routed layers are convolutions
        dims = spatial_dims
        e1, e2 = (int(c) for c in encoder_channels)
        d4, d2, d1 = (int(c) for c in decoder_channels)

        def residual(c_in: int, c_out: int, subunits: int) -> ResidualUnit:
            return ResidualUnit(dims, c_in, c_out, strides=2, kernel_size=3, subunits=subunits,
                                act="PRELU", norm="INSTANCE")

        self.down1 = residual(in_channels, e1, 1)  # 1/2
        self.down2 = residual(e1, e2, 2)  # 1/4
        self.primary = PrimaryCapsule(dims, e2, primary_capsules, primary_dim, kernel_size=3,
                                      stride=1, padding=1)
        layers = [(primary_capsules, primary_dim, capsules, capsule_dim, 2),
                  (capsules, capsule_dim, out_channels, class_dim, 1)]
        if capsule_block == "capsule":
            self.capsules = nn.ModuleList(
                ConvCapsule(dims, i, di, j, dj, kernel_size=3, stride=s, padding=1,
                            routing_iterations=routing_iterations, agreement=agreement,
                            shared_votes=shared_votes)
                for i, di, j, dj, s in layers
            )
        else:
            self.capsules = nn.ModuleList(
                _ConvCapsuleStandIn(dims, i, di, j, dj, stride=s) for i, di, j, dj, s in layers
            )
        flat8 = capsules * capsule_dim + out_channels * class_dim
        self.up4 = UpSample(dims, flat8, d4, scale_factor=2, mode="deconv")
        self.conv4 = Convolution(dims, d4 + primary_capsules * primary_dim, d4, kernel_size=3,
                                 bias=False)
        self.up2 = UpSample(dims, d4, d2, scale_factor=2, mode="deconv")
        self.conv2 = Convolution(dims, d2 + e1, d2, kernel_size=3, bias=False)
        self.up1 = UpSample(dims, d2, d1, scale_factor=2, mode="deconv")
        self.conv1 = Convolution(dims, d1 + in_channels, d1, kernel_size=1, bias=False)
        self.head = Conv[Conv.CONV, dims](d1, out_channels, kernel_size=1)

    def encode(
        self, x: torch.Tensor, return_coupling: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the encoder and the capsule layers.

        Args:
            x: ``(B, in_channels, *S)``, sizes divisible by 8 (checked).
            return_coupling: also return each capsule layer's couplings.

        Returns:
            ``(features, couplings)``: ``features`` = [1/2 features ``(B, e1, *S/2)``, primary
            capsules ``(B, P, Dp, *S/4)``, capsules ``(B, N, D, *S/8)``, class capsules
            ``(B, C, Dc, *S/8)``]; ``couplings`` = per capsule layer ``(B, I, J, *S')`` when
            asked for (empty otherwise).

        """
        self.check_input(x)
        x = plain_tensor(x)
        f2 = self.down1(x)
        primary = self.primary(self.down2(f2))
        h, couplings = primary, []
        outs = []
        for layer in self.capsules:
            if return_coupling:
                h, c = layer(h, return_coupling=True)
                couplings.append(c)
            else:
                h = layer(h)
            outs.append(h)
        return [f2, primary, *outs], couplings

    def _decode(self, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        f2, primary, caps, cls = feats
        y = self.up4(torch.cat([caps.flatten(1, 2), cls.flatten(1, 2)], dim=1))
        y = self.conv4(torch.cat([y, primary.flatten(1, 2)], dim=1))
        y = self.conv2(torch.cat([self.up2(y), f2], dim=1))
        y = self.conv1(torch.cat([self.up1(y), plain_tensor(x)], dim=1))
        return self.head(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return segmentation logits.

        Args:
            x: ``(B, in_channels, *S)``, sizes divisible by 8.

        Returns:
            Logits ``(B, out_channels, *S)``.

        """
        feats, _ = self.encode(x)
        return self._decode(x, feats)

    def forward_train(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return logits and the class-capsule lengths at 1/8.

        Args:
            x: ``(B, in_channels, *S)``, sizes divisible by 8.
            target: unused.

        Returns:
            ``{"scores": logits (B, C, *S), "coarse_lengths": (B, C, *S/8)}`` (no lengths for
            the ``"conv"`` ablation).

        """
        feats, _ = self.encode(x)
        out = {"scores": self._decode(x, feats)}
        if self.capsule_block == "capsule":
            out["coarse_lengths"] = capsule_lengths(feats[3])
        return out

    def extra_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"coarse_lengths": (B, C, *S/8)}``: the class capsules' evidence per structure.

        Args:
            x: ``(B, in_channels, *S)``.

        Returns:
            The class-capsule lengths at 1/8 resolution (empty for the ``"conv"`` ablation).

        """
        if self.capsule_block != "capsule":
            return {}
        feats, _ = self.encode(x)
        return {"coarse_lengths": capsule_lengths(feats[3])}
