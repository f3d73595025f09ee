"""Training steps under bf16 autocast (what `capsmed train` does on CUDA) work for capsule models."""

import pytest
import torch

from capsmed.losses import build_loss
from capsmed.models import get_model


@pytest.mark.parametrize("name,dims,size,classes", [
    ("capsnet", 2, 28, 2), ("efficient_capsnet", 2, 28, 2), ("segcaps", 2, 16, 3),
    ("ucaps", 2, 16, 3),
])
def test_bf16_autocast_training_step(name, dims, size, classes):
    torch.manual_seed(0)
    seg = name in ("segcaps", "ucaps")
    model = get_model(name, dims, 1, classes, **({} if seg else {"image_size": size}))
    loss_fn = build_loss(model)
    x = torch.rand(2, 1, *[size] * dims)
    y = torch.randint(0, classes, (2, 1, *[size] * dims) if seg else (2,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model.forward_train(x, y), y, x)
    loss.backward()
    assert torch.isfinite(loss)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    assert sum(float(p.grad.abs().sum()) for p in params.values()) > 0
