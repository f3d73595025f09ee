"""EM routing (Hinton et al. 2018; schedule of Gritzman 2019) against a plain one-position loop."""

import itertools
import math

import numpy as np
import pytest
import torch

from capsmed.layers import (
    ClassMatrixCapsule,
    ConvMatrixCapsule,
    PrimaryMatrixCapsule,
    em_routing,
    inverse_temperatures,
)

EPS = 1e-9


def _em_one(v, a, beta_u, beta_a, iterations, final_lambda=0.01, scale=None, eps=EPS):
    """Procedure 1 for one position, in plain numpy. v (I, J, D), a (I,). Returns mu, a_out, R."""
    n_in, n_out, dim = v.shape
    scale = 100.0 * n_out / n_in if scale is None else scale
    r = np.full((n_in, n_out), 1.0 / n_out)
    for t in range(iterations):
        lam = final_lambda * (1 - 0.95 ** (t + 1))
        mu = np.zeros((n_out, dim))
        var = np.zeros((n_out, dim))
        a_out = np.zeros(n_out)
        for j in range(n_out):
            w = [r[i, j] * a[i] for i in range(n_in)]
            s = sum(w)
            mu[j] = sum(w[i] * v[i, j] for i in range(n_in)) / (s + eps)
            var[j] = sum(w[i] * (v[i, j] - mu[j]) ** 2 for i in range(n_in)) / (s + eps) + eps
            cost = scale * s * sum(beta_u[j] + 0.5 * math.log(var[j, h]) for h in range(dim))
            a_out[j] = 1.0 / (1.0 + math.exp(-lam * (beta_a[j] - cost)))
        if t < iterations - 1:
            for i in range(n_in):
                p = [(a_out[j] + eps) * math.prod(
                    math.exp(-((v[i, j, h] - mu[j, h]) ** 2) / (2 * var[j, h]))
                    / math.sqrt(2 * math.pi * var[j, h]) for h in range(dim)) for j in range(n_out)]
                r[i] = np.array(p) / sum(p)
    return mu, a_out, r


def _em_loop(votes, acts, beta_u, beta_a, iterations, **kw):
    """Every sample and position on its own. votes (B, I, J, D, *S), acts (B, I, *S)."""
    votes, acts = votes.numpy(), acts.numpy()
    b, n_in, n_out, dim = votes.shape[:4]
    spatial = votes.shape[4:]
    mu = np.zeros((b, n_out, dim, *spatial))
    a_out = np.zeros((b, n_out, *spatial))
    r = np.zeros((b, n_in, n_out, *spatial))
    for n in range(b):
        for pos in itertools.product(*[range(s) for s in spatial]):
            idx = (n, slice(None), slice(None), slice(None), *pos)
            m, a, rr = _em_one(votes[idx], acts[(n, slice(None), *pos)], beta_u.numpy(),
                               beta_a.numpy(), iterations, **kw)
            mu[(n, slice(None), slice(None), *pos)] = m
            a_out[(n, slice(None), *pos)] = a
            r[(n, slice(None), slice(None), *pos)] = rr
    return mu, a_out, r


def _case(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, i, j, d = shape[:4]
    votes = torch.randn(*shape, generator=g, dtype=torch.float64)
    acts = torch.rand(b, i, *shape[4:], generator=g, dtype=torch.float64)
    beta_u = torch.randn(j, generator=g, dtype=torch.float64)
    beta_a = torch.randn(j, generator=g, dtype=torch.float64) * 5
    return votes, acts, beta_u, beta_a


def test_inverse_temperatures_follow_gritzman():
    assert inverse_temperatures(3) == pytest.approx([0.01 * 0.05, 0.01 * 0.0975, 0.01 * 0.142625])
    assert inverse_temperatures(1, 2.0) == pytest.approx([0.1])


def test_one_iteration_by_hand():
    # votes 1 and 3 for one output, both inputs active: mean 2, variance 1 (+eps), 0.5 log var = 0,
    # so cost = 1 * S * D * beta_u = 2 and a = sigmoid(lambda_0 * (beta_a - 2)).
    votes = torch.tensor([1.0, 3.0], dtype=torch.float64).view(1, 2, 1, 1)
    acts = torch.ones(1, 2, dtype=torch.float64)
    poses, a = em_routing(votes, acts, torch.ones(1, dtype=torch.float64),
                          torch.full((1,), 3.0, dtype=torch.float64), 1, cost_scale=1.0)
    assert poses.item() == pytest.approx(4.0 / (2.0 + EPS), rel=1e-15)
    lam0 = 0.01 * 0.05
    assert a.item() == pytest.approx(1.0 / (1.0 + math.exp(-lam0 * (3.0 - 2.0))), rel=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 2, 5), (2, 5, 3, 4, 3), (1, 4, 2, 16, 3, 1, 2)])
@pytest.mark.parametrize("iterations", [1, 3])
def test_matches_plain_loop(shape, iterations):
    votes, acts, beta_u, beta_a = _case(shape)
    mu, a, r = em_routing(votes, acts, beta_u, beta_a, iterations, final_lambda=1.0,
                          return_assignments=True)
    ref_mu, ref_a, ref_r = _em_loop(votes, acts, beta_u, beta_a, iterations, final_lambda=1.0)
    np.testing.assert_allclose(mu.numpy(), ref_mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.numpy(), ref_a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r.numpy(), ref_r, rtol=1e-9, atol=1e-12)
    assert torch.allclose(r.sum(dim=2), torch.ones(()).double())


def test_m_step_is_the_weighted_mean_and_variance():
    votes, acts, beta_u, beta_a = _case((1, 6, 3, 4))
    mu, a, r = em_routing(votes, acts, beta_u, beta_a, 2, cost_scale=1.0, return_assignments=True)
    w = r * acts.unsqueeze(2)  # (1, I, J): the weights of the last M-step
    s = w.sum(dim=1)
    mean = (w.unsqueeze(3) * votes).sum(dim=1) / (s.unsqueeze(2) + EPS)
    var = (w.unsqueeze(3) * (votes - mean.unsqueeze(1)) ** 2).sum(dim=1) / (s.unsqueeze(2) + EPS)
    torch.testing.assert_close(mu, mean)
    cost = s * (beta_u.unsqueeze(1) + 0.5 * torch.log(var + EPS)).sum(dim=2)
    torch.testing.assert_close(a, torch.sigmoid(inverse_temperatures(2)[1] * (beta_a - cost)))


def test_e_step_is_the_normalised_activation_times_likelihood():
    votes, acts, beta_u, beta_a = _case((1, 5, 3, 4), seed=3)
    mu1, a1 = em_routing(votes, acts, beta_u, beta_a, 1, cost_scale=1.0)  # the first M-step
    w = acts.unsqueeze(2) / 3
    s = w.sum(dim=1)
    var1 = (w.unsqueeze(3) * (votes - mu1.unsqueeze(1)) ** 2).sum(dim=1) / (s.unsqueeze(2) + EPS)
    normal = torch.distributions.Normal(mu1.unsqueeze(1), (var1 + EPS).sqrt().unsqueeze(1))
    p = (a1.unsqueeze(1) + EPS) * normal.log_prob(votes).sum(dim=3).exp()  # (1, I, J)
    _, _, r = em_routing(votes, acts, beta_u, beta_a, 2, cost_scale=1.0, return_assignments=True)
    torch.testing.assert_close(r, p / p.sum(dim=2, keepdim=True))


def test_gradcheck_float64():
    votes, acts, beta_u, beta_a = _case((1, 3, 2, 4, 2), seed=1)
    tensors = [t.requires_grad_(True) for t in (votes, acts, beta_u, beta_a)]

    def fn(v, a, bu, ba):
        return em_routing(v, a, bu, ba, 3, final_lambda=1.0, cost_scale=1.0)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("acts_value", [0.0, 1.0])
def test_degenerate_inputs_are_finite(acts_value):
    votes = torch.zeros(2, 4, 3, 16, 2, requires_grad=True)
    acts = torch.full((2, 4, 2), acts_value, requires_grad=True)
    beta_u, beta_a = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    poses, a = em_routing(votes, acts, beta_u, beta_a)
    (poses.sum() + a.sum()).backward()
    for t in (poses, a, votes.grad, acts.grad, beta_u.grad, beta_a.grad):
        assert torch.isfinite(t).all()


def test_half_precision_is_routed_in_float32():
    votes, acts, beta_u, beta_a = _case((1, 3, 2, 4))
    poses, a = em_routing(votes.bfloat16(), acts.bfloat16(), beta_u, beta_a)
    assert poses.dtype == a.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"votes": torch.zeros(2, 3, 4)}, "votes must have shape"),
        ({"activations": torch.zeros(1, 2)}, "activations must have shape"),
        ({"beta_u": torch.zeros(3)}, "beta_u must have shape"),
        ({"beta_a": torch.zeros(1, 2)}, "beta_a must have shape"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"final_lambda": 0.0}, "final_lambda must be > 0"),
        ({"eps": -1.0}, "eps must be > 0"),
        ({"cost_scale": 0.0}, "cost_scale must be > 0 or None"),
    ],
)
def test_em_routing_errors(kwargs, message):
    args = {"votes": torch.zeros(1, 3, 2, 16), "activations": torch.zeros(1, 3),
            "beta_u": torch.zeros(2), "beta_a": torch.zeros(2)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        em_routing(**args)


# ----------------------------------------------------------------------------- layers
def _conv_votes_loop(layer, poses, acts):
    """Votes (B, K*I, J, 16, *S') and activations by explicit window loops (no unfold)."""
    nd = layer.spatial_dims
    pads = [p for p in reversed(layer.padding) for _ in range(2)]
    poses = torch.nn.functional.pad(poses, pads)
    acts = torch.nn.functional.pad(acts, pads)
    size = [s - 2 * p for s, p in zip(poses.shape[3:], layer.padding, strict=True)]
    out_size = layer.output_size(size)
    b, i, j = poses.shape[0], layer.in_capsules, layer.out_capsules
    w = layer.weight.detach()  # (K*I, J, 4, 4)
    votes = poses.new_zeros(b, layer.window * i, j, 16, *out_size)
    a_win = acts.new_zeros(b, layer.window * i, *out_size)
    for pos in itertools.product(*[range(s) for s in out_size]):
        for k, off in enumerate(itertools.product(*[range(s) for s in layer.kernel_size])):
            src = tuple(p * st + o for p, st, o in zip(pos, layer.stride, off, strict=True))
            for c in range(i):
                m = poses[(slice(None), c, slice(None), *src)].reshape(b, 4, 4)
                votes[(slice(None), k * i + c, slice(None), slice(None), *pos)] = (
                    (m.unsqueeze(1) @ w[k * i + c]).reshape(b, j, 16))
                a_win[(slice(None), k * i + c, *pos)] = acts[(slice(None), c, *src)]
    assert nd == len(out_size)
    return votes, a_win


@pytest.mark.parametrize(
    ("spatial_dims", "size", "kernel", "stride", "padding"),
    [(2, (5, 7), 3, 2, 1), (2, (4, 3), (3, 2), 1, 0), (3, (3, 4, 5), 3, (1, 2, 2), 1),
     (1, (6,), 3, 1, 0)],
)
def test_conv_matrix_capsule_equals_window_loop(spatial_dims, size, kernel, stride, padding):
    torch.manual_seed(0)
    layer = ConvMatrixCapsule(spatial_dims, 2, 3, kernel, stride, padding).double()
    poses = torch.randn(2, 2, 16, *size, dtype=torch.float64)
    acts = torch.rand(2, 2, *size, dtype=torch.float64)
    out_p, out_a = layer(poses, acts)
    votes, a_win = _conv_votes_loop(layer, poses, acts)
    ref_p, ref_a = em_routing(votes, a_win, layer.beta_u.detach(), layer.beta_a.detach(), 3)
    assert out_p.shape == (2, 3, 16, *layer.output_size(size))
    torch.testing.assert_close(out_p, ref_p)
    torch.testing.assert_close(out_a, ref_a)


def test_class_capsule_coordinates_follow_ibm():
    layer = ClassMatrixCapsule(2, 1, 2)
    coords = layer.coordinates((2, 3), torch.zeros(())).view(2, 3, 16)
    torch.testing.assert_close(coords[0, :, 3], torch.tensor([1 / 6, 3 / 6, 5 / 6]))  # column
    torch.testing.assert_close(coords[:, 0, 7], torch.tensor([1 / 4, 3 / 4]))  # row
    assert coords[..., [i for i in range(16) if i not in (3, 7)]].abs().sum() == 0
    coords3 = ClassMatrixCapsule(3, 1, 2).coordinates((2, 1, 1), torch.zeros(())).view(2, 16)
    torch.testing.assert_close(coords3[:, 11], torch.tensor([1 / 4, 3 / 4]))


@pytest.mark.parametrize("coordinate_addition", [True, False])
def test_class_matrix_capsule_equals_explicit_votes(coordinate_addition):
    torch.manual_seed(1)
    layer = ClassMatrixCapsule(2, 2, 3, coordinate_addition=coordinate_addition).double()
    poses = torch.randn(2, 2, 16, 3, 2, dtype=torch.float64)
    acts = torch.rand(2, 2, 3, 2, dtype=torch.float64)
    out_p, out_a = layer(poses, acts)
    w = layer.weight.detach()
    coords = layer.coordinates((3, 2), poses)
    votes = torch.zeros(2, 6 * 2, 3, 16, dtype=torch.float64)
    a_in = torch.zeros(2, 12, dtype=torch.float64)
    for pos, (r, c) in enumerate(itertools.product(range(3), range(2))):
        for i in range(2):
            m = poses[:, i, :, r, c].reshape(2, 1, 4, 4)
            shift = coords[pos] if coordinate_addition else 0
            votes[:, pos * 2 + i] = (m @ w[i]).reshape(2, 3, 16) + shift
            a_in[:, pos * 2 + i] = acts[:, i, r, c]
    ref_p, ref_a = em_routing(votes, a_in, layer.beta_u.detach(), layer.beta_a.detach(), 3)
    torch.testing.assert_close(out_p, ref_p)
    torch.testing.assert_close(out_a, ref_a)


def test_primary_matrix_capsule_shapes_and_range():
    layer = PrimaryMatrixCapsule(3, 2, 4, kernel_size=3, stride=2, padding=1)
    poses, acts = layer(torch.randn(1, 2, 5, 6, 7))
    assert poses.shape == (1, 4, 16, 3, 3, 4) and acts.shape == (1, 4, 3, 3, 4)
    assert ((acts > 0) & (acts < 1)).all()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ConvMatrixCapsule(4, 2, 3), "spatial_dims must be 1, 2 or 3"),
        (lambda: ConvMatrixCapsule(2, 0, 3), "in_capsules must be >= 1"),
        (lambda: ConvMatrixCapsule(2, 2, 3, routing_iterations=0), "routing_iterations must be >= 1"),
        (lambda: ConvMatrixCapsule(2, 2, 3, final_lambda=0), "final_lambda must be a number > 0"),
        (lambda: ConvMatrixCapsule(2, 2, 3, cost_scale="paper"), "cost_scale must be one of"),
        (lambda: ClassMatrixCapsule(2, 2, 3, coordinate_addition=1),
         "coordinate_addition must be a bool"),
        (lambda: PrimaryMatrixCapsule(2, 1, 2, kernel_size=(1, 1, 1)), "kernel_size must be an int"),
    ],
)
def test_constructor_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_forward_shape_errors():
    layer = ConvMatrixCapsule(2, 2, 3, kernel_size=3)
    with pytest.raises(ValueError, match="poses must be"):
        layer(torch.zeros(1, 2, 9, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="activations must be"):
        layer(torch.zeros(1, 2, 16, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        layer(torch.zeros(1, 2, 16, 2, 4), torch.zeros(1, 2, 2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_row_permutation_equals_permute_and_inverts_in_backward(dtype):
    from capsmed.layers.matrix import _PermuteRows

    x = torch.randn(3, 5, 2, 4).to(dtype).requires_grad_(True)
    perm = (1, 2, 0, 3)
    y = _PermuteRows.apply(x, perm)
    assert y.is_contiguous() and torch.equal(y, x.detach().permute(perm))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g.permute(2, 0, 1, 3))


def test_float32_layer_matches_float64():
    torch.manual_seed(2)
    layer = ConvMatrixCapsule(2, 3, 2, kernel_size=3, stride=1, padding=1)
    poses, acts = torch.randn(2, 3, 16, 5, 6) * 0.5, torch.rand(2, 3, 5, 6)
    out32 = layer(poses, acts)
    out64 = layer.double()(poses.double(), acts.double())
    for a, b in zip(out32, out64, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
