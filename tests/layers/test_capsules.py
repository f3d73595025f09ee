import pytest
import torch
import torch.nn.functional as F

from capsmed.layers import (
    ConvCapsule,
    ConvTransposeCapsule,
    DenseCapsule,
    PrimaryCapsule,
    attention_routing,
    dynamic_routing,
    squash,
)

SIZES = {2: (17, 19), 3: (9, 11, 13)}


def _conv_out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("squash_mode", [True, False, "efficient"])
def test_primary_capsule_shape_and_lengths(spatial_dims, squash_mode):
    size = SIZES[spatial_dims]
    layer = PrimaryCapsule(spatial_dims, 2, capsules=4, capsule_dim=3, kernel_size=3, stride=2,
                           squash=squash_mode)
    y = layer(torch.randn(2, 2, *size))
    assert y.shape == (2, 4, 3, *[_conv_out(s, 3, 2, 0) for s in size])
    if squash_mode is not False:
        assert torch.all(y.norm(dim=2) < 1)


def test_primary_capsule_groups_channels_into_capsules():
    layer = PrimaryCapsule(2, 3, capsules=4, capsule_dim=5, kernel_size=3, stride=1, squash=False)
    x = torch.randn(2, 3, 8, 9)
    y = layer(x)
    raw = layer.conv(x)
    torch.testing.assert_close(y[:, 2, 4], raw[:, 2 * 5 + 4])
    layer_sq = PrimaryCapsule(2, 3, capsules=4, capsule_dim=5, kernel_size=3, stride=1)
    layer_sq.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer_sq(x), squash(y, dim=2))


@pytest.mark.parametrize("routing", ["dynamic", "attention"])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_capsule_shape(routing, bias):
    layer = DenseCapsule(7, 4, 3, 5, routing=routing, bias=bias)
    out, c = layer(torch.randn(2, 7, 4), return_coupling=True)
    assert out.shape == (2, 3, 5) and c.shape == (2, 7, 3)
    assert torch.all(out.norm(dim=2) < 1)
    assert layer(torch.randn(1, 7, 4)).shape == (1, 3, 5)


def test_dense_capsule_votes_and_routing_match_definition():
    torch.manual_seed(0)
    layer = DenseCapsule(6, 4, 3, 5, routing_iterations=3, bias=True, agreement="cosine")
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(2, 6, 4)
    votes = torch.zeros(2, 6, 3, 5)
    for i in range(6):
        for j in range(3):
            votes[:, i, j] = x[:, i] @ layer.weight[i, j].T
    torch.testing.assert_close(layer.votes(x), votes)
    torch.testing.assert_close(
        layer(x), dynamic_routing(votes, 3, agreement="cosine", bias=layer.bias)
    )
    att = DenseCapsule(6, 4, 3, 5, routing="attention", bias=True)
    with torch.no_grad():
        att.bias.normal_()
    torch.testing.assert_close(att(x), attention_routing(att.votes(x), att.bias))
    assert att.bias.shape == (6, 3) and layer.bias.shape == (3, 5)


def _spatial_out(size, transposed, k, s, p, op=0):
    if transposed:
        return [(n - 1) * s - 2 * p + k + op for n in size]
    return [_conv_out(n, k, s, p) for n in size]


CONV_CASES = [
    # cls, kernel, stride, padding, extra kwargs
    (ConvCapsule, 3, 1, 1, {}),
    (ConvCapsule, 3, 2, 1, {}),
    (ConvCapsule, 5, 2, 0, {}),
    (ConvTransposeCapsule, 2, 2, 0, {}),
    (ConvTransposeCapsule, 3, 2, 1, {"output_padding": 1}),
]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0].__name__}-k{c[1]}s{c[2]}p{c[3]}")
@pytest.mark.parametrize("shared_votes", [True, False])
@pytest.mark.parametrize("agreement", ["dot", "cosine"])
def test_conv_capsule_shapes_odd_sizes(spatial_dims, case, shared_votes, agreement):
    cls, k, s, p, extra = case
    size = SIZES[spatial_dims]
    layer = cls(spatial_dims, 3, 4, 2, 5, kernel_size=k, stride=s, padding=p, routing_iterations=3,
                agreement=agreement, shared_votes=shared_votes, **extra)
    out, c = layer(torch.randn(2, 3, 4, *size), return_coupling=True)
    spatial = _spatial_out(size, cls is ConvTransposeCapsule, k, s, p, extra.get("output_padding", 0))
    assert out.shape == (2, 2, 5, *spatial)
    assert c.shape == (2, 3, 2, *spatial)
    assert torch.all(out.norm(dim=2) < 1)


@pytest.mark.parametrize("cls", [ConvCapsule, ConvTransposeCapsule])
def test_conv_capsule_one_dim(cls):
    layer = cls(1, 2, 3, 4, 5, routing_iterations=2)
    out = layer(torch.randn(2, 2, 3, 11))
    assert out.shape[:3] == (2, 4, 5) and out.dim() == 4


def test_shared_votes_apply_one_kernel_to_every_input_type():
    torch.manual_seed(1)
    layer = ConvCapsule(2, 3, 4, 2, 5, kernel_size=3, stride=2, padding=1, routing_iterations=3)
    x = torch.randn(2, 3, 4, 9, 7)
    votes = layer.votes(x)
    assert votes.shape == (2, 3, 2, 5, 5, 4)
    for i in range(3):
        expected = F.conv2d(x[:, i], layer.conv.weight, stride=2, padding=1).view(2, 2, 5, 5, 4)
        torch.testing.assert_close(votes[:, i], expected)
    torch.testing.assert_close(layer(x), dynamic_routing(votes, 3, bias=layer.bias))


def test_grouped_votes_use_one_kernel_per_input_type():
    torch.manual_seed(2)
    layer = ConvTransposeCapsule(2, 3, 4, 2, 5, kernel_size=2, stride=2, shared_votes=False,
                                 agreement="cosine")
    x = torch.randn(2, 3, 4, 5, 6)
    votes = layer.votes(x)
    w = layer.conv.weight  # (I * Din, J * Dout, k, k) for a grouped transposed convolution
    for i in range(3):
        wi = w[i * 4 : (i + 1) * 4]
        expected = F.conv_transpose2d(x[:, i], wi, stride=2).view(2, 2, 5, 10, 12)
        torch.testing.assert_close(votes[:, i], expected)
    torch.testing.assert_close(
        layer(x), dynamic_routing(votes, 3, agreement="cosine", bias=layer.bias)
    )


def test_one_iteration_and_no_bias():
    layer = ConvCapsule(2, 3, 4, 2, 5, routing_iterations=1, bias=False)
    assert layer.bias is None
    x = torch.randn(1, 3, 4, 6, 6)
    s = layer.votes(x).mean(dim=1) * 3 / 2  # sum over I divided by J
    torch.testing.assert_close(layer(x), squash(s, dim=2))


def test_layers_backward_3d():
    layer = ConvCapsule(3, 2, 3, 2, 4, stride=2, agreement="cosine")
    up = ConvTransposeCapsule(3, 2, 4, 2, 3)
    x = torch.randn(1, 2, 3, 9, 11, 13, requires_grad=True)
    y = up(layer(x))
    assert y.shape == (1, 2, 3, 10, 12, 14)
    y.norm(dim=2).sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in (*layer.parameters(), *up.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def _double(module):
    return module.double()


def test_gradcheck_primary_and_dense():
    torch.manual_seed(3)
    prim = _double(PrimaryCapsule(2, 2, capsules=2, capsule_dim=3, kernel_size=3, stride=2))
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(prim, (x,))
    for routing in ("dynamic", "attention"):
        dense = _double(DenseCapsule(4, 3, 2, 3, routing=routing, bias=True))
        with torch.no_grad():
            dense.weight.normal_()
        xd = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
        params = (dense.weight, dense.bias)

        def fn(inp, w, b, dense=dense):
            return torch.func.functional_call(dense, {"weight": w, "bias": b}, (inp,))

        assert torch.autograd.gradcheck(fn, (xd, *params))


@pytest.mark.parametrize("cls", [ConvCapsule, ConvTransposeCapsule])
@pytest.mark.parametrize("agreement", ["dot", "cosine"])
def test_gradcheck_conv_capsules(cls, agreement):
    torch.manual_seed(4)
    layer = _double(cls(2, 2, 2, 2, 3, kernel_size=3, stride=2, padding=1,
                        agreement=agreement, shared_votes=agreement == "dot"))
    x = torch.randn(1, 2, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def fn(inp, w, b):
        return torch.func.functional_call(layer, {"conv.weight": w, "bias": b}, (inp,))

    assert torch.autograd.gradcheck(fn, (x, layer.conv.weight, layer.bias), fast_mode=True)


def test_gradcheck_conv_capsule_3d():
    torch.manual_seed(5)
    layer = _double(ConvCapsule(3, 2, 2, 2, 2, kernel_size=2, stride=1, padding=0,
                                agreement="cosine"))
    x = torch.randn(1, 2, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (DenseCapsule(4, 3, 2, 5), (2, 4, 2)),
        (DenseCapsule(4, 3, 2, 5), (2, 4, 3, 1)),
        (ConvCapsule(2, 3, 4, 2, 5), (2, 3, 5, 8, 8)),
        (ConvCapsule(2, 3, 4, 2, 5), (2, 3, 4, 8, 8, 8)),
        (ConvTransposeCapsule(3, 3, 4, 2, 5), (2, 2, 4, 8, 8, 8)),
    ],
)
def test_wrong_input_shape_is_rejected(layer, shape):
    with pytest.raises(ValueError, match=r"input must be \(B, capsules, dim"):
        layer(torch.randn(*shape))
