"""CapsNet (Sabour, Frosst and Hinton 2017) and Efficient-CapsNet (Mazzia et al. 2021), 2D and 3D."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.factories import Act, Conv
from monai.networks.nets import DenseNet
from torch import nn

from capsmed.layers import DenseCapsule, GridCapsule, PrimaryCapsule, squash, squash_efficient
from capsmed.layers.routing import AGREEMENTS
from capsmed.models.base import CapsmedModel, capsule_lengths, plain_tensor
from capsmed.models.registry import register_model

__all__ = ["CapsNet", "CapsuleDecoder", "DenseCapsNet", "EfficientCapsNet", "ResCapsNet"]

logger = logging.getLogger(__name__)

#: CapsNet defaults per spatial_dims: the paper's widths in 2D, narrower in 3D so that 28^3 inputs
#: train on a laptop CPU (9^3 kernels with 256 channels would cost 48M parameters in one layer).
_CAPSNET_DEFAULTS: dict[int, dict[str, int]] = {
    2: {"conv_channels": 256, "primary_capsules": 32},
    3: {"conv_channels": 32, "primary_capsules": 8},
}

#: Sabour et al.'s reconstruction weight on the summed squared error of a 28 x 28 image.
_PAPER_RECON_WEIGHT = 0.0005
_PAPER_PIXELS = 28 * 28


def _paper_reconstruction_weight(image_size: int, spatial_dims: int) -> float:
    """Return 0.0005 scaled to keep the paper's share of the loss at other input sizes.

    The summed squared error grows with the number of voxels, so 0.0005 (chosen for 784 pixels)
    is rescaled by ``784 / image_size ** spatial_dims``: exactly 0.0005 for 28 x 28, 1.8e-5 for
    28^3.
    """
    return _PAPER_RECON_WEIGHT * _PAPER_PIXELS / float(image_size**spatial_dims)


class CapsuleDecoder(nn.Module):
    """CapsNet reconstruction MLP: masked class capsules -> the input image.

    ``Linear(C * D, h1) -> ReLU -> Linear(h1, h2) -> ReLU -> Linear(h2, prod(image)) -> act``.

    Args:
        num_classes: class capsules ``C``.
        capsule_dim: pose size ``D``.
        output_shape: ``(in_channels, *S)`` of the reconstruction.
        hidden: hidden widths (512, 1024 in the paper).
        activation: ``"sigmoid"`` (paper; images scaled to [0, 1]) or ``None`` (linear output, for
            z-scored images).

    Raises:
        ValueError: for an unknown activation or an empty hidden list.

    """

    def __init__(
        self,
        num_classes: int,
        capsule_dim: int,
        output_shape: Sequence[int],
        hidden: Sequence[int] = (512, 1024),
        activation: str | None = "sigmoid",
    ) -> None:
        super().__init__()
        if activation not in ("sigmoid", None):
            raise ValueError(f"reconstruction activation must be 'sigmoid' or None; got {activation!r}")
        if len(hidden) < 1:
            raise ValueError("decoder hidden widths must list at least one layer")
        self.output_shape = tuple(int(s) for s in output_shape)
        widths = [num_classes * capsule_dim, *[int(h) for h in hidden]]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(w_in, w_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-1], math.prod(self.output_shape)))
        if activation == "sigmoid":
            layers.append(nn.Sigmoid())
        self.mlp = nn.Sequential(*layers)

    def forward(self, poses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Reconstruct from the capsule of class ``index`` (the others are masked to zero).

        Args:
            poses: class capsules ``(B, C, D)``.
            index: class per sample ``(B,)``.

        Returns:
            Reconstruction ``(B, *output_shape)``.

        """
        mask = F.one_hot(index.long(), poses.shape[1]).to(poses.dtype)  # (B, C)
        masked = (poses * mask.unsqueeze(-1)).flatten(1)  # (B, C * D)
        return self.mlp(masked).view(poses.shape[0], *self.output_shape)


def _target_index(target: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor:
    """Class per sample ``(B,)`` from a target (indices / one-hot) or, without one, the longest."""
    if target is None:
        return lengths.argmax(dim=1)
    target = plain_tensor(target)
    batch, classes = lengths.shape
    if target.dim() == 2 and target.shape == (batch, classes) and classes > 1:
        target = target.argmax(dim=1)
    elif target.dim() == 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != (batch,):
        raise ValueError(
            f"target must be class indices ({batch},) or one-hot ({batch}, {classes}); "
            f"got shape {tuple(target.shape)}"
        )
    index = target.long().to(lengths.device)
    if index.numel() and (index.min() < 0 or index.max() >= classes):
        raise ValueError(f"target class indices must lie in [0, {classes})")
    return index


class _CapsuleClassifier(CapsmedModel):
    """Shared behaviour of capsule classifiers: lengths as scores, a masked decoder."""

    task = "classification"
    output_kind = "lengths"
    family = "capsule"
    fixed_size = True
    has_decoder = True
    decoder: CapsuleDecoder | None

    def _set_image_size(self, image_size: int) -> None:
        """Store ``image_size`` and the paper's reconstruction weight rescaled to it."""
        self.image_size = int(image_size)
        self.loss_defaults = {
            "reconstruction_weight": _paper_reconstruction_weight(self.image_size, self.spatial_dims)
        }

    def _make_decoder(
        self,
        class_dim: int,
        decoder_hidden: Sequence[int],
        reconstruction_activation: str | None,
    ) -> CapsuleDecoder:
        """Return the decoder from ``(B, out_channels, class_dim)`` to ``(B, in_channels, *S)``."""
        return CapsuleDecoder(
            self.out_channels, class_dim, (self.in_channels,) + (self.image_size,) * self.spatial_dims,
            decoder_hidden, reconstruction_activation,
        )

    def class_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """Return the class capsules.

        Args:
            x: ``(B, in_channels, *[image_size] * spatial_dims)``.

        Returns:
            Class capsule poses ``(B, out_channels, class_dim)``.

        """
        self.check_input(x)
        return self._class_capsules(plain_tensor(x))  # class scores carry no image metadata

    def _class_capsules(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Return the class capsules ``(B, C, D)`` of a checked plain tensor ``x``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class-capsule lengths.

        Args:
            x: ``(B, in_channels, *[image_size] * spatial_dims)``.

        Returns:
            Lengths ``(B, out_channels)`` in [0, 1).

        """
        return capsule_lengths(self.class_capsules(x))

    def forward_train(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return scores, poses and the reconstruction from the true (or longest) capsule.

        Args:
            x: ``(B, in_channels, *[image_size] * spatial_dims)``.
            target: class indices ``(B,)`` (or one-hot ``(B, C)``); None feeds the decoder the
                longest capsule.

        Returns:
            ``{"scores": lengths (B, C), "lengths": (B, C), "poses": (B, C, D),
            "reconstruction": (B, in_channels, *S)}`` (no reconstruction without a decoder).

        Raises:
            ValueError: when the target shape or values do not fit.

        """
        poses = self.class_capsules(x)
        lengths = capsule_lengths(poses)
        out = {"scores": lengths, "lengths": lengths, "poses": poses}
        if self.decoder is not None:
            out["reconstruction"] = self.decoder(poses, _target_index(target, lengths))
        return out

    def extra_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"lengths": (B, C), "reconstruction": (B, in_channels, *S)}`` (winning capsule).

        Args:
            x: ``(B, in_channels, *[image_size] * spatial_dims)``.

        Returns:
            The lengths and the reconstruction from the longest capsule.

        """
        out = self.forward_train(x, None)
        return {k: out[k] for k in ("lengths", "reconstruction") if k in out}


@register_model("capsnet")
class CapsNet(_CapsuleClassifier):
    """CapsNet with dynamic routing (Sabour et al. 2017) for small fixed-size images, 2D and 3D.

    ``Conv(k, stride 1) + ReLU -> PrimaryCapsule(k, stride 2, squash) -> flatten capsules ->
    DenseCapsule(class capsules, dynamic routing) -> lengths``; a decoder MLP reconstructs the input
    from the class capsules with all but one masked (the true class in training, the longest
    otherwise). With the 2D defaults on 28 x 28 inputs this is the paper's network: 256 9x9 filters,
    32 x 6 x 6 primary capsules of 8D, 16D class capsules, 3 routing iterations, decoder
    (512, 1024, 784) with a sigmoid. In 3D the defaults are narrower (32 filters, 8 primary capsule
    types) to stay trainable on a CPU.

    Scores are capsule lengths ``(B, C)`` in [0, 1), not logits.

    Shapes: ``(B, in_channels, *[image_size] * spatial_dims) -> (B, out_channels)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        image_size: input size in every axis; at least ``2 * kernel_size - 1``.
        conv_channels: filters of the first convolution (default 256 in 2D, 32 in 3D).
        kernel_size: kernel of the convolution and of the primary capsules (9).
        primary_capsules: primary capsule types (default 32 in 2D, 8 in 3D).
        primary_dim: primary capsule size (8).
        class_dim: class capsule size (16).
        routing_iterations: dynamic routing iterations (3).
        decoder_hidden: hidden widths of the decoder MLP ((512, 1024)).
        reconstruction_activation: ``"sigmoid"`` (inputs in [0, 1]) or None (linear).

    Raises:
        ValueError: when a size or width is out of range.

    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        image_size: int = 28,
        conv_channels: int | None = None,
        kernel_size: int = 9,
        primary_capsules: int | None = None,
        primary_dim: int = 8,
        class_dim: int = 16,
        routing_iterations: int = 3,
        decoder_hidden: Sequence[int] = (512, 1024),
        reconstruction_activation: str | None = "sigmoid",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        defaults = _CAPSNET_DEFAULTS[spatial_dims]
        conv_channels = defaults["conv_channels"] if conv_channels is None else conv_channels
        primary_capsules = (
            defaults["primary_capsules"] if primary_capsules is None else primary_capsules
        )
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1; got {kernel_size}")
        if image_size < 2 * kernel_size - 1:
            raise ValueError(
                f"image_size must be >= 2 * kernel_size - 1 = {2 * kernel_size - 1} for the "
                f"convolution and the primary capsules; got {image_size}"
            )
        for key, value in (
            ("conv_channels", conv_channels),
            ("primary_capsules", primary_capsules),
            ("primary_dim", primary_dim),
            ("class_dim", class_dim),
            ("routing_iterations", routing_iterations),
        ):
            if value < 1:
                raise ValueError(f"{key} must be >= 1; got {value}")
        self._set_image_size(image_size)
        conv_size = self.image_size - kernel_size + 1
        primary_size = (conv_size - kernel_size) // 2 + 1
        self.num_primary = primary_capsules * primary_size**spatial_dims
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, conv_channels, kernel_size)
        self.act = Act[Act.RELU](inplace=True)
        self.primary = PrimaryCapsule(
            spatial_dims, conv_channels, primary_capsules, primary_dim, kernel_size=kernel_size,
            stride=2,
        )
        self.digits = DenseCapsule(
            self.num_primary, primary_dim, out_channels, class_dim,
            routing_iterations=routing_iterations,
        )
        self.decoder = self._make_decoder(class_dim, decoder_hidden, reconstruction_activation)

    def _class_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """Conv -> primary capsules -> dynamic routing: ``(B, C_in, *S) -> (B, C, class_dim)``."""
        primary = self.primary(self.act(self.conv(x)))  # (B, P, Dp, *S')
        batch, types, dim = primary.shape[:3]
        primary = primary.reshape(batch, types, dim, -1).transpose(2, 3).reshape(batch, -1, dim)
        return self.digits(primary)


@register_model("efficient_capsnet")
class EfficientCapsNet(_CapsuleClassifier):
    """Efficient-CapsNet (Mazzia, Salvetti and Chiaberge 2021): self-attention routing, 2D and 3D.

    Four convolutions with batch norm and ReLU (5, 3, 3, 3 / stride 2, no padding; 32, 64, 64, 128
    filters) -> depthwise convolution spanning the remaining grid -> reshape into 16 primary
    capsules of 8D -> ``squash_efficient`` -> class capsules by one-pass self-attention routing
    (``DenseCapsule(routing="attention", bias=True)``) -> lengths. On 28 x 28 MNIST with 10 classes
    the network without decoder has about 161K parameters, as in the paper. The decoder MLP
    (512, 1024, prod(input), sigmoid) reconstructs the input from the masked class capsules.

    Scores are capsule lengths ``(B, C)`` in [0, 1), not logits.

    Shapes: ``(B, in_channels, *[image_size] * spatial_dims) -> (B, out_channels)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        image_size: input size in every axis, >= 11.
        conv_channels: filters of the four convolutions; the last must equal
            ``primary_capsules * primary_dim``.
        primary_capsules: primary capsules (16).
        primary_dim: primary capsule size (8).
        class_dim: class capsule size (16).
        decoder_hidden: hidden widths of the decoder MLP ((512, 1024)).
        reconstruction_activation: ``"sigmoid"`` (inputs in [0, 1]) or None (linear).

    Raises:
        ValueError: when a size or width is out of range or the widths do not fit together.

    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        image_size: int = 28,
        conv_channels: Sequence[int] = (32, 64, 64, 128),
        primary_capsules: int = 16,
        primary_dim: int = 8,
        class_dim: int = 16,
        decoder_hidden: Sequence[int] = (512, 1024),
        reconstruction_activation: str | None = "sigmoid",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        if len(conv_channels) != 4:
            raise ValueError(f"conv_channels must list 4 widths; got {tuple(conv_channels)}")
        if primary_capsules < 1 or primary_dim < 1 or class_dim < 1:
            raise ValueError("primary_capsules, primary_dim and class_dim must be >= 1")
        if conv_channels[-1] != primary_capsules * primary_dim:
            raise ValueError(
                f"the last conv_channels entry must equal primary_capsules * primary_dim = "
                f"{primary_capsules * primary_dim}; got {conv_channels[-1]}"
            )
        if image_size < 11:
            raise ValueError(f"image_size must be >= 11; got {image_size}")
        self._set_image_size(image_size)
        kernels, strides = (5, 3, 3, 3), (1, 1, 1, 2)
        blocks: list[nn.Module] = []
        size, c_in = self.image_size, in_channels
        for c_out, k, s in zip(conv_channels, kernels, strides, strict=True):
            blocks.append(
                Convolution(
                    spatial_dims, c_in, int(c_out), strides=s, kernel_size=k, padding=0,
                    act="RELU", norm="BATCH",
                )
            )
            size, c_in = (size - k) // s + 1, int(c_out)
        self.features = nn.Sequential(*blocks)
        self.grid_size = size
        # Depthwise convolution over the whole remaining grid: one value per channel.
        self.primary = Conv[Conv.CONV, spatial_dims](c_in, c_in, kernel_size=size, groups=c_in)
        self.primary_capsules = primary_capsules
        self.primary_dim = primary_dim
        self.digits = DenseCapsule(
            primary_capsules, primary_dim, out_channels, class_dim, routing="attention", bias=True
        )
        self.decoder = self._make_decoder(class_dim, decoder_hidden, reconstruction_activation)

    def _class_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """Features -> primary capsules -> attention routing: ``(B, C_in, *S) -> (B, C, class_dim)``."""
        primary = self.primary(self.features(x))  # (B, P * Dp, 1, ...)
        primary = primary.reshape(x.shape[0], self.primary_capsules, self.primary_dim)
        return self.digits(squash_efficient(primary, dim=-1))

    def backbone_parameters(self) -> int:
        """Return the parameters without the decoder (the paper's 161K on MNIST)."""
        return self.num_parameters() - sum(p.numel() for p in self.decoder.parameters())


#: ResCapsNet defaults per spatial_dims: three stages to a 7 x 7 grid from 28 x 28 images in 2D;
#: in 3D a strided stem and a 4^3 grid from 28^3 volumes, to stay within 2x a small DenseNet's FLOPs.
_RESCAPS_DEFAULTS: dict[int, dict] = {
    2: {"channels": (32, 64, 128), "stem_stride": 1},
    3: {"channels": (16, 32, 64), "stem_stride": 2},
}

#: What turns the primary capsules into class capsules (``capsule_block``).
CLASS_BLOCKS = ("capsule", "linear")
#: Class-capsule transformations per primary capsule (DenseCapsule) or per capsule type, shared
#: across grid positions (GridCapsule) (``vote_weights``).
VOTE_WEIGHTS = ("per_capsule", "per_type")
#: Normalisation of the convolutional front end (``norm``).
FRONT_NORMS = ("instance", "batch")


def _check_class_block(routing: str, capsule_block: str, vote_weights: str,
                       agreement: str = "dot") -> None:
    """Raise ValueError for an unknown or inconsistent class-capsule block."""
    if routing not in ("dynamic", "attention"):
        raise ValueError(f"routing must be 'dynamic' or 'attention'; got {routing!r}")
    if capsule_block not in CLASS_BLOCKS:
        raise ValueError(
            f"capsule_block must be one of {', '.join(CLASS_BLOCKS)}; got {capsule_block!r}"
        )
    if vote_weights not in VOTE_WEIGHTS:
        raise ValueError(
            f"vote_weights must be one of {', '.join(VOTE_WEIGHTS)}; got {vote_weights!r}"
        )
    if vote_weights == "per_type" and (capsule_block != "capsule" or routing != "dynamic"):
        raise ValueError(
            "vote_weights='per_type' routes dynamically through capsules (capsule_block="
            "'capsule', routing='dynamic'); its fixed-weight ablation is routing_iterations=1"
        )
    if agreement not in AGREEMENTS:
        raise ValueError(
            f"agreement must be one of {', '.join(AGREEMENTS)}; got {agreement!r}"
        )
    if agreement != "dot" and (capsule_block != "capsule" or routing != "dynamic"):
        raise ValueError(
            f"agreement={agreement!r} is an option of dynamic routing through capsules "
            f"(capsule_block='capsule', routing='dynamic'); got capsule_block={capsule_block!r}, "
            f"routing={routing!r}"
        )


class _LinearClassCapsules(nn.Module):
    """Ablation: a linear layer with exactly the weights and FLOPs of a ``DenseCapsule``.

    ``(B, I, Din) -> Linear(I * Din -> J * Dout, no bias) -> (B, J, Dout) -> squash``. A
    ``DenseCapsule`` holds ``I * J * Din * Dout`` vote weights and spends as many multiply-adds on
    the votes; this layer holds and spends the same, but sums the votes with fixed weights instead
    of routing them.
    """

    def __init__(self, in_capsules: int, in_dim: int, out_capsules: int, out_dim: int) -> None:
        super().__init__()
        self.out_capsules, self.out_dim = out_capsules, out_dim
        self.linear = nn.Linear(in_capsules * in_dim, out_capsules * out_dim, bias=False)

    def forward(self, x: torch.Tensor, return_coupling: bool = False) -> torch.Tensor:
        """``(B, I, Din) -> (B, J, Dout)`` squashed; ``return_coupling`` must be False."""
        if return_coupling:
            raise ValueError("a linear block has no couplings")
        y = self.linear(x.flatten(1)).view(x.shape[0], self.out_capsules, self.out_dim)
        return squash(y, dim=-1)


@register_model("rescapsnet")
class ResCapsNet(_CapsuleClassifier):
    """Small capsule classifier: residual convolutional front end, primary capsules, routing.

    Where CapsNet spends 7M parameters (25M in 3D) on one 9x9 convolution and primary capsules,
    this network reaches the capsule grid with small residual stages, as Efficient-CapsNet does,
    but keeps a grid of primary capsules for the routing to choose among:

    - stem: MONAI ``Convolution`` 3x3 (``norm`` "instance", with affine parameters: no running
      statistics, so training and evaluation behave alike even after a few hundred steps or with
      averaged weights; or "batch", running statistics as in the DenseNet baseline, which did no
      better on AdrenalMNIST3D's validation split, BENCHMARKS.md), ReLU, ``channels[0]`` filters,
      stride ``stem_stride``; then a MONAI ``ResidualUnit`` with stride 2 per further width in
      ``channels`` (2D defaults (32, 64, 128), stem stride 1: 28 -> 14 -> 7; 3D (16, 32, 64),
      stem stride 2: 28 -> 14 -> 7 -> 4);
    - primary capsules: a 1x1 ``PrimaryCapsule``, ``primary_capsules`` x ``primary_dim`` 16 x 8
      at every grid position (784 capsules in 2D, 512 in 3D), squashed;
    - class capsules: ``DenseCapsule`` to ``C`` x ``class_dim`` 16 by ``routing`` "dynamic"
      (``routing_iterations`` 3, Sabour et al.) or "attention" (Efficient-CapsNet), one
      transformation per primary capsule (``vote_weights="per_capsule"``); or, with
      ``vote_weights="per_type"``, a ``GridCapsule``: one transformation per capsule *type*,
      shared by every grid position (matrix capsules, Hinton et al. 2018), optionally with
      coordinate addition, routed dynamically. Per-type votes cost the same FLOPs with
      ``1 / grid^spatial_dims`` of the class-layer weights, so the routing, not a weight per
      position, decides which positions speak for a class;
    - optional decoder (``decoder_hidden``, e.g. (512, 1024)): the CapsNet reconstruction MLP on
      the masked class capsules; off by default (None) since its output layer alone would
      outweigh the network.

    ``capsule_block="linear"`` is the ablation: the class capsules come from a linear layer with
    the same weights and FLOPs as the routed one (:class:`_LinearClassCapsules`), squashed, under
    the same margin loss. ``routing_iterations=1`` is the other (uniform couplings, same cost).
    The two are one function: one iteration gives ``s_j = sum_i W_ij x_i / J``, a linear map of the
    primary capsules; the linear block differs only in its parametrisation (no ``1 / J``) and its
    initialisation (PyTorch's default for ``nn.Linear`` instead of ``N(0, 0.01^2)``).

    ``agreement``: with ``"dot"`` (Sabour et al.) an iteration adds ``u_j|i . v_j`` to the routing
    logits, at most the vote's length. The class capsules sum hundreds of votes (784 here), so each
    vote is short (about 0.02 long in trained BreastMNIST models against class capsules about 0.5
    long; ``benchmarks/routing_stats.py``) and the couplings stay within about 0.005 of
    uniform whatever the votes say. ``"cosine"`` (3D-UCaps) adds ``cos(u_j|i, s_j)`` in [-1, 1],
    independent of vote length, so the couplings can move: trained on BreastMNIST and
    AdrenalMNIST3D, the largest of 2 couplings averages 0.66-0.69 against dot's 0.504, with no
    gain in validation AUC (the rule fixed before the runs) and level test AUC (3 seeds;
    BENCHMARKS.md), so dot stays the default.

    Cost with the defaults, 2 classes: 2D 28 x 28 about 0.59M parameters and 0.06 forward GFLOPs
    (CapsNet: 7.0M); 3D 28^3 about 0.55M parameters and 0.07 GFLOPs (CapsNet: 25M and 1.0).

    Scores are capsule lengths ``(B, C)`` in [0, 1), not logits.

    Shapes: ``(B, in_channels, *[image_size] * spatial_dims) -> (B, out_channels)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        image_size: input size in every axis, >= 8.
        channels: widths of the stem and the residual stages (defaults above).
        stem_stride: stride of the stem convolution (1 in 2D, 2 in 3D by default).
        primary_capsules: primary capsule types per grid position (16).
        primary_dim: primary capsule size (8).
        class_dim: class capsule size (16).
        routing: ``"dynamic"`` or ``"attention"``.
        routing_iterations: dynamic routing iterations (3).
        agreement: dynamic routing's agreement, ``"dot"`` (Sabour et al.; default) or
            ``"cosine"`` (3D-UCaps), which moves the couplings where dot products of the many
            short votes cannot (see the class docstring).
        capsule_block: ``"capsule"`` or the ``"linear"`` ablation (per-capsule votes only; with
            per-type votes the fixed-weight sum of the same votes is ``routing_iterations=1``).
        vote_weights: ``"per_capsule"`` (DenseCapsule) or ``"per_type"`` (GridCapsule).
        coordinate_addition: per-type votes only: add each position's scaled coordinates (off:
            with routing's sums they saturated the class capsules, see ``GridCapsule``).
        norm: front-end normalisation, ``"instance"`` (affine) or ``"batch"``.
        decoder_hidden: hidden widths of a reconstruction decoder, or None for none.
        reconstruction_activation: ``"sigmoid"`` (inputs in [0, 1]) or None (linear).

    Raises:
        ValueError: when a size or width is out of range or an option is unknown.

    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        image_size: int = 28,
        channels: Sequence[int] | None = None,
        stem_stride: int | None = None,
        primary_capsules: int = 16,
        primary_dim: int = 8,
        class_dim: int = 16,
        routing: str = "dynamic",
        routing_iterations: int = 3,
        agreement: str = "dot",
        capsule_block: str = "capsule",
        vote_weights: str = "per_capsule",
        coordinate_addition: bool = False,
        norm: str = "instance",
        decoder_hidden: Sequence[int] | None = None,
        reconstruction_activation: str | None = "sigmoid",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        defaults = _RESCAPS_DEFAULTS[spatial_dims]
        channels = tuple(int(c) for c in (defaults["channels"] if channels is None else channels))
        stem_stride = int(defaults["stem_stride"] if stem_stride is None else stem_stride)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must list at least one width >= 1; got {channels}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2; got {stem_stride}")
        if min(primary_capsules, primary_dim, class_dim, routing_iterations) < 1:
            raise ValueError(
                "primary_capsules, primary_dim, class_dim and routing_iterations must be >= 1"
            )
        _check_class_block(routing, capsule_block, vote_weights, agreement)
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8; got {image_size}")
        self._set_image_size(image_size)
        self.capsule_block = capsule_block
        self.vote_weights = vote_weights
        if norm not in FRONT_NORMS:
            raise ValueError(f"norm must be one of {', '.join(FRONT_NORMS)}; got {norm!r}")
        self.norm = norm
        norm_layer = ("INSTANCE", {"affine": True}) if norm == "instance" else "BATCH"
        layers: list[nn.Module] = [
            Convolution(spatial_dims, in_channels, channels[0], strides=stem_stride,
                        kernel_size=3, act="RELU", norm=norm_layer)
        ]
        size = -(-self.image_size // stem_stride)
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers.append(ResidualUnit(spatial_dims, c_in, c_out, strides=2, kernel_size=3,
                                       subunits=2, act="RELU", norm=norm_layer))
            size = -(-size // 2)
        self.features = nn.Sequential(*layers)
        self._build_head(channels[-1], size, primary_capsules, primary_dim, class_dim, routing,
                         routing_iterations, agreement, coordinate_addition, decoder_hidden,
                         reconstruction_activation)

    def _build_head(
        self,
        feature_channels: int,
        grid_size: int,
        primary_capsules: int,
        primary_dim: int,
        class_dim: int,
        routing: str,
        routing_iterations: int,
        agreement: str,
        coordinate_addition: bool,
        decoder_hidden: Sequence[int] | None,
        reconstruction_activation: str | None,
    ) -> None:
        """Primary capsules on the front end's grid, the class-capsule block, the decoder."""
        spatial_dims, out_channels = self.spatial_dims, self.out_channels
        vote_weights, capsule_block = self.vote_weights, self.capsule_block
        self.grid_size = grid_size
        self.primary = PrimaryCapsule(spatial_dims, feature_channels, primary_capsules, primary_dim,
                                      kernel_size=1, stride=1, padding=0)
        self.num_primary = primary_capsules * grid_size**spatial_dims
        if vote_weights == "per_type":
            self.digits: nn.Module = GridCapsule(
                spatial_dims, primary_capsules, primary_dim, out_channels, class_dim,
                routing_iterations=routing_iterations, agreement=agreement,
                coordinate_addition=coordinate_addition,
            )
        elif capsule_block == "capsule":
            self.digits = DenseCapsule(
                self.num_primary, primary_dim, out_channels, class_dim, routing=routing,
                routing_iterations=routing_iterations, agreement=agreement,
            )
        else:
            self.digits = _LinearClassCapsules(self.num_primary, primary_dim, out_channels,
                                               class_dim)
        if decoder_hidden is None:
            self.decoder = None
            self.has_decoder = False  # type: ignore[misc]  # the instance has no reconstruction
            self.loss_defaults = {}
        else:
            self.decoder = self._make_decoder(class_dim, decoder_hidden, reconstruction_activation)

    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """Return the primary capsules ``(B, N, primary_dim)`` of a checked plain tensor ``x``.

        Capsule ``n = type * G + position`` over the ``G`` grid positions (C order).
        """
        primary = self.primary(self.features(x))  # (B, P, Dp, *grid)
        batch, types, dim = primary.shape[:3]
        return primary.reshape(batch, types, dim, -1).transpose(2, 3).reshape(batch, -1, dim)

    def _digit_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the class-capsule block takes: the primary grid (per-type votes) or flat capsules."""
        if self.vote_weights == "per_type":
            return self.primary(self.features(x))  # (B, P, Dp, *grid)
        return self.primary_capsules(x)

    def _class_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """Features -> primary capsules -> routing: ``(B, C_in, *S) -> (B, C, class_dim)``."""
        return self.digits(self._digit_inputs(x))

    def couplings(self, x: torch.Tensor) -> torch.Tensor:
        """Return the routing couplings ``(B, N, C)`` of the class capsule layer.

        Args:
            x: ``(B, in_channels, *[image_size] * spatial_dims)``.

        Returns:
            Coupling coefficients ``c_ij`` between the ``N`` primary and ``C`` class capsules.

        Raises:
            ValueError: for the linear ablation, which has no couplings.

        """
        self.check_input(x)
        _, coupling = self.digits(self._digit_inputs(plain_tensor(x)), return_coupling=True)
        return coupling


@register_model("densecapsnet")
class DenseCapsNet(ResCapsNet):
    """Capsule classifier on a MONAI DenseNet front end: the DenseNet baseline with capsules as head.

    The small MONAI ``DenseNet`` that the classification benchmarks use as their CNN baseline
    ends with global average pooling and a linear layer. This network keeps its convolutional
    part up to the grid of the last dense block and puts capsules there instead:

    - front end: ``DenseNet(init_features, growth_rate, block_config).features`` (7x7 stem with
      stride 2, max pooling, dense blocks with transitions, batch norm) then ReLU; with the
      defaults, blocks (4, 8), a 28 x 28 (x 28) input ends on a 3 x 3 (x 3) grid of 88 channels;
    - primary capsules: a 1x1 ``PrimaryCapsule``, ``primary_capsules`` x ``primary_dim`` 16 x 8 per
      grid position, squashed;
    - class capsules ``C`` x ``class_dim`` 16: by default ``vote_weights="per_type"``, a
      ``GridCapsule`` (one transformation per capsule type shared by all positions, 3 dynamic
      routing iterations); ``"per_capsule"`` gives a ``DenseCapsule``; ``capsule_block="linear"``
      (per-capsule votes) and ``routing_iterations=1`` are the ablations of
      :class:`ResCapsNet`.

    Against the DenseNet baseline of blocks (4, 8, 6): the capsule head replaces its third block,
    pooling and linear layer. Cost with the defaults, 2 classes, 28^3: about 0.12M parameters and
    the same forward FLOPs as that DenseNet (within 10%); 2D 28 x 28 about 0.06M.

    Scores are capsule lengths ``(B, C)`` in [0, 1), not logits.

    Shapes: ``(B, in_channels, *[image_size] * spatial_dims) -> (B, out_channels)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        image_size: input size in every axis, >= 16.
        init_features: DenseNet stem filters (16).
        growth_rate: DenseNet growth rate (8).
        block_config: DenseNet layers per dense block ((4, 8)).
        primary_capsules: primary capsule types per grid position (16).
        primary_dim: primary capsule size (8).
        class_dim: class capsule size (16).
        routing: ``"dynamic"`` or ``"attention"`` (per-capsule votes only).
        routing_iterations: dynamic routing iterations (3).
        agreement: dynamic routing's agreement, ``"dot"`` (Sabour et al.; default) or
            ``"cosine"`` (3D-UCaps), which moves the couplings where dot products of the many
            short votes cannot (see :class:`ResCapsNet`).
        capsule_block: ``"capsule"`` or the ``"linear"`` ablation (per-capsule votes only).
        vote_weights: ``"per_type"`` (GridCapsule) or ``"per_capsule"`` (DenseCapsule).
        coordinate_addition: per-type votes only: add each position's scaled coordinates (off:
            with routing's sums they saturated the class capsules, see ``GridCapsule``).
        decoder_hidden: hidden widths of a reconstruction decoder, or None for none.
        reconstruction_activation: ``"sigmoid"`` (inputs in [0, 1]) or None (linear).

    Raises:
        ValueError: when a size or width is out of range or an option is unknown.

    """

    def __init__(  # noqa: D107 - documented on the class
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        image_size: int = 28,
        init_features: int = 16,
        growth_rate: int = 8,
        block_config: Sequence[int] = (4, 8),
        primary_capsules: int = 16,
        primary_dim: int = 8,
        class_dim: int = 16,
        routing: str = "dynamic",
        routing_iterations: int = 3,
        agreement: str = "dot",
        capsule_block: str = "capsule",
        vote_weights: str = "per_type",
        coordinate_addition: bool = False,
        decoder_hidden: Sequence[int] | None = None,
        reconstruction_activation: str | None = "sigmoid",
    ) -> None:
        _CapsuleClassifier.__init__(self, spatial_dims, in_channels, out_channels)
        block_config = tuple(int(b) for b in block_config)
        if not block_config or min(block_config) < 1 or min(init_features, growth_rate) < 1:
            raise ValueError(
                "block_config must list at least one block of >= 1 layers and init_features and "
                f"growth_rate must be >= 1; got {block_config}, {init_features}, {growth_rate}"
            )
        if min(primary_capsules, primary_dim, class_dim, routing_iterations) < 1:
            raise ValueError(
                "primary_capsules, primary_dim, class_dim and routing_iterations must be >= 1"
            )
        _check_class_block(routing, capsule_block, vote_weights, agreement)
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16; got {image_size}")
        self._set_image_size(image_size)
        self.capsule_block, self.vote_weights, self.norm = capsule_block, vote_weights, "batch"
        densenet = DenseNet(spatial_dims, in_channels, out_channels, init_features=init_features,
                            growth_rate=growth_rate, block_config=block_config)
        self.features = nn.Sequential(densenet.features, nn.ReLU())
        try:
            with torch.no_grad():
                probe = self.features.eval()(
                    torch.zeros(1, in_channels, *[image_size] * spatial_dims))
        except RuntimeError as error:  # a pooling layer left with nothing to pool
            raise ValueError(
                f"image_size {image_size} leaves no grid after the dense blocks {block_config}"
            ) from error
        finally:
            self.features.train()
        self._build_head(probe.shape[1], probe.shape[2], primary_capsules, primary_dim, class_dim,
                         routing, routing_iterations, agreement, coordinate_addition,
                         decoder_hidden, reconstruction_activation)
