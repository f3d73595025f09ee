"""Data-parallel training throughput on the CPU: 1 and 2 processes of one thread, 1 process of 2.

Trains one model (``unet`` of the hippocampus example, or ``--model capsunet``) on the MSD
hippocampus subset in three ways, through the real command (``capsmed train``, under
``torchrun --standalone --nproc_per_node 2`` for the 2-process run), and prints a markdown table of
training throughput (patches per second, from the epochs that are not validated) and the
validation Dice of each run after the same epochs:

    nice -n 19 python benchmarks/bench_ddp.py --epochs 3 --out bench_ddp.json

``--quality SEED [SEED ...]`` instead trains the demo's segmentation model (``capsunet`` on
``demo_seg3d`` of ``config/config.yaml``, its recipe unchanged) per seed with one process of 2
threads and with 2 processes of 1 thread, evaluates both on the test stage and prints their
validation and test Dice, so that the 2-process runs can be set against the spread of the
1-process runs over seeds (the seed also draws the synthetic data):

    nice -n 19 python benchmarks/bench_ddp.py --quality 0 1 2 --out ddp_quality.json

The global batch is the same in every row (``batch_size`` 4: 2 per process with 2 processes), so
the rows train the same recipe; only the work's split differs. The data are prepared once, in
``--work`` (default a temporary folder). Where the machine has 2 cores, the 2-process row competes
with anything else running on them, and gloo's all-reduce of the gradients runs on the same cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data" / "msd_hippocampus_subset").resolve()
#: name: (processes, threads per process)
VARIANTS = {"p1_t1": (1, 1), "p2_t1": (2, 1), "p1_t2": (1, 2)}


def make_config(work: Path, model: str, epochs: int) -> Path:
    """The hippocampus example, cut to a throughput run, with one model entry per variant."""
    cfg = yaml.safe_load((ROOT / "config" / "examples" / "msd_hippocampus.yaml").read_text())
    ds = cfg["datasets"]["hippocampus"]
    ds["path"] = str(DATA)
    ds["preprocess"]["cache"] = "disk"
    ds["models"] = [f"{model}_{v}" for v in VARIANTS]
    ds["train"] = {**ds["train"], "epochs": epochs, "val_every": 1000, "max_minutes": None,
                   "batch_size": 4, "samples_per_case": 2}
    base = cfg["models"].get(model, {})
    for name, (processes, _) in VARIANTS.items():
        cfg["models"][f"{model}_{name}"] = {**base, "model": model,
                                           "train": {"processes": processes}}
    cfg["results"] = str(work / "results")
    cfg["inference"] = {"overlap": 0.25}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def capsmed(*args: str, processes: int = 1) -> list[str]:
    """The command, under torchrun for several processes (as the workflow's train rule runs it)."""
    launch = [sys.executable, "-m", "capsmed"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", str(processes), "-m", "capsmed"]
    return [*launch, *args]


def quality(work: Path, seeds: list[int], model: str = "capsunet",
            dataset: str = "demo_seg3d") -> list[dict]:
    """Validation and test Dice of the demo model, 1 process x 2 threads and 2 x 1, per seed."""
    rows = []
    for seed in seeds:
        cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
        cfg["seed"], cfg["results"] = seed, str(work / f"seed{seed}")
        cfg["datasets"] = {dataset: cfg["datasets"][dataset]}
        cfg["datasets"][dataset]["models"] = [f"{model}_p1", f"{model}_p2"]
        for n in (1, 2):
            cfg["models"][f"{model}_p{n}"] = {**cfg["models"].get(model, {}), "model": model,
                                             "train": {"processes": n}}
        config = work / f"seed{seed}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for stage in ("prepare", "preprocess", "split"):
            subprocess.run(capsmed("-q", stage, "-c", str(config), "-d", dataset), check=True,
                           env=env)
        for n, threads in ((1, 2), (2, 1)):
            entry = f"{model}_p{n}"
            t0 = time.perf_counter()
            subprocess.run(capsmed("-q", "train", "-c", str(config), "-d", dataset, "-m", entry,
                                   "--threads", str(threads), processes=n), check=True,
                           env={**env, "OMP_NUM_THREADS": str(threads)})
            wall = time.perf_counter() - t0
            subprocess.run(capsmed("-q", "evaluate", "-c", str(config), "-d", dataset, "-m", entry,
                                   "-s", "test", "--threads", "2"), check=True, env=env)
            results = Path(cfg["results"]) / dataset
            record = json.loads((results / "models" / entry / "train.json").read_text())
            metrics = json.loads((results / "eval" / entry / "test" / "metrics.json").read_text())
            test = metrics.get("metrics", metrics).get("dice")
            rows.append({"seed": seed, "processes": n, "threads_per_process": threads,
                         "val_dice": record["best_metric"], "best_epoch": record["best_epoch"],
                         "test_dice": test, "train_seconds": record["train_seconds"],
                         "wall_s": round(wall, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("| seed | processes x threads | val Dice | test Dice | train s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['seed']} | {r['processes']} x {r['threads_per_process']} | "
              f"{r['val_dice']:.4f} | {r['test_dice']:.4f} | {r['train_seconds']:.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quality", type=int, nargs="+", default=None, metavar="SEED")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="capsmed-bench-ddp-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quality:
        rows = quality(work, args.quality)
        if args.out:
            args.out.write_text(json.dumps({"quality": rows, "cpus": os.cpu_count()}, indent=1))
        return
    config = make_config(work, args.model, args.epochs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stage in ("prepare", "preprocess", "split"):
        subprocess.run(capsmed("-q", stage, "-c", str(config), "-d", "hippocampus"), check=True,
                       env=env)
    rows = []
    for name, (processes, threads) in VARIANTS.items():
        entry = f"{args.model}_{name}"
        t0 = time.perf_counter()
        subprocess.run(capsmed("-q", "train", "-c", str(config), "-d", "hippocampus", "-m", entry,
                               "--threads", str(threads), processes=processes),
                       check=True, env={**env, "OMP_NUM_THREADS": str(threads)})
        wall = time.perf_counter() - t0
        model_dir = work / "results" / "hippocampus" / "models" / entry
        record = json.loads((model_dir / "train.json").read_text())
        with open(model_dir / "history.csv") as fh:
            history = list(csv.DictReader(fh))
        plan = json.loads((work / "results" / "hippocampus" / "preprocessed" / "plan.json")
                          .read_text())
        cases = json.loads((work / "results" / "hippocampus" / "splits.json").read_text())
        n_train = len(cases["folds"][0]["train"])
        patches = n_train * 2  # samples_per_case
        if processes > 1:  # DistributedSampler pads the shards to equal length
            patches = processes * -(-n_train // processes) * 2
        unvalidated = [float(r["seconds"]) for r in history if r["val_metric"] in ("", "nan")]
        rows.append({"variant": name, "processes": processes, "threads_per_process": threads,
                     "patches_per_epoch": patches,
                     "epoch_seconds": [round(s, 2) for s in unvalidated],
                     "patches_per_s": round(patches / statistics.mean(unvalidated), 2),
                     "val_dice": round(record["best_metric"], 4), "wall_s": round(wall, 1),
                     "patch": plan["patch_size"]})
    print(f"| model | processes x threads | patches/s | epoch s (unvalidated) | val Dice after "
          f"{args.epochs} epochs | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {args.model} | {r['processes']} x {r['threads_per_process']} | "
              f"{r['patches_per_s']} | {r['epoch_seconds']} | {r['val_dice']} | {r['wall_s']} |")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "epochs": args.epochs, "rows": rows,
                                        "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
