"""What the shifted test stages cost: the default shift set, every severity, per test case and model.

Runs the hippocampus example (``config/examples/msd_hippocampus.yaml`` on
``../shared/data/msd_hippocampus_subset``) into a scratch results folder: prepare, preprocess and
split, a one-epoch training of each model (the cost of a shifted stage does not depend on how well
the model was trained), then :func:`capsmed.evaluate.shift.evaluate_shift` for the clean reference
and every default shift of the plan at every severity, in one process (as one job per shift and
severity would, without the start-up of each job). Prints seconds per test case and model for the
whole set, and per shift.

    python benchmarks/bench_shift_cost.py [--models capsunet unet] [--out /tmp/shift_cost]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from capsmed.cli import main as capsmed

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data" / "msd_hippocampus_subset").resolve()
CONFIG = ROOT / "config" / "examples" / "msd_hippocampus.yaml"


def main() -> None:
    """Prepare, train briefly, time every shifted stage; print a markdown table."""
    from capsmed.config import load_config
    from capsmed.evaluate.shift import CLEAN, evaluate_shift, shift_stage_settings
    from capsmed.fileio import read_json
    from capsmed.paths import Layout
    from capsmed.train.loop import train_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["capsunet", "unet"])
    parser.add_argument("--out", default=None, help="results folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="shift_cost_"))
    sets = [f"data_root={DATA}", f"results={out}", f"threads={args.threads}",
            "datasets.hippocampus.train.epochs=1", "datasets.hippocampus.train.val_every=1"]
    flags = [x for s in sets for x in ("--set", s)]
    for stage in ("prepare", "preprocess", "split"):
        assert capsmed(["-q", stage, "-c", str(CONFIG), "-d", "hippocampus", *flags]) == 0
    cfg = load_config(CONFIG, overrides=sets)
    layout = Layout(out)
    plan = read_json(layout.plan("hippocampus"), "plan")
    shifts, _ = shift_stage_settings(cfg, "hippocampus", plan)
    print(f"results: {out}; shifts {shifts['shifts']} at severities {shifts['severities']}, "
          f"TTA {shifts['tta']}, {args.threads} threads")
    print("| model | shift | stages | s per case (all its stages) |")
    print("| --- | --- | ---: | ---: |")
    for model in args.models:
        train_model(cfg, "hippocampus", model, threads=args.threads)
        total, n_cases = 0.0, 0
        for shift in [CLEAN] + shifts["shifts"]:
            t0 = time.perf_counter()
            docs = evaluate_shift(cfg, "hippocampus", model, shift, threads=args.threads)
            seconds = time.perf_counter() - t0
            n_cases = next(iter(docs.values()))["n_cases"]
            total += seconds
            print(f"| {model} | {shift} | {len(docs)} | {seconds / n_cases:.2f} |")
        print(f"| {model} | **all ({n_cases} test cases)** | "
              f"{1 + len(shifts['shifts']) * len(shifts['severities'])} | "
              f"**{total / n_cases:.2f}** |")


if __name__ == "__main__":
    main()
