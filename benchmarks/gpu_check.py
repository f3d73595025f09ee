"""GPU check: a few mixed-precision (bf16) training steps per model, throughput in cases/s.

Run on a CUDA machine:  python benchmarks/gpu_check.py --out gpu_check.json
Nothing in the test suite or CI needs a GPU; this script is the prepared check for issue 5.

``--ddp`` checks the NCCL path of data-parallel training (issue 25) instead, in under 2 minutes:

1. one DDP step (NCCL, float64, ``TrainStep`` as the training loop wraps it) on as many GPUs as
   the machine has, each on its share of the batch, against one step of one process on the whole
   batch (largest absolute weight difference; must be < 1e-6). With one GPU the group has one
   process (NCCL refuses two ranks on one GPU), which still runs NCCL's all-reduce;
2. with 2 GPUs or more, ``torchrun --standalone --nproc_per_node 2 -m capsmed train`` on a tiny
   synthetic 3D segmentation (``device: cuda``): the log must say ``backend nccl`` and
   ``train.json`` ``processes: 2``.

    python benchmarks/gpu_check.py --ddp --out gpu_ddp.json
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


def _nccl_step_worker(rank: int, world: int, port: int, out: str) -> None:
    """One float64 DDP step over NCCL on GPU ``rank``; rank 0 saves the weights."""
    import os

    from torch.nn.parallel import DistributedDataParallel

    from capsmed.train.distributed import TrainStep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    try:
        model, loss_fn, image, target = _ddp_case(torch.device("cuda", rank))
        share = image.shape[0] // world
        part = slice(rank * share, (rank + 1) * share)
        step = DistributedDataParallel(TrainStep(model, loss_fn), device_ids=[rank])
        opt = torch.optim.SGD(step.parameters(), lr=100.0)
        step(image[part], target[part]).backward()
        opt.step()
        if rank == 0:
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out)
    finally:
        torch.distributed.destroy_process_group()


def _ddp_case(device):
    """A float64 CapsNet without batch statistics, its loss, and a batch of 4."""
    torch.manual_seed(0)
    model = get_model("capsnet", 2, 1, 3, image_size=12, conv_channels=4, kernel_size=3,
                      primary_capsules=2, primary_dim=4, class_dim=4,
                      decoder_hidden=(8,)).double().to(device)
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(4, 1, 12, 12, generator=gen, dtype=torch.float64).to(device)
    return model, build_loss(model), image, torch.tensor([0, 2, 1, 2], device=device)


def ddp_check() -> dict:
    """The NCCL checks of ``--ddp`` (module docstring)."""
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch.multiprocessing as mp
    import yaml

    from capsmed.config import validate_config
    from capsmed.train.distributed import TrainStep

    world = min(2, torch.cuda.device_count())
    work = Path(tempfile.mkdtemp(prefix="capsmed-gpu-ddp-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    mp.start_processes(_nccl_step_worker, args=(world, port, str(work / "ddp.pt")), nprocs=world,
                       start_method="spawn")
    got = torch.load(work / "ddp.pt")
    model, loss_fn, image, target = _ddp_case(torch.device("cuda", 0))
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    TrainStep(model, loss_fn)(image, target).backward()
    opt.step()
    diff = max((got[k] - v.cpu()).abs().max().item() for k, v in model.state_dict().items())
    doc = {"gpus": torch.cuda.device_count(), "nccl_step_world": world,
           "nccl_step_max_abs_diff": diff, "nccl_step_ok": diff < 1e-6,
           "nccl_step_seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(doc), flush=True)
    if world < 2:
        doc["torchrun"] = "skipped: one GPU (NCCL needs one GPU per process)"
        return doc
    cfg = validate_config({
        "results": str(work / "results"), "seed": 0, "threads": 2, "device": "cuda",
        "datasets": {"ds": {
            "source": "synthetic", "task": "segmentation", "spatial_dims": 3,
            "labels": {"0": "background", "1": "a", "2": "b"},
            "synthetic": {"num_cases": 8, "size": [32, 32, 32], "num_classes": 3},
            "preprocess": {"patch_size": [32, 32, 32], "cache": "disk"},
            "split": {"test_fraction": 0.25, "val_fraction": 0.25}, "models": ["unet"],
            "train": {"epochs": 3, "batch_size": 4, "samples_per_case": 2, "processes": 2}}},
        "models": {"unet": {"args": {"channels": [8, 16, 32], "strides": [2, 2]}}}})
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    capsmed = [sys.executable, "-m", "capsmed"]
    for stage in ("prepare", "preprocess", "split"):
        subprocess.run([*capsmed, "-q", stage, "-c", str(config), "-d", "ds"], check=True)
    log = work / "train.log"
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "capsmed", "--log-file", str(log),
                          "train", "-c", str(config), "-d", "ds", "-m", "unet"],
                         capture_output=True, text=True, timeout=600)
    text = log.read_text() if log.is_file() else ""
    record_path = work / "results" / "ds" / "models" / "unet" / "train.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    doc.update(torchrun_rc=run.returncode, torchrun_seconds=round(time.perf_counter() - t0, 1),
               torchrun_backend_nccl="backend nccl" in text,
               torchrun_processes=record.get("processes"),
               torchrun_val_dice=record.get("best_metric"),
               torchrun_stderr_tail=run.stderr[-1500:] if run.returncode else "")
    return doc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--ddp", action="store_true", help="check the NCCL data-parallel path only")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    if args.ddp:
        doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), **ddp_check()}
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(json.dumps(doc, indent=1))
        return
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
