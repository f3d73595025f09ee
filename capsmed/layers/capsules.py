"""Capsule layers: primary, dense (fully connected), convolutional and transposed convolutional.

Capsule tensors are laid out ``(B, capsules, dim, *spatial)``; dense capsules ``(B, capsules, dim)``.
One class serves 1D, 2D and 3D through ``spatial_dims`` and MONAI's layer factories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from capsmed.layers._checks import (
    check_bool,
    check_choice,
    check_int,
    check_size,
    check_spatial_dims,
)
from capsmed.layers.routing import AGREEMENTS, attention_routing, dynamic_routing
from capsmed.layers.squash import squash as squash_fn
from capsmed.layers.squash import squash_efficient

__all__ = [
    "ConvCapsule",
    "ConvTransposeCapsule",
    "DenseCapsule",
    "GridCapsule",
    "PrimaryCapsule",
]

ROUTINGS = ("dynamic", "attention")


def _check_input(x: torch.Tensor, capsules: int, dim: int, spatial_dims: int | None) -> None:
    expected_dims = 3 + (spatial_dims or 0)
    layout = "(B, capsules, dim)" if not spatial_dims else "(B, capsules, dim, *spatial)"
    if x.dim() != expected_dims or x.shape[1] != capsules or x.shape[2] != dim:
        raise ValueError(
            f"input must be {layout} with {expected_dims} dims, capsules={capsules}, dim={dim}; "
            f"got shape {tuple(x.shape)}"
        )


def _check_window(
    spatial_dims: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Return ``(kernel_size, stride, padding)`` as per-dim tuples; kernel, stride >= 1, padding >= 0."""
    return (
        check_size("kernel_size", kernel_size, spatial_dims, 1),
        check_size("stride", stride, spatial_dims, 1),
        check_size("padding", padding, spatial_dims, 0),
    )


class PrimaryCapsule(nn.Module):
    """Primary capsules: one convolution whose channels are grouped into capsules (Sabour et al.).

    ``(B, in_channels, *S) -> conv -> (B, capsules * capsule_dim, *S') -> (B, capsules, capsule_dim,
    *S')``, then squashed along the capsule dim. Channel ``k * capsule_dim + d`` is component ``d``
    of capsule type ``k``.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input feature channels (>= 1).
        capsules: capsule types per position (>= 1).
        capsule_dim: pose size of each capsule (>= 1).
        kernel_size: convolution kernel (int or per-dim sequence, >= 1); 9 in CapsNet.
        stride: convolution stride (>= 1); 2 in CapsNet.
        padding: zero padding (>= 0).
        squash: ``True`` for :func:`~capsmed.layers.squash`, ``"efficient"`` for
            :func:`~capsmed.layers.squash_efficient`, ``False`` for raw poses.

    Raises:
        ValueError: for any argument outside the ranges above.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        capsules: int,
        capsule_dim: int,
        kernel_size: int | Sequence[int] = 9,
        stride: int | Sequence[int] = 2,
        padding: int | Sequence[int] = 0,
        squash: bool | str = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.capsules = check_int("capsules", capsules, 1)
        self.capsule_dim = check_int("capsule_dim", capsule_dim, 1)
        kernel_size, stride, padding = _check_window(self.spatial_dims, kernel_size, stride, padding)
        if squash is not True and squash is not False and squash != "efficient":
            raise ValueError(f"squash must be True, False or 'efficient', got {squash!r}")
        self.squash = squash
        conv_type = Conv[Conv.CONV, self.spatial_dims]
        self.conv = conv_type(
            in_channels, capsules * capsule_dim, kernel_size, stride=stride, padding=padding
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute primary capsules.

        Args:
            x: ``(B, in_channels, *S)``.

        Returns:
            ``(B, capsules, capsule_dim, *S')`` with ``S'`` the convolution's output size.
        """
        y = self.conv(x)
        y = y.view(y.shape[0], self.capsules, self.capsule_dim, *y.shape[2:])
        if self.squash == "efficient":
            return squash_efficient(y, dim=2)
        if self.squash:
            return squash_fn(y, dim=2)
        return y


class DenseCapsule(nn.Module):
    """Fully connected capsule layer: every input capsule votes for every output capsule.

    Votes ``u_j|i = W_ij x_i`` with ``W`` of shape ``(I, J, Dout, Din)``, computed as one batched
    matrix product over the ``I`` input capsules (never a broadcast ``(B, I, J, Dout, Din)`` tensor),
    then routed: ``routing="dynamic"`` uses :func:`~capsmed.layers.dynamic_routing` (CapsNet),
    ``routing="attention"`` uses :func:`~capsmed.layers.attention_routing` (Efficient-CapsNet).

    Initialisation: dynamic routing ``W ~ N(0, 0.01^2)`` (Sabour et al.'s released code and its
    ports); attention routing He-normal with Keras' fan-in ``I * J * Din`` (Efficient-CapsNet).

    Args:
        in_capsules: ``I`` (>= 1).
        in_dim: ``Din`` (>= 1).
        out_capsules: ``J`` (>= 1).
        out_dim: ``Dout`` (>= 1).
        routing_iterations: dynamic-routing iterations (>= 1); ignored by attention routing.
        routing: ``"dynamic"`` or ``"attention"``.
        bias: learnable bias. Dynamic routing: ``(J, Dout)`` added to ``s_j`` (initialised to 0.1 as
            in Sabour et al.'s code). Attention routing: the log priors ``B`` ``(I, J)`` added to
            the couplings (initialised to 0 as in Efficient-CapsNet).
        agreement: dynamic-routing agreement, ``"dot"`` or ``"cosine"``.
        detach_logits: dynamic routing without gradient through the logit updates.

    Raises:
        ValueError: for any argument outside the ranges above.
    """

    def __init__(
        self,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        routing_iterations: int = 3,
        routing: str = "dynamic",
        bias: bool = False,
        *,
        agreement: str = "dot",
        detach_logits: bool = False,
    ) -> None:
        super().__init__()
        self.in_capsules = check_int("in_capsules", in_capsules, 1)
        self.in_dim = check_int("in_dim", in_dim, 1)
        self.out_capsules = check_int("out_capsules", out_capsules, 1)
        self.out_dim = check_int("out_dim", out_dim, 1)
        self.routing_iterations = check_int("routing_iterations", routing_iterations, 1)
        self.routing = check_choice("routing", routing, ROUTINGS)
        check_bool("bias", bias)
        self.agreement = check_choice("agreement", agreement, AGREEMENTS)
        self.detach_logits = check_bool("detach_logits", detach_logits)
        self.weight = nn.Parameter(torch.empty(in_capsules, out_capsules, out_dim, in_dim))
        if not bias:
            self.register_parameter("bias", None)
        elif routing == "dynamic":
            self.bias = nn.Parameter(torch.empty(out_capsules, out_dim))
        else:
            self.bias = nn.Parameter(torch.empty(in_capsules, out_capsules))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise weight and bias as documented in the class docstring."""
        if self.routing == "dynamic":
            nn.init.normal_(self.weight, std=0.01)
        else:
            fan_in = self.in_capsules * self.out_capsules * self.in_dim
            nn.init.normal_(self.weight, std=math.sqrt(2.0 / fan_in))
        if self.bias is not None:
            nn.init.constant_(self.bias, 0.1 if self.routing == "dynamic" else 0.0)

    def votes(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``u_j|i = W_ij x_i``.

        Args:
            x: ``(B, I, Din)``.

        Returns:
            ``(B, I, J, Dout)`` (a permuted view of an ``(I, B, J, Dout)`` buffer).
        """
        _check_input(x, self.in_capsules, self.in_dim, None)
        i, j, d_out, d_in = self.weight.shape
        w = self.weight.reshape(i, j * d_out, d_in).transpose(1, 2)  # (I, Din, J*Dout), no copy
        u = torch.bmm(x.transpose(0, 1), w)  # (I, B, J*Dout)
        return u.view(i, x.shape[0], j, d_out).transpose(0, 1)

    def forward(
        self, x: torch.Tensor, return_coupling: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Route input capsules to output capsules.

        Args:
            x: ``(B, I, Din)`` input capsules.
            return_coupling: also return the couplings ``(B, I, J)``.

        Returns:
            ``(B, J, Dout)`` output capsules, or ``(output, couplings)``.
        """
        votes = self.votes(x)
        if self.routing == "attention":
            return attention_routing(votes, self.bias, return_coupling=return_coupling)
        return dynamic_routing(
            votes,
            self.routing_iterations,
            agreement=self.agreement,
            detach_logits=self.detach_logits,
            bias=self.bias,
            return_coupling=return_coupling,
        )

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"in_capsules={self.in_capsules}, in_dim={self.in_dim}, out_capsules={self.out_capsules}"
            f", out_dim={self.out_dim}, routing={self.routing!r}, "
            f"routing_iterations={self.routing_iterations}, bias={self.bias is not None}"
        )


class GridCapsule(nn.Module):
    """Class capsules from a grid of capsule types, votes shared across positions.

    The class-capsule layer of matrix capsules (Hinton, Sabour and Frosst 2018, section 3.1): every
    capsule type ``t`` has one transformation per output capsule, ``W_tj``, shared by all grid
    positions, and the vote of the capsule of type ``t`` at position ``g`` carries where it comes
    from by **coordinate addition**: the position's centre, scaled to ``[0, 1]`` per axis, is added
    to the first ``spatial_dims`` entries of the vote::

        u_j|tg = W_tj x_tg + (coord_g, 0, ..., 0)

    The ``T * G`` votes are then routed to the ``J`` output capsules like a :class:`DenseCapsule`'s
    (dynamic routing, Sabour et al. 2017). A ``DenseCapsule`` over the same inputs holds a
    transformation per position and type (``G * T * J * Din * Dout`` weights); this layer holds
    ``T * J * Din * Dout`` and spends the same multiply-adds, so the routing, not a per-position
    weight, decides which positions speak for a class.

    Dynamic routing *sums* its ``T * G`` votes where matrix capsules' EM routing averages them, so
    the added coordinates grow with the grid: on AdrenalMNIST3D (1024 votes) they saturated the
    class capsules at the start of training (lengths near 1, margin loss at ``lambda * 0.9^2``;
    BENCHMARKS.md). ``coordinate_addition`` is therefore off in the models that use this layer.

    Initialisation: ``W ~ N(0, 0.01^2)`` as :class:`DenseCapsule` under dynamic routing.

    Args:
        spatial_dims: 1, 2 or 3.
        in_capsules: capsule types ``T`` per position (>= 1).
        in_dim: ``Din`` (>= 1).
        out_capsules: ``J`` (>= 1).
        out_dim: ``Dout`` (>= ``spatial_dims`` when ``coordinate_addition``).
        routing_iterations: dynamic-routing iterations (>= 1).
        agreement: ``"dot"`` or ``"cosine"``.
        coordinate_addition: add the scaled position to each vote.

    Raises:
        ValueError: for any argument outside the ranges above.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        routing_iterations: int = 3,
        *,
        agreement: str = "dot",
        coordinate_addition: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_capsules = check_int("in_capsules", in_capsules, 1)
        self.in_dim = check_int("in_dim", in_dim, 1)
        self.out_capsules = check_int("out_capsules", out_capsules, 1)
        self.out_dim = check_int("out_dim", out_dim, 1)
        self.routing_iterations = check_int("routing_iterations", routing_iterations, 1)
        self.agreement = check_choice("agreement", agreement, AGREEMENTS)
        self.coordinate_addition = check_bool("coordinate_addition", coordinate_addition)
        if coordinate_addition and out_dim < spatial_dims:
            raise ValueError(
                f"coordinate addition needs out_dim >= spatial_dims ({spatial_dims}); got {out_dim}"
            )
        self.weight = nn.Parameter(torch.empty(in_capsules, out_capsules, out_dim, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the weight as documented in the class docstring."""
        nn.init.normal_(self.weight, std=0.01)

    def coordinates(self, grid: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """Scaled position centres padded to a vote: ``(G, Dout)``, ``G = prod(grid)``.

        Entry ``d < spatial_dims`` of row ``g`` is ``(index_d + 0.5) / grid_d`` of position ``g``
        (C order, as ``reshape`` flattens the grid); the other entries are 0.
        """
        axes = [(torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) / n for n in grid]
        centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))
        return nn.functional.pad(centres, (0, self.out_dim - len(grid)))

    def votes(self, x: torch.Tensor) -> torch.Tensor:
        """Votes of every position and type: ``(B, T, Din, *grid) -> (B, G * T, J, Dout)``.

        Input capsule ``n = t * G + g`` (type-major, as ``(B, T, Din, *grid)`` flattens).
        """
        _check_input(x, self.in_capsules, self.in_dim, self.spatial_dims)
        batch, types, d_in, *grid = x.shape
        positions = math.prod(grid)
        t, j, d_out, _ = self.weight.shape
        w = self.weight.reshape(t, j * d_out, d_in).transpose(1, 2)  # (T, Din, J*Dout)
        flat = x.reshape(batch, types, d_in, positions).permute(1, 0, 3, 2)  # (T, B, G, Din)
        u = torch.bmm(flat.reshape(types, batch * positions, d_in), w)  # (T, B*G, J*Dout)
        u = u.view(types, batch, positions, j, d_out).transpose(0, 1)  # (B, T, G, J, Dout)
        if self.coordinate_addition:
            u = u + self.coordinates(grid, u)[None, None, :, None, :]
        return u.reshape(batch, types * positions, j, d_out)

    def forward(
        self, x: torch.Tensor, return_coupling: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Route the grid's capsules to the output capsules.

        Args:
            x: ``(B, T, Din, *grid)`` capsules (e.g. a :class:`PrimaryCapsule`'s output).
            return_coupling: also return the couplings ``(B, T * G, J)``, input ``t * G + g``.

        Returns:
            ``(B, J, Dout)`` output capsules, or ``(output, couplings)``.
        """
        return dynamic_routing(
            self.votes(x),
            self.routing_iterations,
            agreement=self.agreement,
            return_coupling=return_coupling,
        )

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"spatial_dims={self.spatial_dims}, in_capsules={self.in_capsules}, "
            f"in_dim={self.in_dim}, out_capsules={self.out_capsules}, out_dim={self.out_dim}, "
            f"routing_iterations={self.routing_iterations}, "
            f"coordinate_addition={self.coordinate_addition}"
        )


class _ConvCapsuleBase(nn.Module):
    """Convolutional votes followed by local dynamic routing; see :class:`ConvCapsule`."""

    transposed = False

    def __init__(
        self,
        spatial_dims: int,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int],
        padding: int | Sequence[int],
        routing_iterations: int,
        agreement: str,
        shared_votes: bool,
        bias: bool,
        output_padding: int | Sequence[int] = 0,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_capsules = check_int("in_capsules", in_capsules, 1)
        self.in_dim = check_int("in_dim", in_dim, 1)
        self.out_capsules = check_int("out_capsules", out_capsules, 1)
        self.out_dim = check_int("out_dim", out_dim, 1)
        kernel_size, stride, padding = _check_window(self.spatial_dims, kernel_size, stride, padding)
        self.routing_iterations = check_int("routing_iterations", routing_iterations, 1)
        self.agreement = check_choice("agreement", agreement, AGREEMENTS)
        self.shared_votes = check_bool("shared_votes", shared_votes)
        check_bool("bias", bias)
        kwargs: dict = {"stride": stride, "padding": padding, "bias": False}
        if self.transposed:
            output_padding = check_size("output_padding", output_padding, self.spatial_dims, 0)
            if any(op >= s for op, s in zip(output_padding, stride, strict=True)):
                raise ValueError(
                    f"output_padding must be < stride in every dim, got output_padding="
                    f"{output_padding}, stride={stride}"
                )
            kwargs["output_padding"] = output_padding
            conv_type = Conv[Conv.CONVTRANS, self.spatial_dims]
        else:
            conv_type = Conv[Conv.CONV, self.spatial_dims]
        if shared_votes:
            self.conv = conv_type(in_dim, out_capsules * out_dim, kernel_size, **kwargs)
        else:
            self.conv = conv_type(
                in_capsules * in_dim,
                in_capsules * out_capsules * out_dim,
                kernel_size,
                groups=in_capsules,
                **kwargs,
            )
        self.kernel_size = tuple(int(k) for k in kernel_size)
        if bias:
            self.bias = nn.Parameter(torch.full((out_capsules, out_dim), 0.1))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal vote weights, as SegCaps (3D-UCaps' N(0, 0.1) is the same scale here).

        Every vote ``u_j|i`` is a convolution of one input capsule's ``Din`` channels, so the
        fan-in is ``Din * prod(kernel_size)`` and the standard deviation ``sqrt(2 / fan_in)``.
        PyTorch's default (Kaiming-uniform with ``a = sqrt(5)``) would be 2.4x smaller, which
        leaves initial capsule lengths at about the bias alone.
        """
        fan_in = self.in_dim * math.prod(self.kernel_size)
        nn.init.normal_(self.conv.weight, mean=0.0, std=math.sqrt(2.0 / fan_in))
        if self.bias is not None:
            nn.init.constant_(self.bias, 0.1)

    def votes(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional votes.

        Args:
            x: ``(B, I, Din, *S)``.

        Returns:
            ``(B, I, J, Dout, *S')``, a view of the convolution output (no copy).
        """
        _check_input(x, self.in_capsules, self.in_dim, self.spatial_dims)
        b, i = x.shape[:2]
        if self.shared_votes:
            y = self.conv(x.reshape(b * i, self.in_dim, *x.shape[3:]))
        else:
            y = self.conv(x.reshape(b, i * self.in_dim, *x.shape[3:]))
        return y.view(b, i, self.out_capsules, self.out_dim, *y.shape[2:])

    def forward(
        self, x: torch.Tensor, return_coupling: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Convolutional votes, then dynamic routing at every output position.

        Args:
            x: ``(B, I, Din, *S)`` input capsules.
            return_coupling: also return the couplings ``(B, I, J, *S')``.

        Returns:
            ``(B, J, Dout, *S')`` squashed output capsules, or ``(output, couplings)``.
        """
        return dynamic_routing(
            self.votes(x),
            self.routing_iterations,
            agreement=self.agreement,
            bias=self.bias,
            return_coupling=return_coupling,
        )

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"spatial_dims={self.spatial_dims}, in_capsules={self.in_capsules}, in_dim={self.in_dim}"
            f", out_capsules={self.out_capsules}, out_dim={self.out_dim}, "
            f"routing_iterations={self.routing_iterations}, agreement={self.agreement!r}, "
            f"shared_votes={self.shared_votes}, bias={self.bias is not None}"
        )


class ConvCapsule(_ConvCapsuleBase):
    """Convolutional capsule layer with locally constrained dynamic routing (SegCaps, 3D-UCaps).

    Votes come from a convolution over each input capsule's pose:

    * ``shared_votes=True``: one convolution ``Din -> J * Dout`` shared by all ``I`` input types,
      applied to the ``(B * I, Din, *S)`` reshaped input (SegCaps / 3D-UCaps).
    * ``shared_votes=False``: a grouped convolution (``groups=I``), one kernel per input type.

    The votes ``(B, I, J, Dout, *S')`` are a view of the convolution output; they are routed at
    every output position over the ``I`` input types by :func:`~capsmed.layers.dynamic_routing`
    (``agreement="cosine"`` routes as 3D-UCaps does) and squashed. ``routing_iterations=1`` gives
    uniform couplings and no agreement update.

    Args:
        spatial_dims: 1, 2 or 3.
        in_capsules: ``I`` input capsule types (>= 1).
        in_dim: ``Din`` (>= 1).
        out_capsules: ``J`` output capsule types (>= 1).
        out_dim: ``Dout`` (>= 1).
        kernel_size: convolution kernel (>= 1).
        stride: convolution stride (>= 1).
        padding: zero padding (>= 0).
        routing_iterations: >= 1.
        agreement: ``"dot"`` (Sabour et al.) or ``"cosine"`` (3D-UCaps).
        shared_votes: share the vote convolution across input types.
        bias: learnable ``(J, Dout)`` bias added to ``s_j`` before squashing, initialised to 0.1 as
            in SegCaps and 3D-UCaps.

    Raises:
        ValueError: for any argument outside the ranges above.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 1,
        routing_iterations: int = 3,
        agreement: str = "dot",
        shared_votes: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__(
            spatial_dims,
            in_capsules,
            in_dim,
            out_capsules,
            out_dim,
            kernel_size,
            stride,
            padding,
            routing_iterations,
            agreement,
            shared_votes,
            bias,
        )


class ConvTransposeCapsule(_ConvCapsuleBase):
    """Transposed convolutional capsule layer (SegCaps' deconvolutional capsules): upsampling.

    Same as :class:`ConvCapsule` with a transposed convolution making the votes; the output size
    per dim is ``(S - 1) * stride - 2 * padding + kernel_size + output_padding``.

    Args:
        spatial_dims: 1, 2 or 3.
        in_capsules: ``I`` input capsule types (>= 1).
        in_dim: ``Din`` (>= 1).
        out_capsules: ``J`` output capsule types (>= 1).
        out_dim: ``Dout`` (>= 1).
        kernel_size: transposed convolution kernel (>= 1).
        stride: upsampling factor (>= 1).
        padding: (>= 0).
        output_padding: extra size on one side (>= 0 and < stride).
        routing_iterations: >= 1.
        agreement: ``"dot"`` or ``"cosine"``.
        shared_votes: share the vote convolution across input types.
        bias: learnable ``(J, Dout)`` bias added to ``s_j`` (initialised to 0.1).

    Raises:
        ValueError: for any argument outside the ranges above.
    """

    transposed = True

    def __init__(
        self,
        spatial_dims: int,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        kernel_size: int | Sequence[int] = 2,
        stride: int | Sequence[int] = 2,
        padding: int | Sequence[int] = 0,
        output_padding: int | Sequence[int] = 0,
        routing_iterations: int = 3,
        agreement: str = "dot",
        shared_votes: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__(
            spatial_dims,
            in_capsules,
            in_dim,
            out_capsules,
            out_dim,
            kernel_size,
            stride,
            padding,
            routing_iterations,
            agreement,
            shared_votes,
            bias,
            output_padding=output_padding,
        )
