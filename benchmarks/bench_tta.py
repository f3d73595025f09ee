"""What test-time flips cost: no TTA, one flip per axis (``tta_flips: axes``), nnU-Net's mirror set.

Times the one inference path (:func:`capsmed.infer.engine.predict_segmentation_case`) on real
hippocampus cases (``../shared/data/msd_hippocampus_subset``, the example's preprocessing: 1 mm,
32^3 window, overlap 0.5) for ``capsunet`` and the MONAI ``unet`` of the example config, with
seeded untrained weights (the cost does not depend on the weights). Seconds per case are the
median over the cases and repeats; compare the ratios, measured in one run.

    python benchmarks/bench_tta.py [--cases 6] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from capsmed.data.fingerprint import compute_fingerprint, make_plan
from capsmed.data.transforms import build_preprocess_transforms
from capsmed.infer.engine import predict_segmentation_case
from capsmed.models import get_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus_subset"
UNET = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2}
SETTINGS = {"none": {"tta": False}, "axes": {"tta": True, "tta_flips": "axes"},
            "mirror": {"tta": True, "tta_flips": "mirror"}}


def main() -> None:
    """Print seconds per case for each model and TTA setting, and the ratios to one pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    doc = json.loads((DATA / "dataset.json").read_text())
    entries = doc["training"][: args.cases]
    images = [str(DATA / e["image"]) for e in entries]
    cases = {"task": "segmentation", "spatial_dims": 3, "modality": "MRI",
             "labels": doc["labels"],
             "cases": [{"case_id": str(i), "image": str(DATA / e["image"]),
                        "label": str(DATA / e["label"])} for i, e in enumerate(entries)]}
    # the hippocampus example's preprocessing: 1 mm, 32^3 window
    plan = make_plan(compute_fingerprint(cases), {"preprocess": {
        "spacing": [1.0, 1.0, 1.0], "patch_size": [32, 32, 32]}}, 16, None)
    preprocess = build_preprocess_transforms(plan)
    print(f"{len(images)} hippocampus cases, {args.repeats} repeats, {args.threads} threads")
    print("| model | TTA | passes | s per case | x one pass |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, kwargs in (("capsunet", {}), ("unet", UNET)):
        torch.manual_seed(0)
        model = get_model(name, 3, 1, 3, **kwargs).eval()
        base = None
        for label, extra in SETTINGS.items():
            icfg = {"overlap": 0.5, "sw_batch_size": 2, "mode": "gaussian",
                    "largest_component": False, **extra}
            times, passes = [], 1
            for _ in range(args.repeats):
                for image in images:
                    t0 = time.perf_counter()
                    out = predict_segmentation_case(model, {"image": image}, plan, preprocess,
                                                    torch.device("cpu"), icfg)
                    times.append(time.perf_counter() - t0)
                    passes = len(out["pass_seconds"])
            median = statistics.median(times)
            base = base or median
            print(f"| {name} | {label} | {passes} | {median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
