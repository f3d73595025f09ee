"""GPU check: a few mixed-precision (bf16) training steps per model, throughput in cases/s.

Run on a CUDA machine:  python benchmarks/gpu_check.py --out gpu_check.json
Nothing in the test suite or CI needs a GPU; this script is the prepared check for issue 5.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from capsmed.losses import build_loss
from capsmed.models import get_model

CASES = [
    # name, spatial_dims, in, out, input size, batch, task
    ("capsnet", 2, 1, 2, (28, 28), 64, "classification"),
    ("efficient_capsnet", 2, 1, 2, (28, 28), 64, "classification"),
    ("seed_cnn", 2, 1, 2, (28, 28), 64, "classification"),
    ("capsnet", 3, 1, 2, (28, 28, 28), 16, "classification"),
    ("seed_cnn", 3, 1, 2, (28, 28, 28), 16, "classification"),
    ("segcaps", 3, 1, 3, (32, 32, 32), 4, "segmentation"),
    ("ucaps", 3, 1, 3, (48, 64, 48), 4, "segmentation"),
    ("unet", 3, 1, 3, (48, 64, 48), 4, "segmentation"),
]


def run_case(name, dims, cin, cout, size, batch, task, steps, device):
    torch.manual_seed(0)
    kwargs = {"image_size": size[0]} if task == "classification" and name != "densenet" else {}
    model = get_model(name, dims, cin, cout, **kwargs).to(device)
    loss_fn = build_loss(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, cin, *size, device=device)
    if task == "classification":
        y = torch.randint(0, cout, (batch,), device=device)
    else:
        y = torch.randint(0, cout, (batch, 1, *size), device=device)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_train(x, y)
            loss = loss_fn(out, y, x)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(3):
        losses.append(step())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"model": name, "spatial_dims": dims, "input": list(size), "batch": batch,
            "params": sum(p.numel() for p in model.parameters()),
            "cases_per_s": round(batch * steps / dt, 1), "ms_per_step": round(1000 * dt / steps, 2),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "finite": all(map(lambda v: v == v, losses))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    device = torch.device("cuda")
    rows = []
    for case in CASES:
        try:
            rows.append(run_case(*case, args.steps, device))
        except Exception as exc:  # report and go on: one failing model must not hide the rest
            rows.append({"model": case[0], "spatial_dims": case[1], "error": repr(exc)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main()
