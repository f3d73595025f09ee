"""SegCaps R3 (LaLonde and Bagci 2018): a capsule U-Net with one output capsule per class."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv
from torch import nn

from capsmed.layers import ConvCapsule, ConvTransposeCapsule
from capsmed.models.base import CapsmedModel, capsule_lengths, plain_tensor
from capsmed.models.registry import register_model

__all__ = ["SegCaps", "select_class_capsules"]

logger = logging.getLogger(__name__)

#: Defaults per spatial_dims: the paper's network in 2D (width 16, 5x5 capsules, 4x4 transposed
#: capsules, reconstruction 64-128). In 3D the same layout with width 8, 3^3 and 2^3 kernels and a
#: 16-32 reconstruction: a training step at 32^3 costs ~4x a default MONAI UNet step in FLOPs
#: (width 16 with the same kernels ~18x, the 2D paper's settings in 3D ~80x), so that 32^3-48^3
#: patches train on a CPU. Pass ``width=16`` for more capacity where compute allows.
_SEGCAPS_DEFAULTS: dict[int, dict] = {
    2: {"width": 16, "kernel_size": 5, "up_kernel_size": 4, "reconstruction_hidden": (64, 128)},
    3: {"width": 8, "kernel_size": 3, "up_kernel_size": 2, "reconstruction_hidden": (16, 32)},
}

#: Default weight of the masked reconstruction loss (on the per-voxel mean squared error).
#: The SegCaps reference code uses 131.072 (= 0.0005 x 512^2: Sabour's weight on the summed error
#: of a 512 x 512 slice), so the weight depends on the slice size. Here the error is a per-voxel
#: mean and the weight 1.0, the same for every patch size; it was not tuned on benchmark data.
#: Pass ``reconstruction_weight=131.072`` for the reference code's value.
SEGCAPS_RECONSTRUCTION_WEIGHT = 1.0


def select_class_capsules(
    poses: torch.Tensor, index: torch.Tensor, foreground_only: bool = True
) -> torch.Tensor:
    """Pick, at every voxel, the pose of one class capsule (SegCaps' ``Mask`` layer, per voxel).

    Args:
        poses: class capsules ``(B, C, D, *S)``.
        index: class per voxel ``(B, *S)`` (true label in training, the longest capsule otherwise).
        foreground_only: zero the pose where ``index`` is 0 (background), as SegCaps masks its
            single foreground capsule by the label.

    Returns:
        Selected poses ``(B, D, *S)``.

    """
    one_hot = F.one_hot(index.long(), poses.shape[1]).movedim(-1, 1).to(poses.dtype)  # (B, C, *S)
    if foreground_only:
        one_hot = one_hot * (index > 0).unsqueeze(1).to(poses.dtype)
    return (poses * one_hot.unsqueeze(2)).sum(dim=1)


def _label_index(target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class per voxel ``(B, *S)`` from a label map ``(B, 1, *S)`` / ``(B, *S)``."""
    target = plain_tensor(target)
    if target.dim() == lengths.dim():
        if target.shape[1] != 1:
            raise ValueError(
                f"segmentation target must be a label map (B, 1, *S) or (B, *S); "
                f"got shape {tuple(target.shape)}"
            )
        target = target[:, 0]
    expected = lengths.shape[:1] + lengths.shape[2:]
    if target.shape != expected:
        raise ValueError(
            f"segmentation target shape {tuple(target.shape)} does not fit the output "
            f"{tuple(lengths.shape)}; expected {tuple(expected)} (with or without a channel axis)"
        )
    index = target.round().long().to(lengths.device)
    if index.numel() and (index.min() < 0 or index.max() >= lengths.shape[1]):
        raise ValueError(f"label values must lie in [0, {lengths.shape[1]})")
    return index


class _PixelDecoder(nn.Module):
    """SegCaps reconstruction decoder: 1x1 convolutions on the selected pose at every voxel."""

    def __init__(
        self,
        spatial_dims: int,
        in_dim: int,
        out_channels: int,
        hidden: Sequence[int],
        activation: str | None,
    ) -> None:
        super().__init__()
        if activation not in ("sigmoid", None):
            raise ValueError(
                f"reconstruction_activation must be 'sigmoid' or None; got {activation!r}"
            )
        conv = Conv[Conv.CONV, spatial_dims]
        widths = [in_dim, *[int(h) for h in hidden]]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [conv(w_in, w_out, kernel_size=1), Act[Act.RELU](inplace=True)]
        layers.append(conv(widths[-1], out_channels, kernel_size=1))
        if activation == "sigmoid":
            layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        return self.net(pose)


@register_model("segcaps")
class SegCaps(CapsmedModel):
    """SegCaps R3 (LaLonde and Bagci 2018) with one output capsule per class, 2D and 3D.

    Layout (``w = width``, capsules x pose size, ``/k`` = resolution):

    - stem: ``Conv(k) + ReLU`` to ``w`` channels, read as 1 capsule of ``w`` (full resolution);
    - encoder: ConvCapsule 2 x w stride 2 (1 routing iteration, the primary capsules), 4 x w,
      4 x 2w stride 2, 8 x 2w, 8 x 4w stride 2, 8 x 2w (``routing_iterations`` each);
    - decoder: ConvTransposeCapsule 8 x 2w (x2), concatenate the 8 x 2w skip -> ConvCapsule 4 x 2w;
      up 4 x w, concatenate 4 x w -> ConvCapsule 4 x w; up 2 x w, concatenate the stem capsule ->
      1x1 ConvCapsule with ``C = out_channels`` capsules of ``w`` (one per class, background
      included; the paper's binary model has a single foreground capsule).

    Votes are shared across input capsule types (``shared_votes=True``) and routed by dot-product
    agreement within each output position (locally constrained routing). ``forward_train`` adds
    the reconstruction of the input masked by the foreground: at each voxel the pose of the true
    class capsule (the longest without a target), zeroed at background voxels, goes through 1x1
    convolutions (``reconstruction_hidden``, then ``in_channels``). With the 2D defaults and 2
    classes the network has 1.4M parameters, as in the paper.

    Scores are capsule lengths ``(B, C, *S)`` in [0, 1), not logits.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``; every size in ``S`` divisible by 8
    (``size_divisible``); the sizes need not be equal (e.g. 16 x 48 x 32).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes including background.
        width: pose size ``w`` of the stem and first capsules (default 16 in 2D as in the paper,
            8 in 3D).
        kernel_size: odd kernel of the stem and capsule layers (default 5 in 2D, 3 in 3D).
        up_kernel_size: kernel of the transposed capsules (default 4 in 2D, 2 in 3D).
        routing_iterations: dynamic routing iterations of all but the primary capsules (3).
        reconstruction_hidden: widths of the 1x1 reconstruction convolutions (default (64, 128)
            in 2D as in the paper, (16, 32) in 3D).
        reconstruction_activation: None (linear, for z-scored images; default) or ``"sigmoid"``
            (images in [0, 1], as in the paper).

    Raises:
        ValueError: when a width or kernel is out of range.

    """

    task = "segmentation"
    output_kind = "lengths"
    family = "capsule"
    size_divisible = 8
    has_decoder = True

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        width: int | None = None,
        kernel_size: int | None = None,
        up_kernel_size: int | None = None,
        routing_iterations: int = 3,
        reconstruction_hidden: Sequence[int] | None = None,
        reconstruction_activation: str | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        defaults = _SEGCAPS_DEFAULTS[spatial_dims]
        width = defaults["width"] if width is None else int(width)
        k = defaults["kernel_size"] if kernel_size is None else int(kernel_size)
        up = defaults["up_kernel_size"] if up_kernel_size is None else int(up_kernel_size)
        if reconstruction_hidden is None:
            reconstruction_hidden = defaults["reconstruction_hidden"]
        if width < 1:
            raise ValueError(f"width must be >= 1; got {width}")
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1; got {k}")
        if up < 2:
            raise ValueError(f"up_kernel_size must be >= 2; got {up}")
        if routing_iterations < 1:
            raise ValueError(f"routing_iterations must be >= 1; got {routing_iterations}")
        self.loss_defaults = {
            "reconstruction_weight": SEGCAPS_RECONSTRUCTION_WEIGHT,
            "reconstruction_region": "all",
        }
        w, r, p = int(width), int(routing_iterations), k // 2
        dims = spatial_dims

        def caps(i_caps: int, i_dim: int, o_caps: int, o_dim: int, stride: int = 1,
                 routing: int = r, kernel: int = k) -> ConvCapsule:
            return ConvCapsule(dims, i_caps, i_dim, o_caps, o_dim, kernel_size=kernel,
                               stride=stride, padding=kernel // 2, routing_iterations=routing,
                               agreement="dot", shared_votes=True)

        def up_caps(i_caps: int, i_dim: int, o_caps: int, o_dim: int) -> ConvTransposeCapsule:
            return ConvTransposeCapsule(dims, i_caps, i_dim, o_caps, o_dim, kernel_size=up,
                                        stride=2, padding=(up - 1) // 2, output_padding=up % 2,
                                        routing_iterations=r, agreement="dot", shared_votes=True)

        self.stem = nn.Sequential(
            Conv[Conv.CONV, dims](in_channels, w, kernel_size=k, padding=p),
            Act[Act.RELU](inplace=True),
        )
        self.primary = caps(1, w, 2, w, stride=2, routing=1)
        self.enc2_1 = caps(2, w, 4, w)
        self.enc2_2 = caps(4, w, 4, 2 * w, stride=2)
        self.enc3_1 = caps(4, 2 * w, 8, 2 * w)
        self.enc3_2 = caps(8, 2 * w, 8, 4 * w, stride=2)
        self.enc4_1 = caps(8, 4 * w, 8, 2 * w)
        self.up1 = up_caps(8, 2 * w, 8, 2 * w)
        self.dec1 = caps(16, 2 * w, 4, 2 * w)
        self.up2 = up_caps(4, 2 * w, 4, w)
        self.dec2 = caps(8, w, 4, w)
        self.up3 = up_caps(4, w, 2, w)
        self.seg = caps(3, w, out_channels, w, kernel=1)
        self.decoder = _PixelDecoder(
            dims, w, in_channels, reconstruction_hidden, reconstruction_activation
        )

    def class_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """Return the class capsules at full resolution.

        Args:
            x: ``(B, in_channels, *S)``, sizes divisible by 8.

        Returns:
            Poses ``(B, out_channels, width, *S)``.

        """
        self.check_input(x)
        stem = self.stem(x).unsqueeze(1)  # (B, 1, w, *S)
        c2_1 = self.enc2_1(self.primary(stem))  # (B, 4, w, *S/2)
        c3_1 = self.enc3_1(self.enc2_2(c2_1))  # (B, 8, 2w, *S/4)
        c4_1 = self.enc4_1(self.enc3_2(c3_1))  # (B, 8, 2w, *S/8)
        d1 = self.dec1(torch.cat([self.up1(c4_1), c3_1], dim=1))  # (B, 4, 2w, *S/4)
        d2 = self.dec2(torch.cat([self.up2(d1), c2_1], dim=1))  # (B, 4, w, *S/2)
        return self.seg(torch.cat([self.up3(d2), stem], dim=1))  # (B, C, w, *S)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class-capsule lengths per voxel.

        Args:
            x: ``(B, in_channels, *S)``, sizes divisible by 8.

        Returns:
            Lengths ``(B, out_channels, *S)`` in [0, 1).

        """
        return capsule_lengths(self.class_capsules(x), dim=2)

    def forward_train(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return lengths, poses and the masked reconstruction.

        Args:
            x: ``(B, in_channels, *S)``, sizes divisible by 8.
            target: label map ``(B, 1, *S)`` or ``(B, *S)``; None selects the longest capsule.

        Returns:
            ``{"scores": lengths (B, C, *S), "poses": (B, C, width, *S),
            "reconstruction": (B, in_channels, *S)}``.

        Raises:
            ValueError: when the target does not fit the output.

        """
        poses = self.class_capsules(x)
        lengths = capsule_lengths(poses, dim=2)
        index = lengths.argmax(dim=1) if target is None else _label_index(target, lengths)
        recon = self.decoder(select_class_capsules(poses, index))
        return {"scores": lengths, "poses": poses, "reconstruction": recon}

    def extra_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"reconstruction": (B, in_channels, *S)}`` from the winning capsules.

        Args:
            x: ``(B, in_channels, *S)``.

        Returns:
            The reconstruction of the predicted foreground.

        """
        return {"reconstruction": self.forward_train(x, None)["reconstruction"]}
