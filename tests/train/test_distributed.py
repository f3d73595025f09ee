"""Data-parallel training on two CPU processes (gloo), as ``torchrun --nproc_per_node 2`` runs it.

Each test starts its processes itself: ``torch.multiprocessing`` (spawn) where a test needs to
look inside a process (gradients, a replaced clock, writers that must not run), ``torchrun``
where the command itself is under test (a SIGKILL and a resume).
"""

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from capsmed.infer.checkpoint import load_checkpoint
from capsmed.train.distributed import Distributed, TrainStep, unused_parameters
from tests.pipeline_helpers import prepare_all, tiny_config, write_config

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _capsnet(reconstruction_weight: float):
    """A float64 CapsNet (no batch statistics) and its loss."""
    from capsmed.losses import build_loss
    from capsmed.models import get_model

    torch.manual_seed(0)
    model = get_model("capsnet", 2, 1, 3, image_size=12, conv_channels=4, kernel_size=3,
                      primary_capsules=2, primary_dim=4, class_dim=4,
                      decoder_hidden=(8,)).double()
    return model, build_loss(model, reconstruction_weight=reconstruction_weight)


def _union_batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.rand(4, 1, 12, 12, generator=gen, dtype=torch.float64),
            torch.tensor([0, 2, 1, 2]))


def _sgd_step(step, image, target) -> None:
    opt = torch.optim.SGD(step.parameters(), lr=100.0)  # a big step: differences show
    opt.zero_grad()
    step(image, target).backward()
    opt.step()


def _ddp_step_worker(rank: int, store: str, out: str) -> None:
    """One DDP step on this rank's half of the union batch; rank 0 saves the weights."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=WORLD)
    try:
        image, target = _union_batch()
        half = slice(2 * rank, 2 * rank + 2)
        result = {}
        for weight in (0.0005, 0.0):  # with the decoder, and with the decoder unused
            model, loss_fn = _capsnet(weight)
            step = TrainStep(model, loss_fn)
            unused = unused_parameters(step, (2, 1, 12, 12), "classification",
                                       torch.device("cpu"))
            ddp = DistributedDataParallel(step, find_unused_parameters=bool(unused))
            _sgd_step(ddp, image[half], target[half])
            result[str(weight)] = {"unused": unused, "state": model.state_dict()}
        if rank == 0:
            torch.save(result, out)
    finally:
        torch.distributed.destroy_process_group()


def test_one_ddp_step_equals_one_step_on_the_union_batch(tmp_path):
    """Gradients are averaged through the DDP-wrapped TrainStep: one step of two processes on
    halves equals one single-process step on the whole batch, to 1e-6 in float64; also when the
    loss leaves the decoder unused (find_unused_parameters from unused_parameters)."""
    out = tmp_path / "ddp.pt"
    mp.start_processes(_ddp_step_worker, args=(str(tmp_path / "store"), str(out)),
                       nprocs=WORLD, start_method="spawn")
    ddp = torch.load(out, weights_only=False)
    image, target = _union_batch()
    for weight in (0.0005, 0.0):
        model, loss_fn = _capsnet(weight)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        _sgd_step(TrainStep(model, loss_fn), image, target)
        union = model.state_dict()
        alone, alone_loss = _capsnet(weight)  # one process on its half: what no sync gives
        _sgd_step(TrainStep(alone, alone_loss), image[:2], target[:2])
        got = ddp[str(weight)]["state"]
        assert max((got[k] - union[k]).abs().max().item() for k in union) < 1e-6
        assert max((union[k] - start[k]).abs().max().item() for k in union) > 1e-3
        assert max((alone.state_dict()[k] - union[k]).abs().max().item() for k in union) > 1e-4
        decoder = [k for k in union if k.startswith("decoder.")]
        assert decoder and (ddp[str(weight)]["unused"] == [] if weight else
                            set(ddp[str(weight)]["unused"]) == set(decoder))


def test_validation_shards_come_back_in_case_order():
    from capsmed.train.loop import _in_case_order

    cases = list(range(7))
    shards = [Distributed(rank=r, world_size=3).shard(cases) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert _in_case_order(shards) == cases


def _budget_worker(rank: int, cfg: dict, port: int, out: str) -> None:
    """train_model on one rank. Rank 0's clock ticks 1 s per reading; rank 1 has no clock and no
    writer (each raises), so it can only follow rank 0 and write nothing."""
    import types

    import capsmed.train.loop as loop

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    def forbidden(*args, **kwargs):
        raise AssertionError(f"rank {rank} must not do this")

    if rank == 0:
        ticks = iter(float(k) for k in range(1_000_000))
        loop.time = types.SimpleNamespace(perf_counter=lambda: next(ticks), sleep=time.sleep)
    else:
        loop.time = types.SimpleNamespace(perf_counter=forbidden, sleep=time.sleep)
        for name in ("atomic_torch_save", "atomic_write_json", "atomic_write_text",
                     "record_settings"):
            setattr(loop, name, forbidden)
    result = loop.train_model(cfg, "ds", "seed_cnn", threads=1)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_both_ranks_follow_rank_zeros_clock_and_only_rank_zero_writes(tmp_path):
    """A 6 s budget on rank 0's clock (5 readings per epoch, as with one process) is spent in
    epoch 2: both ranks stop there with stop_reason time_budget, though rank 1 never reads a
    clock; only rank 0 writes (rank 1's writers raise), and the files are those of one process."""
    train = {"epochs": 8, "batch_size": 8, "val_every": 5, "max_minutes": 0.1,
             "scheduler": "cosine", "processes": 2}
    cfg = tiny_config(tmp_path / "results", train=train)
    prepare_all(write_config(cfg, tmp_path / "config.yaml"))
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_budget_worker, args=(cfg, _free_port(), str(out)), nprocs=WORLD,
                       start_method="spawn")
    record = json.loads((out / "rank0.json").read_text())
    other = json.loads((out / "rank1.json").read_text())
    assert record["stop_reason"] == other["stop_reason"] == "time_budget"
    assert record["epochs"] == other["epoch"] == 2 and record["processes"] == 2
    assert record["train_seconds"] == 8.0
    model_dir = tmp_path / "results" / "ds" / "models" / "seed_cnn"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "best.pt", "history.csv", "inference.json", "last.pt", "train.json"]


def _history(model_dir: Path) -> list[dict]:
    with open(model_dir / "history.csv") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def _torchrun(config: Path, log: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(WORLD), "-m", "capsmed", "--log-file", str(log), "train", "-c", str(config), "-d",
            "ds", "-m", "seed_cnn", "--threads", "1"]


def test_a_killed_torchrun_resumes_to_the_uninterrupted_run(tmp_path):
    """torchrun with 2 processes, SIGKILLed (the whole process group, as SLURM kills a job)
    after its first epoch, then started again, ends with the history and weights of an
    uninterrupted 2-process run; the log is rank 0's alone."""
    train = {"epochs": 3, "batch_size": 8, "processes": 2}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name in ("ref", "run"):
        cfg = tiny_config(tmp_path / name / "results", train=train)
        runs[name] = write_config(cfg, tmp_path / f"{name}.yaml")
        prepare_all(runs[name])
    ref_dir, run_dir = (tmp_path / n / "results" / "ds" / "models" / "seed_cnn" for n in runs)
    subprocess.run(_torchrun(runs["ref"], tmp_path / "ref.log"), env=env, check=True, timeout=300,
                   capture_output=True)

    proc = subprocess.Popen(_torchrun(runs["run"], tmp_path / "run.log"),
                            env={**env, "CAPSMED_TEST_EPOCH_SLEEP": "3"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (run_dir / "history.csv").is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _history(run_dir)
    assert 1 <= len(partial) < 3, "the kill should land mid-training"
    assert not (run_dir / "train.json").exists()
    subprocess.run(_torchrun(runs["run"], tmp_path / "run.log"), env=env, check=True,
                   timeout=300, capture_output=True)

    reference = _history(ref_dir)
    assert _history(run_dir) == reference and len(reference) == 3
    assert not any(math.isnan(float(r["train_loss"])) for r in reference)
    ref_ckpt, ckpt = load_checkpoint(ref_dir / "best.pt"), load_checkpoint(run_dir / "best.pt")
    for key, value in ref_ckpt["state_dict"].items():
        assert torch.equal(value, ckpt["state_dict"][key]), key
    log = (tmp_path / "run.log").read_text()
    assert "resuming after epoch" in log and "2 processes" in log
    assert "[rank 1]" not in log and log.count("epoch 3: train loss") == 1


@pytest.mark.parametrize("world", [1, 2])
def test_the_world_size_is_part_of_the_resume_identity(world):
    from capsmed.train.loop import RESUME_PARTS, resume_identity

    base = {"model": {}, "names": {}, "seed": 0, "plan": {}}
    identity = resume_identity(base, {"epochs": 1, "processes": 2}, {"overlap": 0.25}, [], [],
                               world_size=world)
    assert ("world_size" in identity) == (world > 1) and set(identity) <= set(RESUME_PARTS)
    one = resume_identity(base, {"epochs": 1, "processes": 1}, {"overlap": 0.25}, [], [])
    assert one["train"] == identity["train"]  # the key is not the run: the world size is
