"""Routing at work: coupling statistics of trained capsule models on their test cases (issue 12).

For every capsule model in the given results folders whose layers route (``capsunet``,
``rescapsnet``, ``densecapsnet`` and their variants), runs each test case through the model as the
evaluation preprocesses it and summarises the couplings of every routing layer with
:func:`capsmed.layers.coupling_statistics`: the mean of the largest coupling of each input capsule
(``1/J`` for uniform couplings, 1 for a one-hot choice) and the coupling entropy over ``log J``
(1 uniform, 0 one-hot). One routing iteration gives exactly ``1/J`` and 1.

For the classifiers it also gives the mean length of a vote ``|u_j|i|`` and of a class capsule
``|v_j|``: under dot agreement an iteration moves a routing logit by at most ``|u_j|i| |v_j|``, so
these two lengths say how far the couplings can move at all.

    python benchmarks/routing_stats.py benchmarks/out/msd_hippocampus_seed0 [more folders]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from capsmed.data.transforms import build_preprocess_transforms
from capsmed.infer.checkpoint import build_model, load_checkpoint
from capsmed.layers import coupling_statistics
from capsmed.paths import Layout, read_json

ROUTED = ("capsunet", "rescapsnet", "densecapsnet")


def case_couplings(model: torch.nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """Couplings of every routing layer for one preprocessed image ``(C, *S)``."""
    x = image[None]
    if hasattr(model, "encode"):  # capsunet: pad to a multiple of 8, the whole volume at once
        pad = []
        for s in reversed(x.shape[2:]):
            pad += [0, (-s) % 8]
        _, couplings = model.encode(F.pad(x, pad), return_coupling=True)
        return couplings
    return [model.couplings(x)]


def case_lengths(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, float] | None:
    """Mean vote length and mean class-capsule length of a classifier (None: a segmenter)."""
    if not hasattr(model, "class_capsules"):
        return None
    x = image[None]
    votes = model.digits.votes(model._digit_inputs(x))  # (1, I, J, D)
    return (votes.norm(dim=-1).mean().item(),
            model.class_capsules(x).norm(dim=-1).mean().item())


def model_stats(results: Path, dataset: str, model_name: str) -> list[dict] | None:
    """Per routing layer: coupling statistics pooled over the test cases (None: no routing)."""
    layout = Layout(results)
    ckpt = load_checkpoint(layout.model_dir(dataset, model_name) / "best.pt")
    spec = ckpt["model"]
    if spec["name"] not in ROUTED or spec["args"].get("capsule_block", "capsule") != "capsule":
        return None
    model = build_model(ckpt)
    preprocess = build_preprocess_transforms(ckpt["plan"])
    cases = read_json(layout.cases(dataset), "case list")["cases"]
    test = set(read_json(layout.splits(dataset), "splits")["test"])
    per_layer: dict[int, list[dict]] = {}
    lengths: list[tuple[float, float]] = []
    with torch.no_grad():
        for case in cases:
            if case["case_id"] not in test:
                continue
            image = torch.as_tensor(preprocess({"image": case["image"]})["image"]).float()
            for k, c in enumerate(case_couplings(model, image)):
                per_layer.setdefault(k, []).append(coupling_statistics(c, dim=2))
            case_length = case_lengths(model, image)
            if case_length is not None:
                lengths.append(case_length)
    rows = []
    last = max(per_layer, default=0)
    agreement = "/".join(sorted({a for m in model.modules() if isinstance(a := getattr(
        m, "agreement", None), str)}))
    for k, stats in sorted(per_layer.items()):
        rows.append({"layer": k, "outputs": stats[0]["outputs"],
                     "iterations": spec["args"].get("routing_iterations", 3),
                     "agreement": agreement,
                     "max_coupling": statistics.mean(s["max_coupling"] for s in stats),
                     "entropy": statistics.mean(s["entropy"] for s in stats), "cases": len(stats)})
        if lengths and k == last:  # the class-capsule layer
            rows[-1]["vote_length"] = statistics.mean(u for u, _ in lengths)
            rows[-1]["class_length"] = statistics.mean(v for _, v in lengths)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="+", help="results folders (one per seed)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    table: dict[tuple[str, str, int], list[dict]] = {}
    for results in args.results:
        summary = json.loads((results / "summary.json").read_text())
        for dataset, doc in summary["datasets"].items():
            for model_name in doc["models"]:
                rows = model_stats(results, dataset, model_name)
                for row in rows or []:
                    table.setdefault((dataset, model_name, row["layer"]), []).append(row)
    print("| dataset | model | routing layer | J | iterations | agreement | "
          "mean largest coupling (1/J) | entropy / log J | vote length | class capsule length | "
          "seeds |")
    print("| --- | --- | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |")
    for (dataset, model_name, layer), rows in table.items():
        j = rows[0]["outputs"]
        mc = statistics.mean(r["max_coupling"] for r in rows)
        ent = statistics.mean(r["entropy"] for r in rows)
        u, v = (f"{statistics.mean(r[k] for r in rows):.4f}" if k in rows[0] else ""
                for k in ("vote_length", "class_length"))
        print(f"| {dataset} | {model_name} | {layer} | {j} | {rows[0]['iterations']} | "
              f"{rows[0]['agreement']} | {mc:.3f} ({1 / j:.3f}) | {ent:.3f} | {u} | {v} | "
              f"{len(rows)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
