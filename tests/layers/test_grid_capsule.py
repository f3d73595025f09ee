"""GridCapsule: per-type votes shared across positions, coordinate addition, dynamic routing."""

import pytest
import torch

from capsmed.layers import DenseCapsule, GridCapsule, dynamic_routing

GRIDS = {1: (5,), 2: (3, 5), 3: (3, 2, 5)}


def test_coordinates_are_scaled_position_centres():
    layer = GridCapsule(2, 2, 3, 2, 4)
    coords = layer.coordinates((2, 3), torch.zeros(1))
    # C order: position g = row * 3 + col; rows at 1/4, 3/4, cols at 1/6, 1/2, 5/6 (Hinton et al.)
    expected = torch.tensor([[r, c, 0.0, 0.0] for r in (0.25, 0.75) for c in (1 / 6, 0.5, 5 / 6)])
    torch.testing.assert_close(coords, expected)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("coordinate_addition", [True, False])
def test_votes_match_definition_odd_grids(spatial_dims, coordinate_addition):
    torch.manual_seed(0)
    types, d_in, j, d_out = 3, 4, 2, 5
    grid = GRIDS[spatial_dims]
    layer = GridCapsule(spatial_dims, types, d_in, j, d_out,
                        coordinate_addition=coordinate_addition)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(2, types, d_in, *grid)
    flat = x.reshape(2, types, d_in, -1)
    coords = layer.coordinates(grid, x)
    positions = flat.shape[-1]
    expected = torch.zeros(2, types * positions, j, d_out)
    for g in range(positions):
        for t in range(types):
            for k in range(j):
                vote = flat[:, t, :, g] @ layer.weight[t, k].T
                if coordinate_addition:
                    vote = vote + coords[g]
                expected[:, t * positions + g, k] = vote
    torch.testing.assert_close(layer.votes(x), expected)
    out, coupling = layer(x, return_coupling=True)
    ref, ref_c = dynamic_routing(expected, 3, return_coupling=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(coupling, ref_c)
    assert out.shape == (2, j, d_out) and coupling.shape == (2, types * positions, j)


def test_equals_a_dense_capsule_with_tiled_weights_without_coordinates():
    torch.manual_seed(1)
    grid, types = (2, 3), 2
    layer = GridCapsule(2, types, 4, 3, 5, coordinate_addition=False, agreement="cosine")
    dense = DenseCapsule(6 * types, 4, 3, 5, agreement="cosine")
    with torch.no_grad():
        layer.weight.normal_()
        dense.weight.copy_(layer.weight.repeat_interleave(6, dim=0))  # n = t * G + g -> W_t
    x = torch.randn(2, types, 4, *grid)
    flat = x.reshape(2, types, 4, -1).transpose(2, 3).reshape(2, -1, 4)
    torch.testing.assert_close(layer(x), dense(flat))


def test_parameters_do_not_grow_with_the_grid():
    layer = GridCapsule(3, 16, 8, 2, 16)
    assert sum(p.numel() for p in layer.parameters()) == 16 * 2 * 8 * 16
    assert layer(torch.randn(1, 16, 8, 4, 4, 4)).shape == (1, 2, 16)
    assert layer(torch.randn(1, 16, 8, 3, 5, 2)).shape == (1, 2, 16)


def test_gradcheck_float64():
    torch.manual_seed(2)
    layer = GridCapsule(2, 2, 3, 2, 3).double()
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(2, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(inp, w):
        return torch.func.functional_call(layer, {"weight": w}, (inp,))

    assert torch.autograd.gradcheck(fn, (x, layer.weight))


def test_zero_input_gives_finite_outputs_and_gradients():
    layer = GridCapsule(2, 2, 3, 2, 4, coordinate_addition=False)
    x = torch.zeros(1, 2, 3, 3, 3, requires_grad=True)
    out = layer(x)
    out.norm(dim=-1).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"spatial_dims": 4}, r"spatial_dims must be 1, 2 or 3, got 4"),
        ({"in_capsules": 0}, r"in_capsules must be >= 1, got 0"),
        ({"in_dim": 0}, r"in_dim must be >= 1, got 0"),
        ({"out_capsules": 0}, r"out_capsules must be >= 1, got 0"),
        ({"out_dim": 0}, r"out_dim must be >= 1, got 0"),
        ({"routing_iterations": 0}, r"routing_iterations must be >= 1, got 0"),
        ({"agreement": "l1"}, r"agreement must be one of \('dot', 'cosine'\), got 'l1'"),
        ({"coordinate_addition": 1}, r"coordinate_addition must be a bool, got 1"),
        ({"spatial_dims": 3, "out_dim": 2},
         r"coordinate addition needs out_dim >= spatial_dims \(3\); got 2"),
    ],
)
def test_argument_errors(override, message):
    args = {"spatial_dims": 2, "in_capsules": 2, "in_dim": 3, "out_capsules": 2, "out_dim": 4}
    with pytest.raises(ValueError, match=message):
        GridCapsule(**{**args, **override})


@pytest.mark.parametrize("shape", [(2, 3, 3, 4, 4), (2, 2, 4, 4, 4), (2, 2, 3, 4, 4, 4)])
def test_wrong_input_shape_is_rejected(shape):
    with pytest.raises(ValueError, match=r"input must be \(B, capsules, dim, \*spatial\)"):
        GridCapsule(2, 2, 3, 2, 4)(torch.randn(*shape))
