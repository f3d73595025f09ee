"""Routing between capsule layers: dynamic routing by agreement and self-attention routing.

Notation: ``B`` batch, ``I`` input capsules (types), ``J`` output capsules, ``D`` output pose size,
``*S`` spatial positions. Votes (predictions) ``u_j|i`` are laid out ``(B, I, J, D, *S)``; dense
votes are ``(B, I, J, D)``. Routing is local: every spatial position is routed on its own, over the
``I`` input types (SegCaps' locally constrained routing).

Dynamic routing (:func:`dynamic_routing`) is Procedure 1 of Sabour et al. (2017). Its forward value
is computed exactly; the implementation differs from public ports in how it spends time and memory:

* The routing loop runs inside one :class:`torch.autograd.Function` whose backward pass is written
  out by hand. Autograd keeps only the votes (which the layer below produced anyway) and small
  per-iteration tensors (couplings ``(B, I, J, *S)`` and poses ``(B, J, D, *S)``, each ``1/D`` or
  ``1/I`` of the votes), never a votes-sized temporary per iteration.
* Every contraction over ``I`` or ``D`` reads the votes once and writes nothing votes-sized: for
  spatial votes a loop of fused multiply-adds over the (small) ``I`` or ``D`` axis with the long
  spatial axis innermost; for dense votes batched matrix-vector products (``bmm``) on a
  ``(B*J, I, D)`` view. The gradient with respect to the votes, a sum of ``2T - 1`` rank-one terms
  over ``T`` iterations (plus one term for the cosine's normalisation), is written into a single
  buffer at the end (one ``bmm`` of inner size ``2T - 1`` for dense votes).
* The first iteration has uniform couplings ``1/J``, so it is a plain sum over ``I``.

The hand-written backward is checked against finite differences (``torch.autograd.gradcheck``) in
the tests. It supports one backward pass per graph (no double backward); ``retain_graph=True`` and
repeated backward passes work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from capsmed.layers.squash import squash, squash_efficient

__all__ = ["attention_routing", "coupling_statistics", "dynamic_routing"]

AGREEMENTS = ("dot", "cosine")
COSINE_EPS = 1e-8  # as torch.nn.functional.cosine_similarity: dot / (max(|a|, eps) * max(|b|, eps))


class _LocalBackend:
    """Contractions for spatial votes ``u`` of shape ``(N, I, J, D, L)`` (fastest with ``L`` innermost).

    Logit-shaped tensors (couplings, agreements) are ``(N, I, J, L)``; pose-shaped tensors are
    ``(N, J, D, L)``; per-output scalars are ``(N, J, L)``. The loops run over the short ``I`` or
    ``D`` axis and accumulate in place, so no temporary of the size of ``u`` is allocated.
    """

    j_dim = 2

    def __init__(self, u: torch.Tensor) -> None:
        self.u = u
        self.n, self.i, self.j, self.d, self.length = u.shape

    def full_logits(self, value: float) -> torch.Tensor:
        return self.u.new_full((self.n, self.i, self.j, self.length), value)

    def sum_votes(self) -> torch.Tensor:
        """``sum_i u_j|i`` -> ``(N, J, D, L)``."""
        return self.u.sum(dim=1)

    def weighted_sum(self, coef: torch.Tensor) -> torch.Tensor:
        """``sum_i coef_ij u_j|i`` for ``coef`` ``(N, I, J, L)`` -> ``(N, J, D, L)``."""
        u = self.u
        out = torch.mul(u[:, 0], coef[:, 0].unsqueeze(2))
        for i in range(1, self.i):
            out.addcmul_(u[:, i], coef[:, i].unsqueeze(2))
        return out

    def dot(self, pose: torch.Tensor) -> torch.Tensor:
        """``<u_j|i, pose_j>`` over ``D`` for ``pose`` ``(N, J, D, L)`` -> ``(N, I, J, L)``."""
        u = self.u
        out = torch.mul(u[:, :, :, 0], pose[:, None, :, 0])
        for d in range(1, self.d):
            out.addcmul_(u[:, :, :, d], pose[:, None, :, d])
        return out

    def norm(self) -> torch.Tensor:
        """``|u_j|i|`` -> ``(N, I, J, L)``."""
        u = self.u
        out = torch.mul(u[:, :, :, 0], u[:, :, :, 0])
        for d in range(1, self.d):
            out.addcmul_(u[:, :, :, d], u[:, :, :, d])
        return out.sqrt_()

    @staticmethod
    def per_output(x: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-output tensor ``(N, J, L)`` against logits ``(N, I, J, L)``."""
        return x.unsqueeze(1)

    @staticmethod
    def sum_inputs(x: torch.Tensor) -> torch.Tensor:
        """Sum a logit-shaped tensor over ``I`` -> ``(N, J, L)``."""
        return x.sum(dim=1)

    @staticmethod
    def bias_view(bias: torch.Tensor) -> torch.Tensor:
        return bias.unsqueeze(-1)

    @staticmethod
    def bias_grad(grad_pose: torch.Tensor) -> torch.Tensor:
        return grad_pose.sum(dim=(0, 3))

    def outer(self, terms: list, alpha: torch.Tensor | None) -> torch.Tensor:
        """``alpha_ij u_j|i + sum_k coef_k,ij pose_k,j`` -> ``(N, I, J, D, L)``.

        One broadcast multiply-add per term, written into a single output buffer (a few large
        operations rather than one per input capsule: the same speed on one thread, and far less
        synchronisation when threads compete for cores).

        Args:
            terms: pairs ``(coef, pose)``; ``coef`` is ``(N, I, J, L)`` or a python float; at least
                one ``coef`` is a tensor.
            alpha: ``(N, I, J, L)`` or None.
        """
        u = self.u
        out = torch.empty_like(u)
        tensors = [(c, p) for c, p in terms if torch.is_tensor(c)]
        scalars = [(c, p) for c, p in terms if not torch.is_tensor(c)]
        if alpha is not None:
            torch.mul(u, alpha.unsqueeze(3), out=out)
        else:
            coef, pose = tensors.pop(0)
            torch.mul(pose.unsqueeze(1), coef.unsqueeze(3), out=out)
        for coef, pose in tensors:
            out.addcmul_(pose.unsqueeze(1), coef.unsqueeze(3))
        for coef, pose in scalars:
            out.add_(pose.unsqueeze(1), alpha=coef)
        return out


class _BatchedBackend:
    """Contractions for dense votes ``u`` of shape ``(N, J, I, D)`` (contiguous) with ``bmm``.

    Logit-shaped tensors are ``(N, J, I)``; pose-shaped tensors ``(N, J, D)``; per-output scalars
    ``(N, J)``. Every contraction over ``I`` or ``D`` is a batched matrix-vector product on the
    ``(N*J, I, D)`` view.
    """

    j_dim = 1

    def __init__(self, u: torch.Tensor) -> None:
        self.u = u
        self.n, self.j, self.i, self.d = u.shape
        self.flat = u.view(self.n * self.j, self.i, self.d)

    def full_logits(self, value: float) -> torch.Tensor:
        return self.u.new_full((self.n, self.j, self.i), value)

    def sum_votes(self) -> torch.Tensor:
        return self.u.sum(dim=2)

    def weighted_sum(self, coef: torch.Tensor) -> torch.Tensor:
        nj = self.n * self.j
        return torch.bmm(coef.reshape(nj, 1, self.i), self.flat).view(self.n, self.j, self.d)

    def dot(self, pose: torch.Tensor) -> torch.Tensor:
        # (1 x D) @ (D x I) on the transposed view: about twice as fast as (I x D) @ (D x 1) on CPU
        nj = self.n * self.j
        row = pose.reshape(nj, 1, self.d)
        return torch.bmm(row, self.flat.transpose(1, 2)).view(self.n, self.j, self.i)

    def norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.u, dim=3)

    @staticmethod
    def per_output(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2)

    @staticmethod
    def sum_inputs(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=2)

    @staticmethod
    def bias_view(bias: torch.Tensor) -> torch.Tensor:
        return bias

    @staticmethod
    def bias_grad(grad_pose: torch.Tensor) -> torch.Tensor:
        return grad_pose.sum(dim=0)

    def outer(self, terms: list, alpha: torch.Tensor | None) -> torch.Tensor:
        """``alpha_ij u_j|i + sum_k coef_k,ij pose_k,j`` as one ``bmm`` of inner size ``len(terms)``."""
        nj, k = self.n * self.j, len(terms)
        left = self.u.new_empty(self.n, self.j, k, self.i)  # (N, J, K, I): contiguous rows
        for idx, (coef, _) in enumerate(terms):
            if torch.is_tensor(coef):
                left[:, :, idx].copy_(coef)
            else:
                left[:, :, idx].fill_(coef)
        left = left.view(nj, k, self.i).transpose(1, 2)
        right = torch.stack([p for _, p in terms], dim=2).view(nj, k, self.d)
        if alpha is None:
            out = torch.bmm(left, right)
        else:
            out = torch.baddbmm(self.flat * alpha.reshape(nj, self.i, 1), left, right)
        return out.view(self.n, self.j, self.i, self.d)


def _squash_backward(pose: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of :func:`squash` along dim 2 at ``pose`` (small tensors only)."""
    with torch.enable_grad():
        leaf = pose.detach().requires_grad_(True)
        out = squash(leaf, dim=2)
    return torch.autograd.grad(out, leaf, grad)[0]


def _pose_norm(pose: torch.Tensor) -> torch.Tensor:
    """``|pose|`` over dim 2 (``torch.linalg.vector_norm`` is much slower over a middle dim on CPU)."""
    return pose.square().sum(dim=2).sqrt_()


def _inverse_clamped(norm: torch.Tensor) -> torch.Tensor:
    """``1 / max(norm, eps)`` in place (the cosine-similarity denominator factor)."""
    return norm.clamp_min_(COSINE_EPS).reciprocal_()


def _inverse_square_masked(inv_norm: torch.Tensor) -> torch.Tensor:
    """``1 / n^2`` where ``n > eps`` else 0, from ``inv_norm = 1 / max(n, eps)``.

    ``max(n, eps)`` has derivative 0 below ``eps``, so the normalisation term of the cosine's
    gradient vanishes there.
    """
    return inv_norm.square().masked_fill_(inv_norm >= 1.0 / COSINE_EPS, 0.0)


def _route(u: torch.Tensor, bias: torch.Tensor | None, backend_cls: type, iterations: int,
           cosine: bool) -> tuple:
    """The forward pass of :class:`_DynamicRouting`, a loop unrolled at ``iterations``.

    Plain tensor operations, so that tracing (``torch.jit.trace``, the ONNX exporter) and
    ``torch.export`` record it as it runs: :func:`dynamic_routing` calls it directly while a
    model is being exported (:func:`_exporting`), where the hand-written backward is not needed.

    Returns:
        ``(out, coupling, couplings, poses, agreements, inv_norm_u)``: the squashed output and
        the last couplings, and what the backward pass keeps (every iteration's couplings, poses
        and cosine agreements, and ``1 / max(|u|, eps)`` for the cosine).
    """
    be = backend_cls(u)
    bias_v = None if bias is None else be.bias_view(bias)
    couplings: list[torch.Tensor] = []
    poses: list[torch.Tensor] = []
    agreements: list[torch.Tensor] = []
    inv_norm_u = _inverse_clamped(be.norm()) if cosine else None
    logits = None
    coupling = None
    pose = None
    for t in range(iterations):
        if t == 0:
            pose = be.sum_votes().div_(be.j)
        else:
            coupling = torch.softmax(logits, dim=be.j_dim)
            couplings.append(coupling)
            pose = be.weighted_sum(coupling)
        if bias_v is not None:
            pose.add_(bias_v)
        poses.append(pose)
        if t == iterations - 1:
            break
        if cosine:
            agreement = be.dot(pose).mul_(inv_norm_u)
            agreement.mul_(be.per_output(_inverse_clamped(_pose_norm(pose))))
            agreements.append(agreement)
        else:
            agreement = be.dot(squash(pose, dim=2))
        logits = agreement if logits is None else logits + agreement
    out = squash(pose, dim=2)
    if coupling is None:
        coupling = be.full_logits(1.0 / be.j)
    return out, coupling, couplings, poses, agreements, inv_norm_u


def _exporting() -> bool:
    """Whether a model is being traced or exported (TorchScript tracing, ONNX, ``torch.export``)."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_exporting())


class _DynamicRouting(torch.autograd.Function):
    """Procedure 1 of Sabour et al. (2017) with a hand-written backward pass.

    Forward, for ``t = 0 .. T-1``: ``c_t = softmax_J(b_t)`` (``b_0 = 0``), ``s_t = sum_i c_t u + bias``;
    for ``t < T-1``: ``b_{t+1} = b_t + g_t`` with ``g_t = <u, squash(s_t)>`` (dot) or
    ``g_t = cos(u, s_t)`` (cosine). Output ``(squash(s_{T-1}), c_{T-1})``.

    Backward walks the iterations in reverse: ``ds_t`` (from the output, or from the agreement
    ``g_t`` whose gradient is the accumulated logit gradient ``db_{t+1}``), then
    ``dc_t = <u, ds_t>`` and ``db_t = db_{t+1} + c_t * (dc_t - sum_J c_t dc_t)``. The vote gradient
    collects ``c_t ds_t`` and the agreement terms and is written once at the end. For the cosine
    ``g = <u, s> r_u r_s`` with ``r = 1 / max(|.|, eps)``:
    ``dg/du = r_u r_s s - g [|u| > eps] r_u^2 u`` and ``dg/ds = r_u r_s u - g [|s| > eps] r_s^2 s``.
    """

    @staticmethod
    def forward(ctx, u, bias, backend_cls, iterations, cosine, detach_logits):  # noqa: D102
        out, coupling, couplings, poses, agreements, inv_norm_u = _route(
            u, bias, backend_cls, iterations, cosine)
        ctx.backend_cls = backend_cls
        ctx.iterations = iterations
        ctx.cosine = cosine
        ctx.detach_logits = detach_logits
        ctx.has_bias = bias is not None
        if detach_logits:
            keep_c, keep_s, keep_g, extra = couplings[-1:], poses[-1:], [], []
        else:
            keep_c, keep_s, keep_g = couplings, poses, agreements
            extra = [inv_norm_u] if cosine else []
        ctx.counts = (len(keep_c), len(keep_s), len(keep_g))
        ctx.save_for_backward(u, *keep_c, *keep_s, *keep_g, *extra)
        ctx.set_materialize_grads(False)
        return out, coupling

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_coupling):  # noqa: D102
        u, *rest = ctx.saved_tensors
        nc, ns, ng = ctx.counts
        couplings, poses, agreements = rest[:nc], rest[nc : nc + ns], rest[nc + ns : nc + ns + ng]
        be = ctx.backend_cls(u)
        big_t = ctx.iterations
        uniform = 1.0 / be.j
        need_bias = ctx.has_bias and ctx.needs_input_grad[1]
        none = (None,) * 4

        if ctx.detach_logits:
            # Logits are constants: only the last weighted sum carries gradient.
            if grad_out is None:
                return (None, None, *none)
            grad_pose = _squash_backward(poses[-1], grad_out)
            coef = couplings[-1] if couplings else uniform
            grad_u = None
            if ctx.needs_input_grad[0]:
                grad_u = be.outer([(coef, grad_pose)], None)
            grad_bias = be.bias_grad(grad_pose) if need_bias else None
            return (grad_u, grad_bias, *none)

        if ctx.cosine:
            inv_norm_u = rest[-1]
            inv_sq_u = _inverse_square_masked(inv_norm_u)

        terms: list = []
        alpha = None
        grad_bias = None
        grad_logits = None  # gradient with respect to b_{t+1}
        scratch = None
        for t in reversed(range(big_t)):
            pose = poses[t]
            grad_pose = None
            if t == big_t - 1:
                if grad_out is not None:
                    grad_pose = _squash_backward(pose, grad_out)
            elif grad_logits is not None:
                grad_g = grad_logits
                if ctx.cosine:
                    inv_norm_s = _inverse_clamped(_pose_norm(pose))
                    weight = grad_g * inv_norm_u
                    weight.mul_(be.per_output(inv_norm_s))
                    terms.append((weight, pose))
                    scratch = torch.mul(grad_g, agreements[t], out=scratch)  # dg * g
                    if alpha is None:
                        alpha = scratch.mul(inv_sq_u).neg_()
                    else:
                        alpha.addcmul_(scratch, inv_sq_u, value=-1.0)
                    scale = be.sum_inputs(scratch).mul_(_inverse_square_masked(inv_norm_s))
                    grad_pose = be.weighted_sum(weight).sub_(pose * scale.unsqueeze(2))
                else:
                    terms.append((grad_g, squash(pose, dim=2)))
                    grad_pose = _squash_backward(pose, be.weighted_sum(grad_g))
            coupling = couplings[t - 1] if t > 0 else None
            grad_c = None
            if grad_pose is not None:
                if need_bias:
                    gb = be.bias_grad(grad_pose)
                    grad_bias = gb if grad_bias is None else grad_bias + gb
                terms.append((coupling if coupling is not None else uniform, grad_pose))
                if coupling is not None:
                    grad_c = be.dot(grad_pose)
            if t == big_t - 1 and grad_coupling is not None and coupling is not None:
                grad_c = grad_coupling.clone() if grad_c is None else grad_c.add_(grad_coupling)
            if grad_c is not None:
                # softmax backward in place: db = c * dc - c * sum_J(c * dc)
                grad_b = grad_c.mul_(coupling)
                grad_b.addcmul_(coupling, grad_b.sum(dim=be.j_dim, keepdim=True), value=-1.0)
                if grad_logits is not None:
                    grad_b.add_(grad_logits)  # grad_logits may be a stored coefficient: not in place
                grad_logits = grad_b

        grad_u = None
        if ctx.needs_input_grad[0] and terms:
            grad_u = be.outer(terms, alpha)
        return (grad_u, grad_bias, *none)


def _check_votes(votes: torch.Tensor, name: str = "votes") -> None:
    if not torch.is_tensor(votes):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(votes).__name__}")
    if votes.dim() < 4:
        raise ValueError(
            f"{name} must have shape (B, I, J, D, *spatial) with at least 4 dims, got "
            f"{tuple(votes.shape)}"
        )
    if min(votes.shape[:4]) < 1:
        raise ValueError(f"{name} must have non-empty B, I, J, D dims, got {tuple(votes.shape)}")


def dynamic_routing(
    votes: torch.Tensor,
    iterations: int = 3,
    *,
    agreement: str = "dot",
    detach_logits: bool = False,
    bias: torch.Tensor | None = None,
    return_coupling: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dynamic routing by agreement (Sabour et al. 2017, Procedure 1), locally per position.

    Forward value, with ``u_j|i`` the votes::

        b_ij = 0
        for r in 1..iterations:
            c_ij = softmax_j(b_ij)                     # over the J output capsules
            s_j  = sum_i c_ij u_j|i (+ bias_j)
            v_j  = squash(s_j)
            if r < iterations: b_ij += a(u_j|i, s_j)   # not after the last iteration
        return v_j

    With ``agreement="dot"`` (the paper) ``a = u_j|i . v_j``. With ``agreement="cosine"`` (3D-UCaps)
    ``a = cos(u_j|i, s_j)``, the cosine similarity between the vote and the *unsquashed*
    pre-activation ``s_j`` (bias included), with :func:`torch.nn.functional.cosine_similarity`'s
    ``eps = 1e-8`` on each norm; only the final ``s_j`` is squashed.

    Args:
        votes: ``(B, I, J, D, *spatial)`` predictions of input capsule ``i`` for output capsule ``j``,
            or dense ``(B, I, J, D)``.
        iterations: number of routing iterations ``>= 1``; 1 means uniform couplings ``1/J`` and no
            agreement update.
        agreement: ``"dot"`` or ``"cosine"``.
        detach_logits: treat the routing logits as constants in the backward pass (no gradient
            through the agreement updates; the gradient flows through the last weighted sum with
            fixed couplings), as implementations that route with detached votes do. The forward
            value is unchanged.
        bias: optional ``(J, D)`` tensor added to every ``s_j`` (SegCaps / 3D-UCaps), broadcast over
            batch and space.
        return_coupling: also return the coupling coefficients of the last iteration.

    Half precision votes (float16, bfloat16) are routed in float32 and the results returned in the
    votes' dtype.

    Returns:
        ``v`` of shape ``(B, J, D, *spatial)``, or ``(v, c)`` with ``c`` the couplings
        ``(B, I, J, *spatial)`` of the last iteration (they sum to 1 over ``J``). ``c`` is
        differentiable unless ``detach_logits`` is set.

    Raises:
        ValueError: for votes with fewer than 4 dims, ``iterations < 1``, an unknown ``agreement``,
            or a bias not of shape ``(J, D)``.
    """
    _check_votes(votes)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if agreement not in AGREEMENTS:
        raise ValueError(f"agreement must be one of {AGREEMENTS}, got {agreement!r}")
    n, i, j, d = votes.shape[:4]
    spatial = tuple(votes.shape[4:])
    if bias is not None and tuple(bias.shape) != (j, d):
        raise ValueError(f"bias must have shape (J, D) = {(j, d)}, got {tuple(bias.shape)}")

    in_dtype = votes.dtype
    if in_dtype not in (torch.float32, torch.float64):  # route half precision in float32
        votes = votes.float()
        bias = None if bias is None else bias.float()
    if iterations == 1:
        pose = votes.sum(dim=1) * (1.0 / j)
        if bias is not None:
            pose = pose + bias.view(j, d, *([1] * len(spatial)))
        out = squash(pose, dim=2)
        coupling = votes.new_full((n, i, j, *spatial), 1.0 / j) if return_coupling else None
        return _finish(out, coupling, in_dtype)

    cosine = agreement == "cosine"
    # Routing runs in the votes' (float32/64) precision even inside an autocast region: mixed
    # precision would otherwise turn the batched products of the custom Function to bf16/fp16
    # while its saved tensors stay float32.
    with torch.autocast(device_type=votes.device.type, enabled=False):
        if spatial:
            u = votes.reshape(n, i, j, d, -1)
            out, coupling = _apply_routing(u, bias, _LocalBackend, iterations, cosine,
                                           detach_logits)
            out = out.view(n, j, d, *spatial)
            coupling = coupling.view(n, i, j, *spatial)
        else:
            u = votes.transpose(1, 2).contiguous()  # (B, J, I, D) for bmm over the (B*J) batch
            out, coupling = _apply_routing(u, bias, _BatchedBackend, iterations, cosine,
                                           detach_logits)
            coupling = coupling.transpose(1, 2)
    if detach_logits:
        coupling = coupling.detach()
    return _finish(out, coupling if return_coupling else None, in_dtype)


def _apply_routing(u: torch.Tensor, bias: torch.Tensor | None, backend_cls: type,
                   iterations: int, cosine: bool,
                   detach_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`_DynamicRouting`, or its forward alone while a model is exported (same values)."""
    if _exporting():
        return _route(u, bias, backend_cls, iterations, cosine)[:2]
    return _DynamicRouting.apply(u, bias, backend_cls, iterations, cosine, detach_logits)


def _finish(
    out: torch.Tensor, coupling: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    out = out.to(dtype)
    return out if coupling is None else (out, coupling.to(dtype))


def attention_routing(
    votes: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    return_coupling: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Self-attention routing of Efficient-CapsNet (Mazzia et al. 2021), one pass.

    For each output capsule ``j`` the paper forms the self-attention matrix of its votes
    ``A_j = U_j U_j^T / sqrt(D)`` (``U_j`` the ``I x D`` matrix of votes ``u_j|i``), takes the
    couplings as a softmax over the output capsules of the summed agreement,
    ``C_ij = softmax_j(sum_k A_j,ik)``, adds the learned log priors ``B`` and forms
    ``s_j = sum_i (C_ij + B_ij) u_j|i``, ``v_j = squash_efficient(s_j)``. This matches the authors'
    code (``FCCaps``: softmax over the output axis, then ``+ b``, ``b`` initialised to zero).

    Since ``sum_k A_j,ik = u_j|i . (sum_k u_j|k) / sqrt(D)``, the ``I x I`` matrix is never formed:
    the agreement costs ``O(I J D)`` instead of ``O(I^2 J D)``, with the same value and gradient.

    Args:
        votes: ``(B, I, J, D)`` or ``(B, I, J, D, *spatial)`` (routed per position).
        bias: optional log priors ``B`` of shape ``(I, J)``, added to the couplings after the softmax.
        return_coupling: also return ``C`` (before adding the priors), ``(B, I, J, *spatial)``.

    Half precision votes are routed in float32 and the results returned in the votes' dtype.

    Returns:
        ``v`` of shape ``(B, J, D, *spatial)``, or ``(v, C)``.

    Raises:
        ValueError: for votes with fewer than 4 dims or a bias not of shape ``(I, J)``.
    """
    _check_votes(votes)
    n, i, j, d = votes.shape[:4]
    extra = [1] * (votes.dim() - 4)
    if bias is not None and tuple(bias.shape) != (i, j):
        raise ValueError(f"bias must have shape (I, J) = {(i, j)}, got {tuple(bias.shape)}")
    in_dtype = votes.dtype
    if in_dtype not in (torch.float32, torch.float64):  # route half precision in float32
        votes = votes.float()
        bias = None if bias is None else bias.float()
    total = votes.sum(dim=1, keepdim=True)  # (B, 1, J, D, *S): sum_k u_j|k
    agreement = (votes * total).sum(dim=3) * (1.0 / math.sqrt(d))  # (B, I, J, *S)
    coupling = F.softmax(agreement, dim=2)
    weights = coupling if bias is None else coupling + bias.view(1, i, j, *extra)
    out = squash_efficient((weights.unsqueeze(3) * votes).sum(dim=1), dim=2)
    return _finish(out, coupling if return_coupling else None, in_dtype)


def coupling_statistics(coupling: torch.Tensor, dim: int = 2) -> dict[str, float]:
    """Summarise routing couplings: how decisively each input capsule chooses its outputs.

    For every input capsule ``i`` (and position and sample) the couplings ``c_ij`` over the ``J``
    output capsules (axis ``dim``) sum to 1. Uniform couplings (``1 / J``, what one routing
    iteration gives) mean no choice; a one-hot row means input ``i`` sends everything to one
    output.

    Args:
        coupling: couplings, e.g. ``(B, I, J)`` from a dense layer or ``(B, I, J, *S)`` from a
            convolutional one.
        dim: the axis of the output capsules ``J``.

    Returns:
        ``{"max_coupling": mean of max_j c_ij (1/J .. 1), "entropy": mean of
        -sum_j c_ij log c_ij / log J (1 for uniform, 0 for one-hot; 0 when J = 1),
        "outputs": J}``.
    """
    c = coupling.detach().double()
    j = c.shape[dim]
    max_mean = float(c.amax(dim=dim).mean())
    if j == 1:
        return {"max_coupling": max_mean, "entropy": 0.0, "outputs": 1}
    ent = -(c * torch.log(c.clamp_min(1e-300))).sum(dim=dim) / math.log(j)
    return {"max_coupling": max_mean, "entropy": float(ent.mean()), "outputs": int(j)}
