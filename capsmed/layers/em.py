"""EM routing between matrix capsules (Hinton, Sabour and Frosst, ICLR 2018).

Notation as in :mod:`capsmed.layers.routing`: ``B`` batch, ``I`` input capsules, ``J`` output
capsules, ``D`` pose size (16: a 4x4 pose matrix flattened row-major), ``*S`` positions. Votes are
``(B, I, J, D, *S)``, input activations ``(B, I, *S)``; routing is local (every position on its
own, over its ``I`` inputs).

Procedure 1 of the paper, one Gaussian per output capsule with a diagonal covariance::

    R_ij = 1 / J
    for t in 0 .. T-1:
        lambda_t = final_lambda * (1 - 0.95 ** (t + 1))            # Gritzman 2019, see below
        M-step:  r_ij = R_ij a_i;  S_j = sum_i r_ij
                 mu_jh  = sum_i r_ij V_ijh / (S_j + eps)
                 var_jh = sum_i r_ij (V_ijh - mu_jh)^2 / (S_j + eps) + eps
                 cost_j = scale * S_j * sum_h (beta_u_j + 0.5 log var_jh)
                 a_j    = sigmoid(lambda_t (beta_a_j - cost_j))
        E-step (t < T-1):
                 log p_ij = -sum_h (V_ijh - mu_jh)^2 / (2 var_jh) - 0.5 sum_h log(2 pi var_jh)
                 R_ij = softmax_j(log(a_j + eps) + log p_ij)
    return mu_j (the output pose), a_j (the output activation)

The paper leaves the inverse temperature ``lambda`` open. Its schedule and the other choices the
paper does not pin down follow Gritzman (2019), "Avoiding implementation pitfalls of matrix capsule
networks with EM routing" and IBM's reference implementation (``em_routing.py`` of
IBM/matrix-capsules-with-em-routing, which reproduces smallNORB):

* ``lambda_t = final_lambda * (1 - 0.95^(t+1))``, ``final_lambda = 0.01`` (the formula Hinton et
  al. gave on OpenReview);
* ``cost_jh = (beta_u_j + 0.5 log var_jh)``, i.e. ``log sigma`` taken as half the log of the
  variance (no square root, whose gradient is infinite at 0), with ``eps = 1e-9`` added to the
  variance; ``beta_u`` and ``beta_a`` are one learned scalar per output capsule *type*;
* the cost is scaled by ``100 / (I / J)`` (their ``layer_norm_factor``), which normalises the
  amount of evidence a parent receives, so that one ``lambda`` / ``beta`` scale serves
  convolutional layers (``I`` = kernel x types) and class capsules (``I`` = every position x types);
* the gradient flows through every EM iteration (no stop-gradient), as Hinton et al. answered on
  OpenReview.

Where this differs from IBM's code: their E-step normalises each child over every parent it
reaches across positions (a child at the overlap of two windows splits its vote between them);
here, as in the other capsmed routings, each output position routes its own window (the paper's
Procedure 1 applied per position). Documented, not hidden: ``scale`` and ``final_lambda`` are
arguments.

Speed: the votes are held as ``(N, J, I, D)`` (``N`` = batch x positions); every sum over ``I`` or
``D`` is one batched row-vector product (``bmm`` of ``(1 x K) @ (K x M)``, the fast form on a
CPU); the backward pass is written by hand (:class:`_EMRouting`): it keeps the votes, ``V - mu`` and
``(V - mu)^2`` of each iteration and small per-iteration tensors, and writes the votes-sized
gradient terms into one buffer. A plain autograd loop keeps about five votes-sized tensors per
iteration and makes more in its backward pass.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from capsmed.layers.routing import _exporting

__all__ = ["EM_COST_SCALES", "em_routing", "em_routing_flat", "inverse_temperatures"]

#: Epsilon of IBM's reference: added to the variance, to the weight sums and inside ``log(a)``.
EM_EPS = 1e-9
#: ``final_lambda`` of Gritzman (2019) / Hinton et al.'s OpenReview answer.
FINAL_LAMBDA = 0.01
#: How the cost is scaled: ``"gritzman"`` = ``100 * J / I``; ``"none"`` = 1 (the paper's formula).
EM_COST_SCALES = ("gritzman", "none")
_LOG_2PI = math.log(2.0 * math.pi)


def inverse_temperatures(iterations: int, final_lambda: float = FINAL_LAMBDA) -> list[float]:
    """The inverse temperature of each EM iteration (Gritzman 2019, after Hinton et al.).

    Args:
        iterations: EM iterations ``T >= 1``.
        final_lambda: the schedule's scale (0.01).

    Returns:
        ``[final_lambda * (1 - 0.95 ** (t + 1)) for t in range(T)]``.
    """
    return [final_lambda * (1.0 - 0.95 ** (t + 1)) for t in range(iterations)]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, J, K)`` -> ``(N*J, 1, K)``: row vectors for the fast ``(1 x K) @ (K x M)`` products."""
    n, j, k = x.shape
    return x.reshape(n * j, 1, k)


def _over_inputs(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i r_nji x_njid``: r ``(N, J, I)``, x ``(N, J, I, D)`` -> ``(N, J, D)`` (one ``bmm``)."""
    n, j, i, d = x.shape
    return torch.bmm(_rows(r), x.view(n * j, i, d)).view(n, j, d)


def _over_pose(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_d w_njd x_njid``: w ``(N, J, D)``, x ``(N, J, I, D)`` -> ``(N, J, I)``.

    ``(1 x D) @ (D x I)`` on the transposed view: several times faster on a CPU than
    ``(I x D) @ (D x 1)``.
    """
    n, j, i, d = x.shape
    return torch.bmm(_rows(w), x.view(n * j, i, d).transpose(1, 2)).view(n, j, i)


class _ForwardOnly:
    """A stand-in for autograd's context when the forward runs as plain operations (export)."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:  # noqa: D102
        pass

    def mark_non_differentiable(self, *tensors: torch.Tensor) -> None:  # noqa: D102
        pass

    def set_materialize_grads(self, value: bool) -> None:  # noqa: D102
        pass


class _EMRouting(torch.autograd.Function):
    """EM routing (see the module docstring) with a hand-written backward pass.

    Saved for backward: the votes (which exist anyway), per iteration the small tensors
    ``R`` ``(N, J, I)``, ``mu``, ``var`` ``(N, J, D)``, ``S``, ``a`` ``(N, J)``, and the deviations
    ``V - mu`` and their squares (two votes-sized tensors per iteration, which the forward pass
    needs anyway; recomputing them costs about a tenth of the time). Every contraction is a
    ``(1 x K) @ (K x M)`` ``bmm``; every votes-sized gradient term an elementwise outer product
    written into one buffer (autograd's ``bmm`` backward would make them as slow ``K = 1``
    products).
    """

    @staticmethod
    def forward(ctx, v, a_in, beta_u, beta_a, iterations, final_lambda, scale, eps):  # noqa: D102
        n, j, i, d = v.shape
        lambdas = inverse_temperatures(iterations, final_lambda)
        a_row = a_in.unsqueeze(1)  # (N, 1, I)
        assign = v.new_full((n, j, i), 1.0 / j)
        saved_r, saved_mu, saved_var, saved_s, saved_a = [], [], [], [], []
        saved_diff, saved_sq = [], []
        mu = a_out = None
        for t in range(iterations):
            saved_r.append(assign)
            r = assign * a_row
            total = r.sum(dim=2)  # (N, J)
            inv = (total + eps).reciprocal().unsqueeze(2)
            mu = _over_inputs(r, v).mul_(inv)
            diff = v - mu.unsqueeze(2)
            sq = diff * diff
            saved_diff.append(diff)
            saved_sq.append(sq)
            var = _over_inputs(r, sq).mul_(inv).add_(eps)
            log_var = var.log()
            cost = (beta_u.unsqueeze(1) + 0.5 * log_var).sum(dim=2) * total * scale
            a_out = torch.sigmoid(lambdas[t] * (beta_a - cost))
            saved_mu.append(mu)
            saved_var.append(var)
            saved_s.append(total)
            saved_a.append(a_out)
            if t == iterations - 1:
                break
            logits = _over_pose(0.5 / var, sq).neg_()
            logits.add_((torch.log(a_out + eps) - 0.5 * (log_var.sum(dim=2) + d * _LOG_2PI))
                        .unsqueeze(2))
            assign = torch.softmax(logits, dim=1)
        ctx.consts = (iterations, lambdas, scale, eps)
        ctx.save_for_backward(v, a_in, beta_u, beta_a, *saved_r, *saved_mu, *saved_var,
                              *saved_s, *saved_a, *saved_diff, *saved_sq, assign)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(assign)
        return mu, a_out, assign

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mu, grad_a, _grad_assign):  # noqa: D102
        iterations, lambdas, scale, eps = ctx.consts
        v, a_in, beta_u, beta_a, *rest = ctx.saved_tensors
        t_count = iterations
        saved_r = rest[:t_count]
        saved_mu = rest[t_count : 2 * t_count]
        saved_var = rest[2 * t_count : 3 * t_count]
        saved_s = rest[3 * t_count : 4 * t_count]
        saved_a = rest[4 * t_count : 5 * t_count]
        saved_diff = rest[5 * t_count : 6 * t_count]
        saved_sq = rest[6 * t_count : 7 * t_count]
        n, j, i, d = v.shape
        if grad_mu is None and grad_a is None:
            return (None,) * 8
        a_row = a_in.unsqueeze(1)
        buf = torch.empty_like(v)
        want_v = ctx.needs_input_grad[0]
        grad_v = None
        grad_ain = torch.zeros_like(a_in)
        grad_bu = torch.zeros_like(beta_u)
        grad_ba = torch.zeros_like(beta_a)
        grad_next = None  # dL/dR_{t+1}
        for t in reversed(range(iterations)):
            assign, mu, var, total, act = (saved_r[t], saved_mu[t], saved_var[t], saved_s[t],
                                           saved_a[t])
            last = t == iterations - 1
            g_mu = grad_mu.clone() if last and grad_mu is not None else torch.zeros_like(mu)
            g_a = grad_a.clone() if last and grad_a is not None else torch.zeros_like(act)
            r = assign * a_row
            inv = (total + eps).reciprocal().unsqueeze(2)  # (N, J, 1)
            diff, sq = saved_diff[t], saved_sq[t]
            log_var = var.log()
            g_log_var = torch.zeros_like(var)
            g_var = torch.zeros_like(var)
            g_mahal = None
            half_prec = 0.5 / var
            if grad_next is not None:
                nxt = saved_r[t + 1]
                g_logit = nxt * (grad_next - (nxt * grad_next).sum(dim=1, keepdim=True))
                g_sum = g_logit.sum(dim=2)  # (N, J)
                g_a += g_sum / (act + eps)
                g_log_var -= 0.5 * g_sum.unsqueeze(2)
                g_mahal = g_logit.neg_()
                g_prec = _over_inputs(g_mahal, sq)  # dL/d(0.5 / var)
                g_var -= g_prec * half_prec / var
            g_z = g_a * act * (1.0 - act)
            grad_ba += lambdas[t] * g_z.sum(dim=0)
            g_cost = -lambdas[t] * g_z  # (N, J)
            g_total = g_cost * scale * (beta_u.unsqueeze(1) + 0.5 * log_var).sum(dim=2)
            grad_bu += (g_cost * scale * total).sum(dim=0) * d
            g_log_var += (0.5 * scale * g_cost * total).unsqueeze(2)
            g_var += g_log_var / var
            weighted = (var - eps) / inv  # sum_i r (V - mu)^2
            g_q = g_var * inv
            g_inv = (g_var * weighted).sum(dim=2)
            g_r = _over_pose(g_q, sq)
            # through the squared deviations: d(V - mu)^2 = 2 (V - mu) d(V - mu);
            # sum_i r (V - mu) = (S + eps) mu - S mu = eps mu exactly
            g_mu -= (2.0 * eps) * mu * g_q
            torch.mul(r.unsqueeze(3), (2.0 * g_q).unsqueeze(2), out=buf)
            if g_mahal is not None:
                g_mu -= 2.0 * _over_inputs(g_mahal, diff) * half_prec
                buf.addcmul_(g_mahal.unsqueeze(3), (2.0 * half_prec).unsqueeze(2))
            # through the mean mu = (sum_i r V) * inv
            sums = mu / inv
            g_m = g_mu * inv
            g_inv += (g_mu * sums).sum(dim=2)
            g_r += _over_pose(g_m, v)
            if want_v and grad_v is None:  # the first term: take the buffer over
                grad_v = buf.mul_(diff).addcmul_(r.unsqueeze(3), g_m.unsqueeze(2))
                buf = torch.empty_like(v)
            elif want_v:
                grad_v.addcmul_(buf, diff).addcmul_(r.unsqueeze(3), g_m.unsqueeze(2))
            g_total -= g_inv * inv.squeeze(2).square()
            g_r += g_total.unsqueeze(2)
            grad_ain += (g_r * assign).sum(dim=1)
            grad_next = g_r * a_row if t > 0 else None
        return (grad_v, grad_ain if ctx.needs_input_grad[1] else None,
                grad_bu if ctx.needs_input_grad[2] else None,
                grad_ba if ctx.needs_input_grad[3] else None, None, None, None, None)


def em_routing_flat(
    votes: torch.Tensor,
    activations: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    iterations: int = 3,
    *,
    final_lambda: float = FINAL_LAMBDA,
    cost_scale: float | None = None,
    eps: float = EM_EPS,
    return_assignments: bool = False,
) -> tuple[torch.Tensor, ...]:
    """EM routing on votes laid out for speed: ``(N, J, I, D)`` (what the matrix capsule layers make).

    See the module docstring for the procedure; :func:`em_routing` is the same on the house layout.
    The backward pass is written out by hand (:class:`_EMRouting`) and checked against finite
    differences in the tests; one backward pass per graph (no double backward).

    Args:
        votes: ``(N, J, I, D)`` votes ``V_ij`` of input ``i`` for output ``j`` (``N`` = batch x
            positions).
        activations: ``(N, I)`` input activations ``a_i``.
        beta_u: ``(J,)`` learned cost offsets per output type.
        beta_a: ``(J,)`` learned activation offsets per output type.
        iterations: EM iterations ``>= 1``.
        final_lambda: scale of the inverse temperature schedule.
        cost_scale: multiplies the cost; None for Gritzman's ``100 * J / I``.
        eps: epsilon on the variance, the weight sums and inside ``log(a_j)``.
        return_assignments: also return the last E-step's assignments ``R`` ``(N, J, I)`` (uniform
            ``1/J`` when ``iterations == 1``); they carry no gradient.

    Returns:
        ``(poses (N, J, D), activations (N, J))`` or, with ``return_assignments``,
        ``(poses, activations, R)``.
    """
    votes = votes.contiguous()
    activations = activations.contiguous()
    n, j, i, d = votes.shape
    scale = 100.0 * j / i if cost_scale is None else float(cost_scale)
    args = (votes, activations, beta_u, beta_a, iterations, float(final_lambda), scale, float(eps))
    if _exporting():  # traced or exported: the forward's plain operations, unrolled
        mu, a_out, assign = _EMRouting.forward(_ForwardOnly(), *args)
    else:
        mu, a_out, assign = _EMRouting.apply(*args)
    return (mu, a_out, assign) if return_assignments else (mu, a_out)


def em_routing(
    votes: torch.Tensor,
    activations: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    iterations: int = 3,
    *,
    final_lambda: float = FINAL_LAMBDA,
    cost_scale: float | None = None,
    eps: float = EM_EPS,
    return_assignments: bool = False,
) -> tuple[torch.Tensor, ...]:
    """EM routing of Hinton, Sabour and Frosst (2018) on the house layout, locally per position.

    Procedure, inverse temperature schedule (Gritzman 2019) and cost scale: see
    :mod:`capsmed.layers.em`.

    Args:
        votes: ``(B, I, J, D, *S)`` (or dense ``(B, I, J, D)``): ``D`` = 16 for 4x4 pose matrices
            flattened row-major (any ``D >= 1`` works).
        activations: ``(B, I, *S)`` input activations in [0, 1].
        beta_u: ``(J,)`` learned cost offset per output capsule type.
        beta_a: ``(J,)`` learned activation offset per output capsule type.
        iterations: EM iterations ``>= 1`` (3 in the paper).
        final_lambda: ``> 0``; ``lambda_t = final_lambda * (1 - 0.95^(t+1))``.
        cost_scale: ``> 0``, or None for Gritzman's ``100 * J / I``.
        eps: ``> 0``, added to the variance, the weight sums and inside ``log(a_j)``.
        return_assignments: also return the assignments ``R`` of the last E-step.

    Half precision inputs are routed in float32 and returned in their dtype.

    Returns:
        ``(poses (B, J, D, *S), activations (B, J, *S))``, plus ``R`` ``(B, I, J, *S)`` (sums to 1
        over ``J``) with ``return_assignments``.

    Raises:
        ValueError: for votes with fewer than 4 dims, activations, ``beta_u`` or ``beta_a`` whose
            shapes do not fit, ``iterations < 1`` or a non-positive ``final_lambda``,
            ``cost_scale`` or ``eps``.
    """
    if not torch.is_tensor(votes) or votes.dim() < 4 or min(votes.shape[:4]) < 1:
        shape = tuple(votes.shape) if torch.is_tensor(votes) else type(votes).__name__
        raise ValueError(
            f"votes must have shape (B, I, J, D, *spatial) with at least 4 dims, got {shape}"
        )
    b, i, j, d = votes.shape[:4]
    spatial = tuple(votes.shape[4:])
    if tuple(activations.shape) != (b, i, *spatial):
        raise ValueError(
            f"activations must have shape (B, I, *spatial) = {(b, i, *spatial)}, got "
            f"{tuple(activations.shape)}"
        )
    for name, beta in (("beta_u", beta_u), ("beta_a", beta_a)):
        if tuple(beta.shape) != (j,):
            raise ValueError(f"{name} must have shape (J,) = ({j},), got {tuple(beta.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    for name, value in (("final_lambda", final_lambda), ("eps", eps)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if cost_scale is not None and not cost_scale > 0:
        raise ValueError(f"cost_scale must be > 0 or None, got {cost_scale!r}")
    dtype = votes.dtype
    if dtype not in (torch.float32, torch.float64):
        votes, activations = votes.float(), activations.float()
        beta_u, beta_a = beta_u.float(), beta_a.float()
    length = math.prod(spatial)
    # (B, I, J, D, L) -> (B, L, J, I, D) -> (N, J, I, D)
    flat = votes.reshape(b, i, j, d, length).permute(0, 4, 2, 1, 3).reshape(b * length, j, i, d)
    acts = activations.reshape(b, i, length).transpose(1, 2).reshape(b * length, i)
    with torch.autocast(device_type=votes.device.type, enabled=False):
        out = em_routing_flat(
            flat, acts, beta_u, beta_a, iterations, final_lambda=final_lambda,
            cost_scale=cost_scale, eps=eps, return_assignments=return_assignments,
        )
    poses = out[0].view(b, length, j, d).permute(0, 2, 3, 1).reshape(b, j, d, *spatial)
    act = out[1].view(b, length, j).transpose(1, 2).reshape(b, j, *spatial)
    result = [poses.to(dtype), act.to(dtype)]
    if return_assignments:
        assign = out[2].view(b, length, j, i).permute(0, 3, 2, 1).reshape(b, i, j, *spatial)
        result.append(assign.to(dtype))
    return tuple(result)
