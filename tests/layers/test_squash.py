import math

import numpy as np
import pytest
import torch

from capsmed.layers import squash, squash_efficient


def _np_squash(v: np.ndarray) -> np.ndarray:
    n2 = float(np.dot(v, v))
    if n2 == 0.0:
        return np.zeros_like(v)
    return (n2 / (1.0 + n2)) * v / math.sqrt(n2)


def _np_squash_efficient(v: np.ndarray) -> np.ndarray:
    n = math.sqrt(float(np.dot(v, v)))
    if n == 0.0:
        return np.zeros_like(v)
    return (1.0 - 1.0 / math.exp(n)) * v / n


@pytest.mark.parametrize("fn, ref", [(squash, _np_squash), (squash_efficient, _np_squash_efficient)])
def test_values_match_formula_along_any_dim(fn, ref):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64) * 2
    got = fn(x, dim=1).numpy()
    xn = x.numpy()
    for a in range(3):
        for c in range(5):
            np.testing.assert_allclose(got[a, :, c], ref(xn[a, :, c]), rtol=1e-7, atol=1e-12)
    # default dim is the last one
    got_last = fn(x).numpy()
    np.testing.assert_allclose(got_last[1, 2], ref(xn[1, 2]), rtol=1e-7, atol=1e-12)


def test_squash_known_values():
    # |x| = 5: 25/26 * x/5 -> length 25/26
    x = torch.tensor([3.0, 4.0], dtype=torch.float64)
    np.testing.assert_allclose(squash(x).numpy(), [25 / 26 * 0.6, 25 / 26 * 0.8], rtol=1e-9)
    # |x| = 1: length 1/2
    np.testing.assert_allclose(squash(torch.tensor([0.0, 1.0])).numpy(), [0.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(
        squash_efficient(torch.tensor([0.0, 2.0], dtype=torch.float64)).numpy(),
        [0.0, 1 - math.exp(-2)],
        rtol=1e-12,
    )


@pytest.mark.parametrize("fn", [squash, squash_efficient])
def test_lengths_in_unit_interval(fn):
    x = torch.randn(100, 8, dtype=torch.float64) * torch.logspace(-3, 1, 100).unsqueeze(1)
    lengths = fn(x).norm(dim=-1)
    assert torch.all(lengths >= 0) and torch.all(lengths < 1)
    # monotone in the input length
    xs = torch.ones(1, 8, dtype=torch.float64) * torch.logspace(-3, 1, 50).unsqueeze(1)
    ls = fn(xs).norm(dim=-1)
    assert torch.all(ls[1:] >= ls[:-1])


@pytest.mark.parametrize("fn", [squash, squash_efficient])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_value_and_gradient_at_zero(fn, dtype):
    x = torch.zeros(2, 3, 4, dtype=dtype, requires_grad=True)
    y = fn(x, dim=2)
    assert torch.equal(y, torch.zeros_like(y))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()
    # jacobian at zero: squash is flat (0), squash_efficient is the identity
    expected = 0.0 if fn is squash else 1.0
    torch.testing.assert_close(g, torch.full_like(g, expected))


@pytest.mark.parametrize("fn", [squash, squash_efficient])
def test_gradcheck(fn):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t, dim=1), (x,))
    x_small = (torch.randn(2, 4, dtype=torch.float64) * 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x_small,))


@pytest.mark.parametrize("fn", [squash, squash_efficient])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_zero_is_finite(fn, dtype):
    x = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    y = fn(x)
    assert y.dtype == dtype and torch.equal(y, torch.zeros_like(y))
    (g,) = torch.autograd.grad(y.float().sum(), x)
    assert torch.isfinite(g).all()
    v = torch.tensor([[3.0, 4.0]], dtype=dtype)
    torch.testing.assert_close(fn(v).float(), fn(v.float()), atol=1e-2, rtol=1e-2)
