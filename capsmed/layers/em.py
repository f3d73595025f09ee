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

Speed: the votes are held as ``(N, J, I, D)`` (``N`` = batch x positions), every sum over ``I`` is
one batched matrix product (``bmm``), and the squared deviations ``(V - mu)^2`` are the only
votes-sized tensor an iteration keeps for the backward pass (a small ``autograd.Function`` recomputes
``V - mu`` there instead of storing it). A plain autograd loop keeps about six.
"""

from __future__ import annotations

import math

import torch

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


class _SquaredDeviation(torch.autograd.Function):
    """``(V - mu)^2`` for ``V`` ``(N, J, I, D)`` and ``mu`` ``(N, J, D)``, saving only ``V`` and ``mu``.

    The backward pass recomputes ``V - mu`` (one votes-sized temporary, freed at once) instead of
    keeping it alive from the forward pass.
    """

    @staticmethod
    def forward(ctx, v, mu):  # noqa: D102
        ctx.save_for_backward(v, mu)
        return torch.sub(v, mu.unsqueeze(2)).square_()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        v, mu = ctx.saved_tensors
        g = torch.sub(v, mu.unsqueeze(2)).mul_(grad).mul_(2.0)  # dL/dV
        grad_mu = -g.sum(dim=2) if ctx.needs_input_grad[1] else None
        return (g if ctx.needs_input_grad[0] else None), grad_mu


def _weighted_sum(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i r_nji x_njid`` (one ``bmm``): r ``(N, J, I)``, x ``(N, J, I, D)`` -> ``(N, J, D)``."""
    n, j, i, d = x.shape
    return torch.bmm(r.reshape(n * j, 1, i), x.reshape(n * j, i, d)).view(n, j, d)


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
            ``1/J`` when ``iterations == 1``).

    Returns:
        ``(poses (N, J, D), activations (N, J))`` or, with ``return_assignments``,
        ``(poses, activations, R)``.
    """
    votes = votes.contiguous()
    n, j, i, d = votes.shape
    scale = 100.0 * j / i if cost_scale is None else float(cost_scale)
    a_row = activations.unsqueeze(1)  # (N, 1, I)
    lambdas = inverse_temperatures(iterations, final_lambda)
    assign = None
    mu = a_out = None
    for t in range(iterations):
        # M-step
        r = a_row.expand(n, j, i) * (1.0 / j) if assign is None else assign * a_row
        total = r.sum(dim=2)  # (N, J)
        inv = (total + eps).reciprocal().unsqueeze(2)  # (N, J, 1)
        mu = _weighted_sum(r, votes) * inv
        sq = _SquaredDeviation.apply(votes, mu)  # (N, J, I, D)
        var = _weighted_sum(r, sq) * inv + eps
        log_var = var.log()
        cost = (beta_u.unsqueeze(1) + 0.5 * log_var).sum(dim=2) * total * scale  # (N, J)
        a_out = torch.sigmoid(lambdas[t] * (beta_a - cost))
        if t == iterations - 1:
            break
        # E-step: log N(V | mu, var) + log a_j, normalised over the J outputs
        half_prec = (0.5 / var).unsqueeze(3)  # (N, J, D, 1)
        mahal = torch.bmm(sq.reshape(n * j, i, d), half_prec.view(n * j, d, 1)).view(n, j, i)
        log_norm = 0.5 * (log_var.sum(dim=2) + d * _LOG_2PI)  # (N, J)
        logits = (torch.log(a_out + eps) - log_norm).unsqueeze(2) - mahal
        assign = torch.softmax(logits, dim=1)
    if not return_assignments:
        return mu, a_out
    if assign is None:
        assign = votes.new_full((n, j, i), 1.0 / j)
    return mu, a_out, assign


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
