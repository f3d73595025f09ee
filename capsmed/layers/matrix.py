"""Matrix capsule layers with EM routing (Hinton, Sabour and Frosst, ICLR 2018), 1D, 2D and 3D.

A matrix capsule is a 4x4 pose matrix and an activation. Layout (the house capsule layout with
``dim`` = 16): poses ``(B, capsules, 16, *spatial)`` -- each pose matrix flattened row-major, so
element ``(r, c)`` is index ``4 r + c`` -- and activations ``(B, capsules, *spatial)`` in [0, 1].
Every layer's ``forward(poses, activations)`` returns ``(poses, activations)``.

Votes are ``V_ij = M_i W_ij`` (pose times a learned 4x4 transformation), routed by
:func:`capsmed.layers.em.em_routing_flat` (inverse temperature schedule and cost scale after
Gritzman 2019; see :mod:`capsmed.layers.em`). One ``bmm`` over the input capsules makes every vote
at once; the votes are written once, in the layout routing reads.

Initialisation: ``W`` truncated normal with std 0.5, so that a vote ``M W`` (four products per
entry) keeps the pose entries' scale; ``beta_a`` truncated normal (mean -1000, std 500) as in IBM's
reference, whose cost scale (``100 J / I``) it is chosen for; ``beta_u`` Glorot-uniform as there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

from capsmed.layers._checks import check_bool, check_int, check_size, check_spatial_dims
from capsmed.layers.em import EM_COST_SCALES, FINAL_LAMBDA, em_routing_flat
from capsmed.layers.routing import _exporting

__all__ = ["ClassMatrixCapsule", "ConvMatrixCapsule", "PrimaryMatrixCapsule"]

POSE = 16  # 4x4


_BLOCK_DTYPES = {8: torch.int64, 16: torch.complex128}


def _permute_copy(x: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """``x.permute(perm).contiguous()`` for a ``perm`` that keeps the last axis (of size 4) last.

    The copy moves each row of 4 values as one wide element (16 bytes for float32, through a
    ``complex128`` view): a strided copy of 4-float rows is several times slower on a CPU.
    """
    x = x.contiguous()
    block = _BLOCK_DTYPES.get(x.element_size() * x.shape[-1])
    if block is None:
        return x.permute(perm).contiguous()
    return x.view(block).permute(perm).contiguous().view(x.dtype)


class _PermuteRows(torch.autograd.Function):
    """Differentiable :func:`_permute_copy` (its gradient is the inverse permutation)."""

    @staticmethod
    def forward(ctx, x, perm):  # noqa: D102
        ctx.inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
        return _permute_copy(x, perm)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _permute_copy(grad, ctx.inverse), None


def _permute_rows(x: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """:class:`_PermuteRows`, or while traced or exported the plain ``permute`` it equals."""
    if _exporting():
        return x.permute(*perm).contiguous()
    return _PermuteRows.apply(x, perm)


def _check_pair(poses: torch.Tensor, activations: torch.Tensor, capsules: int, spatial_dims: int | None
                ) -> None:
    rank = 3 + (spatial_dims or 0)
    if poses.dim() != rank or poses.shape[1] != capsules or poses.shape[2] != POSE:
        raise ValueError(
            f"poses must be (B, capsules={capsules}, 16, *spatial) with {rank} dims; got "
            f"{tuple(poses.shape)}"
        )
    expected = (poses.shape[0], capsules, *poses.shape[3:])
    if tuple(activations.shape) != expected:
        raise ValueError(
            f"activations must be (B, capsules, *spatial) = {expected}; got {tuple(activations.shape)}"
        )


def _check_routing(iterations: int, final_lambda: float, cost_scale: str | float) -> None:
    check_int("routing_iterations", iterations, 1)
    number = isinstance(final_lambda, (int, float)) and not isinstance(final_lambda, bool)
    if not number or not final_lambda > 0:
        raise ValueError(f"final_lambda must be a number > 0, got {final_lambda!r}")
    if isinstance(cost_scale, str):
        if cost_scale not in EM_COST_SCALES:
            raise ValueError(f"cost_scale must be one of {EM_COST_SCALES} or a number > 0, got "
                             f"{cost_scale!r}")
    elif isinstance(cost_scale, bool) or not isinstance(cost_scale, (int, float)) or not cost_scale > 0:
        raise ValueError(f"cost_scale must be one of {EM_COST_SCALES} or a number > 0, got "
                         f"{cost_scale!r}")


def _scale_value(cost_scale: str | float) -> float | None:
    if cost_scale == "gritzman":
        return None
    if cost_scale == "none":
        return 1.0
    return float(cost_scale)


class _EMLayer(nn.Module):
    """Shared parameters of the routed layers: ``W``, ``beta_u``, ``beta_a`` and routing options."""

    def _init_em(self, weight_shape: tuple[int, ...], out_capsules: int, iterations: int,
                 final_lambda: float, cost_scale: str | float) -> None:
        _check_routing(iterations, final_lambda, cost_scale)
        self.routing_iterations = iterations
        self.final_lambda = float(final_lambda)
        self.cost_scale = cost_scale
        self.weight = nn.Parameter(torch.empty(*weight_shape, 4, 4))
        self.beta_u = nn.Parameter(torch.empty(out_capsules))
        self.beta_a = nn.Parameter(torch.empty(out_capsules))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise ``W``, ``beta_u`` and ``beta_a`` as the module docstring says."""
        nn.init.trunc_normal_(self.weight, std=0.5, a=-1.0, b=1.0)
        limit = math.sqrt(6.0 / (self.beta_u.numel() + 1))
        nn.init.uniform_(self.beta_u, -limit, limit)
        nn.init.trunc_normal_(self.beta_a, mean=-1000.0, std=500.0, a=-2000.0, b=0.0)

    def _route(self, votes: torch.Tensor, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = votes.dtype
        if dtype not in (torch.float32, torch.float64):
            votes, acts = votes.float(), acts.float()
        with torch.autocast(device_type=votes.device.type, enabled=False):
            mu, a = em_routing_flat(
                votes, acts, self.beta_u.to(votes.dtype), self.beta_a.to(votes.dtype),
                self.routing_iterations, final_lambda=self.final_lambda,
                cost_scale=_scale_value(self.cost_scale),
            )
        return mu.to(dtype), a.to(dtype)


class PrimaryMatrixCapsule(nn.Module):
    """Primary matrix capsules: one convolution gives 16 pose entries and one logit per capsule type.

    ``(B, in_channels, *S) -> poses (B, capsules, 16, *S'), activations (B, capsules, *S')``;
    activations are ``sigmoid`` of their own channels (the paper's primary capsules, a 1x1
    convolution by default).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels (>= 1).
        capsules: capsule types (>= 1).
        kernel_size: convolution kernel (>= 1), 1 in the paper.
        stride: convolution stride (>= 1).
        padding: zero padding (>= 0).

    Raises:
        ValueError: for any argument outside the ranges above.
    """

    def __init__(self, spatial_dims: int, in_channels: int, capsules: int,
                 kernel_size: int | Sequence[int] = 1, stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.capsules = check_int("capsules", capsules, 1)
        kernel = check_size("kernel_size", kernel_size, self.spatial_dims, 1)
        strides = check_size("stride", stride, self.spatial_dims, 1)
        pads = check_size("padding", padding, self.spatial_dims, 0)
        self.conv = Conv[Conv.CONV, self.spatial_dims](
            in_channels, capsules * (POSE + 1), kernel, stride=strides, padding=pads
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute primary capsules.

        Args:
            x: ``(B, in_channels, *S)``.

        Returns:
            ``(poses (B, capsules, 16, *S'), activations (B, capsules, *S'))``.
        """
        y = self.conv(x)
        n = self.capsules * POSE
        poses = y[:, :n].reshape(y.shape[0], self.capsules, POSE, *y.shape[2:])
        return poses, torch.sigmoid(y[:, n:])


class ConvMatrixCapsule(_EMLayer):
    """Convolutional matrix capsules with EM routing (the paper's ConvCaps), 1D, 2D and 3D.

    Every output position routes the ``K * I`` capsules of its window (``K`` = kernel volume):
    input capsule ``i`` at window offset ``k`` votes ``M W_kij`` for output type ``j`` (one
    transformation per offset, input and output type, shared across positions). Zero padding adds
    capsules with activation 0, which carry no weight in routing.

    Args:
        spatial_dims: 1, 2 or 3.
        in_capsules: input capsule types ``I`` (>= 1).
        out_capsules: output capsule types ``J`` (>= 1).
        kernel_size: window (>= 1; 3 in the paper).
        stride: stride (>= 1).
        padding: zero padding (>= 0).
        routing_iterations: EM iterations (>= 1; 3 in the paper).
        final_lambda: inverse temperature scale (> 0; 0.01, Gritzman 2019).
        cost_scale: ``"gritzman"`` (``100 J / (K I)``), ``"none"`` or a number > 0.

    Raises:
        ValueError: for any argument outside the ranges above.
    """

    def __init__(self, spatial_dims: int, in_capsules: int, out_capsules: int,
                 kernel_size: int | Sequence[int] = 3, stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, routing_iterations: int = 3,
                 final_lambda: float = FINAL_LAMBDA, cost_scale: str | float = "gritzman") -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_capsules = check_int("in_capsules", in_capsules, 1)
        self.out_capsules = check_int("out_capsules", out_capsules, 1)
        self.kernel_size = check_size("kernel_size", kernel_size, self.spatial_dims, 1)
        self.stride = check_size("stride", stride, self.spatial_dims, 1)
        self.padding = check_size("padding", padding, self.spatial_dims, 0)
        self.window = math.prod(self.kernel_size)
        self._init_em((self.window * in_capsules, out_capsules), out_capsules, routing_iterations,
                      final_lambda, cost_scale)

    def output_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for an input of spatial ``size``."""
        return tuple((s + 2 * p - k) // st + 1 for s, p, k, st in
                     zip(size, self.padding, self.kernel_size, self.stride, strict=True))

    def _windows(self, x: torch.Tensor, lead: int) -> torch.Tensor:
        """Pad and unfold the trailing spatial axes of ``x``: ``(*lead, *S) -> (*lead, *S', *K)``."""
        pad = [p for p in reversed(self.padding) for _ in range(2)]
        if any(pad):
            x = F.pad(x, pad)
        for axis in range(self.spatial_dims):
            x = x.unfold(lead + axis, self.kernel_size[axis], self.stride[axis])
        return x

    def forward(self, poses: torch.Tensor, activations: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route a convolutional capsule layer.

        Args:
            poses: ``(B, I, 16, *S)``.
            activations: ``(B, I, *S)``.

        Returns:
            ``(poses (B, J, 16, *S'), activations (B, J, *S'))`` with ``S'`` the convolution's
            output size.

        Raises:
            ValueError: when the shapes do not fit, or the window does not fit in the padded input.
        """
        _check_pair(poses, activations, self.in_capsules, self.spatial_dims)
        out_size = self.output_size(poses.shape[3:])
        if min(out_size) < 1:
            raise ValueError(f"input size {tuple(poses.shape[3:])} is smaller than the kernel "
                             f"{self.kernel_size} with padding {self.padding}")
        b, i, j, nd = poses.shape[0], self.in_capsules, self.out_capsules, self.spatial_dims
        length = math.prod(out_size)
        n, ki = b * length, self.window * i
        # poses (B, I, 16, *S) -> windows (B, I, 16, *S', *K) -> (*K, I, B, *S', 16) -> (KI, N*4, 4)
        win = self._windows(poses, 3)
        perm = [*range(3 + nd, 3 + 2 * nd), 1, 0, *range(3, 3 + nd), 2]
        mats = win.permute(*perm).reshape(ki, n * 4, 4)
        w = self.weight.permute(0, 2, 1, 3).reshape(ki, 4, j * 4)  # (KI, 4, J*4)
        votes = torch.bmm(mats, w).view(ki, n, 4, j, 4)  # (KI, N, 4, J, 4) -> (N, J, KI, 4, 4)
        votes = _permute_rows(votes, (1, 3, 0, 2, 4)).view(n, j, ki, POSE)
        # activations (B, I, *S) -> (B, I, *S', *K) -> (B, *S', *K, I) -> (N, KI)
        awin = self._windows(activations, 2)
        aperm = [0, *range(2, 2 + nd), *range(2 + nd, 2 + 2 * nd), 1]
        acts = awin.permute(*aperm).reshape(n, ki)
        mu, a = self._route(votes, acts)
        out_poses = mu.view(b, *out_size, j, POSE).movedim(-2, 1).movedim(-1, 2)
        out_acts = a.view(b, *out_size, j).movedim(-1, 1)
        return out_poses.contiguous(), out_acts.contiguous()


class ClassMatrixCapsule(_EMLayer):
    """Class capsules with coordinate addition: every position of every input type votes for each class.

    The paper's last layer: transformations are shared across positions of one input capsule type
    (``W`` of shape ``(I, J, 4, 4)``), and the scaled coordinate ``(p + 0.5) / size`` of each
    position is added to the right-hand column of its vote: element ``(0, 3)`` gets the last
    spatial axis (the column), ``(1, 3)`` the one before (the row), ``(2, 3)`` the first axis in 3D
    (IBM's ``coord_addition``, extended to 3D). Any grid size is accepted.

    Args:
        spatial_dims: 1, 2 or 3.
        in_capsules: input capsule types ``I`` (>= 1).
        out_capsules: classes ``J`` (>= 1).
        routing_iterations: EM iterations (>= 1).
        final_lambda: inverse temperature scale (> 0; 0.01).
        cost_scale: ``"gritzman"`` (``100 J / (I * positions)``), ``"none"`` or a number > 0.
        coordinate_addition: add the scaled coordinates (True in the paper).

    Raises:
        ValueError: for any argument outside the ranges above.
    """

    def __init__(self, spatial_dims: int, in_capsules: int, out_capsules: int,
                 routing_iterations: int = 3, final_lambda: float = FINAL_LAMBDA,
                 cost_scale: str | float = "gritzman", coordinate_addition: bool = True) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_capsules = check_int("in_capsules", in_capsules, 1)
        self.out_capsules = check_int("out_capsules", out_capsules, 1)
        self.coordinate_addition = check_bool("coordinate_addition", coordinate_addition)
        self._init_em((in_capsules, out_capsules), out_capsules, routing_iterations, final_lambda,
                      cost_scale)

    def coordinates(self, size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """Offsets added to the votes: ``(L, 16)`` for the ``L = prod(size)`` positions (C order)."""
        offset = like.new_zeros(*size, POSE)
        for axis, s in enumerate(size):
            coord = (torch.arange(s, dtype=like.dtype, device=like.device) + 0.5) / s
            shape = [1] * len(size)
            shape[axis] = s
            element = 4 * (len(size) - 1 - axis) + 3  # last axis -> (0, 3), the one before -> (1, 3)
            offset[..., element] += coord.view(shape)
        return offset.reshape(-1, POSE)

    def forward(self, poses: torch.Tensor, activations: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route every capsule of the grid to the class capsules.

        Args:
            poses: ``(B, I, 16, *S)``.
            activations: ``(B, I, *S)``.

        Returns:
            ``(poses (B, J, 16), activations (B, J))``.

        Raises:
            ValueError: when the shapes do not fit.
        """
        _check_pair(poses, activations, self.in_capsules, self.spatial_dims)
        b, i, j = poses.shape[0], self.in_capsules, self.out_capsules
        size = tuple(poses.shape[3:])
        length = math.prod(size)
        # (B, I, 16, L) -> (I, B, L, 16) -> (I, B*L*4, 4) @ (I, 4, J*4)
        mats = poses.reshape(b, i, POSE, length).permute(1, 0, 3, 2).reshape(i, b * length * 4, 4)
        w = self.weight.permute(0, 2, 1, 3).reshape(i, 4, j * 4)
        if self.coordinate_addition:  # added inside the product: (1, B*L*4, J*4), rows (b, l, a)
            coords = self.coordinates(size, mats).view(1, length, 4, 1, 4).expand(b, length, 4, j, 4)
            votes = torch.baddbmm(coords.reshape(1, b * length * 4, j * 4), mats, w)
        else:
            votes = torch.bmm(mats, w)
        # (I, B, L, 4, J, 4) -> (B, J, L, I, 4, 4) -> (B, J, L*I, 16)
        votes = _permute_rows(votes.view(i, b, length, 4, j, 4), (1, 4, 2, 0, 3, 5))
        votes = votes.view(b, j, length * i, POSE)
        acts = activations.reshape(b, i, length).transpose(1, 2).reshape(b, length * i)
        return self._route(votes, acts)
