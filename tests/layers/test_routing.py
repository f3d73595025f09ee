"""Routing against tiny independent loop implementations (plain python/numpy, one position at a time)."""

import itertools
import math

import numpy as np
import pytest
import torch

from capsmed.layers import attention_routing, dynamic_routing


def _np_squash(v):
    # the paper's squash with the library's documented eps inside the root, so that routing can be
    # compared tightly (test_squash checks squash itself against the exact formula)
    n2 = float(np.dot(v, v))
    return (n2 / (1 + n2)) * v / math.sqrt(n2 + 1e-8)


def _np_cos(a, b, eps=1e-8):
    return float(np.dot(a, b)) / (max(math.sqrt(float(np.dot(a, a))), eps)
                                  * max(math.sqrt(float(np.dot(b, b))), eps))


def _route_one(u, iterations, agreement="dot", bias=None, softmax_over="J"):
    """Procedure 1 for one sample at one position. u: (I, J, D). Returns v (J, D), c (I, J)."""
    n_in, n_out, dim = u.shape
    b = [[0.0] * n_out for _ in range(n_in)]
    c = [[0.0] * n_out for _ in range(n_in)]
    v = np.zeros((n_out, dim))
    for r in range(iterations):
        if softmax_over == "J":
            for i in range(n_in):
                e = [math.exp(b[i][j]) for j in range(n_out)]
                for j in range(n_out):
                    c[i][j] = e[j] / sum(e)
        else:  # the axis public ports get wrong: over the input capsules
            for j in range(n_out):
                e = [math.exp(b[i][j]) for i in range(n_in)]
                for i in range(n_in):
                    c[i][j] = e[i] / sum(e)
        s = np.zeros((n_out, dim))
        for j in range(n_out):
            for i in range(n_in):
                s[j] += c[i][j] * u[i, j]
            if bias is not None:
                s[j] += bias[j]
            v[j] = _np_squash(s[j])
        if r < iterations - 1:
            for i in range(n_in):
                for j in range(n_out):
                    if agreement == "dot":
                        b[i][j] += float(np.dot(u[i, j], v[j]))
                    else:
                        b[i][j] += _np_cos(u[i, j], s[j])
    return v, np.array(c)


def _route_np(votes, iterations, agreement="dot", bias=None, softmax_over="J"):
    """Loop over batch and positions. votes (B, I, J, D, *S) -> v (B, J, D, *S), c (B, I, J, *S)."""
    votes = votes.detach().numpy()
    n, n_in, n_out, dim = votes.shape[:4]
    spatial = votes.shape[4:]
    bias = None if bias is None else bias.detach().numpy()
    v = np.zeros((n, n_out, dim, *spatial))
    c = np.zeros((n, n_in, n_out, *spatial))
    for b in range(n):
        for pos in itertools.product(*[range(s) for s in spatial]):
            idx = (slice(None),) * 3 + pos
            vo, co = _route_one(votes[b][idx], iterations, agreement, bias, softmax_over)
            v[(b, slice(None), slice(None)) + pos] = vo
            c[(b, slice(None), slice(None)) + pos] = co
    return v, c


SHAPES = {"dense": (2, 3, 4, 5), "spatial2d": (2, 3, 4, 5, 2, 3), "spatial1d": (1, 2, 3, 2, 4)}


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("agreement", ["dot", "cosine"])
def test_matches_loop_reference(layout, iterations, agreement):
    torch.manual_seed(iterations)
    votes = torch.randn(*SHAPES[layout], dtype=torch.float64)
    v, c = dynamic_routing(votes, iterations, agreement=agreement, return_coupling=True)
    v_ref, c_ref = _route_np(votes, iterations, agreement)
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layout", ["dense", "spatial2d"])
@pytest.mark.parametrize("agreement", ["dot", "cosine"])
def test_bias_matches_loop_reference(layout, agreement):
    torch.manual_seed(3)
    votes = torch.randn(*SHAPES[layout], dtype=torch.float64)
    bias = torch.randn(4, 5, dtype=torch.float64)
    v = dynamic_routing(votes, 3, agreement=agreement, bias=bias)
    v_ref, _ = _route_np(votes, 3, agreement, bias=bias)
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=1e-9, atol=1e-12)


def test_float32_matches_float64():
    torch.manual_seed(4)
    votes = torch.randn(2, 6, 5, 8, 3, 3, dtype=torch.float64)
    for agreement in ("dot", "cosine"):
        v64 = dynamic_routing(votes, 3, agreement=agreement)
        v32 = dynamic_routing(votes.float(), 3, agreement=agreement)
        torch.testing.assert_close(v32.double(), v64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["dense", "spatial2d"])
def test_coupling_sums_to_one_over_output_capsules(layout):
    torch.manual_seed(5)
    votes = torch.randn(*SHAPES[layout]) * 3
    for iterations in (1, 2, 3):
        _, c = dynamic_routing(votes, iterations, return_coupling=True)
        assert c.shape == votes.shape[:3] + votes.shape[4:]
        torch.testing.assert_close(c.sum(dim=2), torch.ones_like(c.sum(dim=2)))
        assert torch.all(c >= 0)


@pytest.mark.parametrize("layout", ["dense", "spatial2d"])
def test_softmax_axis_is_output_capsules_not_inputs(layout):
    # I=3 != J=4 and large votes: softmax over I gives different couplings and outputs
    torch.manual_seed(6)
    votes = torch.randn(*SHAPES[layout], dtype=torch.float64) * 2
    v, c = dynamic_routing(votes, 3, return_coupling=True)
    v_wrong, c_wrong = _route_np(votes, 3, softmax_over="I")
    v_right, c_right = _route_np(votes, 3, softmax_over="J")
    np.testing.assert_allclose(v.numpy(), v_right, rtol=1e-9, atol=1e-12)
    assert not np.allclose(v.numpy(), v_wrong, atol=1e-3)
    assert not np.allclose(c.sum(dim=1).numpy(), 1.0)  # would hold for the wrong axis
    np.testing.assert_allclose(c_wrong.sum(axis=1), 1.0)


def test_one_iteration_is_uniform_coupling():
    torch.manual_seed(7)
    votes = torch.randn(2, 3, 4, 5, 6)
    v, c = dynamic_routing(votes, 1, return_coupling=True)
    torch.testing.assert_close(c, torch.full_like(c, 0.25))
    s = votes.sum(dim=1) / 4
    n2 = (s * s).sum(dim=2, keepdim=True)
    torch.testing.assert_close(v, n2 / (1 + n2) * s / n2.sqrt())


def test_cosine_agreement_is_scale_invariant_and_dot_is_not():
    # cosine couplings depend only on directions: scaling every vote leaves them unchanged
    torch.manual_seed(8)
    votes = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    _, c_cos = dynamic_routing(votes, 3, agreement="cosine", return_coupling=True)
    _, c_cos_big = dynamic_routing(votes * 100, 3, agreement="cosine", return_coupling=True)
    torch.testing.assert_close(c_cos, c_cos_big)
    _, c_dot = dynamic_routing(votes, 3, agreement="dot", return_coupling=True)
    _, c_dot_big = dynamic_routing(votes * 100, 3, agreement="dot", return_coupling=True)
    assert not torch.allclose(c_dot, c_dot_big, atol=1e-3)
    # each cosine update is in [-1, 1], so after T iterations logit gaps are at most 2 (T - 1)
    _, c3 = dynamic_routing(votes * 100, 3, agreement="cosine", return_coupling=True)
    ratio = c3.max(dim=2).values / c3.min(dim=2).values
    assert torch.all(ratio <= math.exp(4) + 1e-6)


def test_dot_couplings_move_at_most_by_the_vote_length():
    """Why dense class capsules keep uniform couplings under dot agreement (BENCHMARKS.md).

    An update adds ``u . v`` with ``|v| < 1``, so after ``T`` iterations two logits of one input
    differ by less than ``2 (T - 1) |u|``: with many short votes the couplings cannot move, however
    clearly the votes agree. Cosine agreement on the same votes moves them.
    """
    torch.manual_seed(9)
    n_in, length = 400, 0.02
    direction = torch.randn(1, 1, 2, 8, dtype=torch.float64)
    votes = direction.expand(2, n_in, 2, 8).clone()
    votes[:, n_in // 2:, 1] *= -1  # half the inputs disagree about output 1, all agree on output 0
    votes += 0.1 * torch.randn_like(votes)
    votes = length * votes / votes.norm(dim=-1, keepdim=True)
    _, c_dot = dynamic_routing(votes, 3, agreement="dot", return_coupling=True)
    bound = 1 / (1 + math.exp(-2 * 2 * length))  # largest coupling for a logit gap of 4 |u|
    assert c_dot.max() <= bound
    _, c_cos = dynamic_routing(votes, 3, agreement="cosine", return_coupling=True)
    assert c_cos[:, n_in // 2:, 0].min() > 0.65 > bound  # the disagreeing inputs go to output 0


def test_cosine_prefers_votes_that_agree():
    # input 0 votes for output 0 along +x, input 1 along +x too; for output 1 they disagree
    votes = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    votes[0, 0, 0] = torch.tensor([1.0, 0.0])
    votes[0, 1, 0] = torch.tensor([2.0, 0.1])
    votes[0, 0, 1] = torch.tensor([1.0, 0.0])
    votes[0, 1, 1] = torch.tensor([-1.0, 0.0])
    _, c = dynamic_routing(votes, 3, agreement="cosine", return_coupling=True)
    assert c[0, 0, 0] > 0.5 and c[0, 1, 0] > 0.5


@pytest.mark.parametrize("agreement", ["dot", "cosine"])
def test_zero_votes_finite_gradient(agreement):
    votes = torch.zeros(2, 3, 4, 5, 2, requires_grad=True)
    out = dynamic_routing(votes, 3, agreement=agreement)
    (g,) = torch.autograd.grad(out.sum(), votes)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


GRADCHECK_SHAPES = {"dense": (2, 3, 4, 3), "spatial2d": (1, 3, 4, 3, 2, 2)}


@pytest.mark.parametrize("layout", list(GRADCHECK_SHAPES))
@pytest.mark.parametrize("agreement", ["dot", "cosine"])
@pytest.mark.parametrize("iterations", [2, 3])
def test_gradcheck_dynamic_routing(layout, agreement, iterations):
    torch.manual_seed(9)
    votes = torch.randn(*GRADCHECK_SHAPES[layout], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def fn(u, b):
        v, c = dynamic_routing(u, iterations, agreement=agreement, bias=b, return_coupling=True)
        return v, c

    # full Jacobian for 3 iterations; gradcheck's fast mode (random projections) for 2
    assert torch.autograd.gradcheck(fn, (votes, bias), fast_mode=iterations == 2)


@pytest.mark.parametrize("layout", ["dense", "spatial2d"])
def test_gradcheck_one_iteration_and_detached_logits(layout):
    torch.manual_seed(10)
    votes = torch.randn(*SHAPES[layout], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: dynamic_routing(u, 1), (votes,))

    # detach_logits: gradient of sum_i c_ij u_j|i with the couplings held fixed
    def fixed(u):
        with torch.no_grad():
            _, c = dynamic_routing(u, 3, return_coupling=True)
        s = (c.unsqueeze(3) * u).sum(dim=1)
        n2 = (s * s).sum(dim=2, keepdim=True)
        return n2 / (1 + n2) * s / torch.sqrt(n2 + 1e-8)

    w = torch.randn_like(dynamic_routing(votes, 3))
    for agreement in ("dot", "cosine"):
        out = dynamic_routing(votes, 3, agreement=agreement, detach_logits=True)
        torch.testing.assert_close(out, dynamic_routing(votes, 3, agreement=agreement))
        (g,) = torch.autograd.grad((out * w).sum(), votes)
        if agreement == "dot":
            (g_ref,) = torch.autograd.grad((fixed(votes) * w).sum(), votes)
            torch.testing.assert_close(g, g_ref)
        assert not torch.allclose(
            g, torch.autograd.grad((dynamic_routing(votes, 3, agreement=agreement) * w).sum(),
                                   votes)[0])


def test_gradient_matches_autograd_of_plain_loop():
    # a larger case than gradcheck can afford: compare with autograd through a plain torch loop
    torch.manual_seed(11)
    votes = torch.randn(2, 8, 6, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for agreement in ("dot", "cosine"):
        b = torch.zeros(2, 8, 6, 5, 7, dtype=torch.float64)
        for r in range(3):
            c = torch.softmax(b, dim=2)
            s = (c.unsqueeze(3) * votes).sum(dim=1) + bias.view(6, 4, 1, 1)
            n2 = (s * s).sum(dim=2, keepdim=True)
            v = n2 / (1 + n2) * s / n2.sqrt()
            if r < 2:
                if agreement == "dot":
                    b = b + (votes * v.unsqueeze(1)).sum(dim=3)
                else:
                    b = b + torch.nn.functional.cosine_similarity(votes, s.unsqueeze(1), dim=3)
        w = torch.randn_like(v)
        ref = torch.autograd.grad((v * w).sum(), (votes, bias))
        out = dynamic_routing(votes, 3, agreement=agreement, bias=bias)
        torch.testing.assert_close(out, v)
        got = torch.autograd.grad((out * w).sum(), (votes, bias))
        for a, e in zip(got, ref, strict=True):
            torch.testing.assert_close(a, e)


def _attention_one(u, prior):
    """Efficient-CapsNet routing with the full I x I self-attention matrix. u: (I, J, D)."""
    n_in, n_out, dim = u.shape
    sums = np.zeros((n_in, n_out))
    for j in range(n_out):
        a = np.zeros((n_in, n_in))
        for i in range(n_in):
            for k in range(n_in):
                a[i, k] = float(np.dot(u[i, j], u[k, j])) / math.sqrt(dim)
        sums[:, j] = a.sum(axis=1)
    c = np.zeros((n_in, n_out))
    for i in range(n_in):
        e = [math.exp(sums[i, j]) for j in range(n_out)]
        for j in range(n_out):
            c[i, j] = e[j] / sum(e)
    v = np.zeros((n_out, dim))
    for j in range(n_out):
        s = sum((c[i, j] + (prior[i, j] if prior is not None else 0.0)) * u[i, j]
                for i in range(n_in))
        n = math.sqrt(float(np.dot(s, s)))
        v[j] = (1 - 1 / math.exp(n)) * s / n
    return v, c


@pytest.mark.parametrize("with_prior", [False, True])
def test_attention_routing_matches_paper_formula(with_prior):
    torch.manual_seed(12)
    votes = torch.randn(3, 5, 4, 6, dtype=torch.float64) * 0.5
    prior = torch.randn(5, 4, dtype=torch.float64) * 0.1 if with_prior else None
    v, c = attention_routing(votes, prior, return_coupling=True)
    for b in range(3):
        v_ref, c_ref = _attention_one(votes[b].numpy(), None if prior is None else prior.numpy())
        np.testing.assert_allclose(v[b].numpy(), v_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(c[b].numpy(), c_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c.sum(dim=2), torch.ones(3, 5, dtype=torch.float64))


def test_attention_routing_spatial_is_per_position():
    torch.manual_seed(13)
    votes = torch.randn(2, 3, 4, 5, 3, 2, dtype=torch.float64)
    v = attention_routing(votes)
    assert v.shape == (2, 4, 5, 3, 2)
    torch.testing.assert_close(v[..., 1, 0], attention_routing(votes[..., 1, 0]))


def test_gradcheck_attention_routing():
    torch.manual_seed(14)
    votes = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attention_routing, (votes, prior))
    votes_sp = torch.randn(1, 3, 2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attention_routing, (votes_sp,))


def test_routing_errors():
    votes = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"iterations must be an integer >= 1, got 0"):
        dynamic_routing(votes, 0)
    with pytest.raises(ValueError, match=r"iterations must be an integer >= 1, got 2.0"):
        dynamic_routing(votes, 2.0)
    with pytest.raises(ValueError, match=r"agreement must be one of \('dot', 'cosine'\), got 'l2'"):
        dynamic_routing(votes, agreement="l2")
    with pytest.raises(ValueError, match=r"bias must have shape \(J, D\) = \(4, 5\), got \(5, 4\)"):
        dynamic_routing(votes, bias=torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"votes must have shape \(B, I, J, D, \*spatial\) with at"):
        dynamic_routing(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"votes must have non-empty B, I, J, D dims"):
        dynamic_routing(torch.randn(2, 0, 4, 5))
    with pytest.raises(ValueError, match=r"votes must be a torch.Tensor, got ndarray"):
        dynamic_routing(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"bias must have shape \(I, J\) = \(3, 4\), got \(4, 3\)"):
        attention_routing(votes, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"votes must have shape"):
        attention_routing(torch.randn(3, 4, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_routed_in_float32(dtype):
    torch.manual_seed(15)
    votes = torch.randn(2, 4, 3, 5, 3, 2)
    for agreement in ("dot", "cosine"):
        ref = dynamic_routing(votes, 3, agreement=agreement)
        half = dynamic_routing(votes.to(dtype), 3, agreement=agreement)
        assert half.dtype == dtype
        torch.testing.assert_close(half.float(), ref, atol=2e-2, rtol=2e-2)
    zeros = torch.zeros(2, 4, 3, 5, dtype=dtype, requires_grad=True)
    out = dynamic_routing(zeros, 3, agreement="cosine")
    (g,) = torch.autograd.grad(out.float().sum(), zeros)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    att = attention_routing(votes[..., 0, 0].to(dtype))
    assert att.dtype == dtype
    torch.testing.assert_close(att.float(), attention_routing(votes[..., 0, 0]), atol=2e-2,
                               rtol=2e-2)


@pytest.mark.parametrize("layout", ["dense", "spatial2d"])
def test_backward_twice_with_retain_graph(layout):
    torch.manual_seed(16)
    votes = torch.randn(*SHAPES[layout], requires_grad=True)
    out = dynamic_routing(votes, 3, agreement="cosine")
    (g1,) = torch.autograd.grad(out.sum(), votes, retain_graph=True)
    (g2,) = torch.autograd.grad(out.sum(), votes)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("spatial", [(), (3, 5)])
def test_routing_under_autocast_runs_in_float32_and_backpropagates(spatial):
    """Mixed precision (bf16 autocast) must not break the custom backward (seen on a GPU)."""
    votes = torch.randn(2, 6, 3, 4, *spatial, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dynamic_routing(votes.to(torch.bfloat16), iterations=3)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert votes.grad is not None and torch.isfinite(votes.grad).all()
    reference = dynamic_routing(votes.detach().to(torch.bfloat16).float(), iterations=3)
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=1e-2)


def test_coupling_statistics_exact_values():
    import math

    from capsmed.layers import coupling_statistics

    uniform = torch.full((2, 5, 4, 3, 3), 0.25)
    assert coupling_statistics(uniform, dim=2) == {"max_coupling": 0.25, "entropy": pytest.approx(1.0),
                                                   "outputs": 4}
    one_hot = torch.zeros(2, 5, 4)
    one_hot[..., 1] = 1.0
    assert coupling_statistics(one_hot, dim=2) == {"max_coupling": 1.0, "entropy": 0.0, "outputs": 4}
    row = torch.tensor([[[0.5, 0.25, 0.25]]])
    stats = coupling_statistics(row, dim=2)
    assert stats["max_coupling"] == 0.5
    assert stats["entropy"] == pytest.approx((0.5 * math.log(2) + 0.5 * math.log(4)) / math.log(3))
    assert coupling_statistics(torch.ones(1, 3, 1), dim=2)["entropy"] == 0.0


@pytest.mark.parametrize("agreement", ["dot", "cosine"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (2, 5, 3, 4, 3, 2)])
def test_traced_routing_is_the_unrolled_forward_with_the_same_values(agreement, shape):
    """While exporting, routing runs as plain operations (no Python autograd.Function in the
    graph, which TorchScript cannot save), unrolled at its iteration count, with equal values."""
    votes = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(shape[2], shape[3], dtype=torch.float64)

    def route(v):
        return dynamic_routing(v, 3, agreement=agreement, bias=bias)

    traced = torch.jit.trace(route, (votes,), check_trace=False)
    assert "PythonOp" not in str(traced.graph)
    assert str(traced.graph).count("aten::softmax") == 2  # iterations 2 and 3 (the first is uniform)
    torch.testing.assert_close(traced(votes), route(votes), rtol=0, atol=1e-12)
    plain = torch.jit.trace(lambda v: dynamic_routing(v, 3, agreement=agreement), (votes,),
                            check_trace=False)
    zero = plain(torch.zeros_like(votes))  # zero-length capsules: squash and cosine stay finite
    assert torch.isfinite(zero).all() and zero.abs().max() == 0
