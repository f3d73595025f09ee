"""Real-data benchmark rows (issue 6): the pipeline itself, on ../shared/data, over several seeds.

Each row is one plain Snakemake command (printed), run once per seed into its own results folder;
this script then reads every ``summary.json`` and ``train.json`` and prints a markdown table of mean
and standard deviation over seeds (test stage, or ``--stage``; ``--per-seed`` adds each seed's value).

    python benchmarks/real_data.py breastmnist --seeds 0 1 2
    python benchmarks/real_data.py msd_hippocampus --seeds 0 1 2
    python benchmarks/real_data.py msd_hippocampus --seeds 0 --ablation   # + routing ablations
    python benchmarks/real_data.py breastmnist --seeds 0 -- --rerun-triggers mtime  # snakemake args
    python benchmarks/real_data.py breastmnist --models rescapsnet rescapsnet_cosine  # a subset
    python benchmarks/real_data.py breastmnist --report-only --stage val --per-seed

``--ablation`` adds the config's ablation entries (``models.<capsule model>_1iter`` and ``_conv`` /
``_linear``: same parameters, FLOPs within 0.5%, one routing iteration or no routing; AdrenalMNIST3D's
``densecapsnet`` has no ``_linear``, its CNN counterpart being the DenseNet beside it; and the
classifiers' ``_cosine``, routing by cosine agreement) to the dataset's models, in the same results
folder, so the comparison page shows them beside the others.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
#: Ablation entries of each row's config (``models:``), added to the dataset's models by --ablation.
ABLATIONS = {
    "breastmnist": ("breastmnist", ["rescapsnet_1iter", "rescapsnet_linear", "rescapsnet_cosine"]),
    "adrenalmnist3d": ("adrenalmnist3d", ["densecapsnet_1iter", "densecapsnet_cosine"]),
    "msd_hippocampus": ("hippocampus", ["capsunet_1iter", "capsunet_conv"]),
}
ROWS = {
    "breastmnist": ("config/examples/breastmnist.yaml", DATA / "medmnist",
                    ["accuracy", "auc", "balanced_accuracy", "f1", "ece"]),
    "adrenalmnist3d": ("config/examples/adrenalmnist3d.yaml", DATA / "medmnist",
                       ["accuracy", "auc", "balanced_accuracy", "f1", "ece"]),
    "msd_hippocampus": ("config/examples/msd_hippocampus.yaml", DATA / "msd_hippocampus_subset",
                        ["dice_anterior", "dice_posterior", "dice", "hd95"]),
}


def command(row: str, seed: int, results: Path, extra: list[str],
            ablation: bool = False, models: list[str] | None = None) -> list[str]:
    """The snakemake command of one seed; ``models`` replaces the dataset's model list."""
    cfg, data_root, _ = ROWS[row]
    config = [f"data_root={data_root}", f"seed={seed}", f"results={results}"]
    dataset, variants = ABLATIONS[row]
    if ablation or models:
        import yaml

        if models is None:
            models = yaml.safe_load((ROOT / cfg).read_text())["datasets"][dataset]["models"]
        models = list(models) + (variants if ablation else [])
        config.append(f"datasets={{{dataset}: {{models: [{', '.join(models)}]}}}}")
    return [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", cfg, "--config",
            *config, *extra]


def table(row: str, results_dirs: list[Path], stage: str = "test", per_seed: bool = False) -> str:
    """Markdown table over the seeds' results folders: mean +- sd of the stage's metrics, cost."""
    metrics = ROWS[row][2]
    per_model: dict[str, dict[str, list[float]]] = {}
    for res in results_dirs:
        summary = json.loads((res / "summary.json").read_text())
        for ds, d in summary["datasets"].items():
            for model, m in d["models"].items():
                rec = json.loads((res / ds / "models" / model / "train.json").read_text())
                slot = per_model.setdefault(model, {})
                for k in metrics:
                    v = m["stages"][stage]["metrics"].get(k)
                    if v is not None:
                        slot.setdefault(k, []).append(float(v))
                slot.setdefault("params", []).append(rec["params"])
                slot.setdefault("gflops", []).append(rec["flops"] / 1e9)
                slot.setdefault("train_min", []).append(rec["train_seconds"] / 60)
                slot.setdefault("peak_gb", []).append(rec["peak_memory_mb"] / 1024)
                slot.setdefault("epochs", []).append(rec["epochs"])

    def fmt(vals: list[float], digits: int = 3) -> str:
        if not vals:
            return "n/a"
        if len(vals) == 1:
            return f"{vals[0]:.{digits}f}"
        return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"

    def fmt_seeds(vals: list[float], digits: int = 3) -> str:
        seeds = " / ".join(f"{v:.{digits}f}" for v in vals)
        return f"{fmt(vals, digits)} ({seeds})" if per_seed and len(vals) > 1 else fmt(vals, digits)

    head = ["model", *(f"{stage} {k}" for k in metrics), "params", "GFLOPs", "train min",
            "epochs", "peak GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for model, slot in per_model.items():
        cells = [model] + [fmt_seeds(slot.get(k, [])) for k in metrics]
        cells += [f"{int(slot['params'][0]):,}", f"{slot['gflops'][0]:.3f}", fmt(slot["train_min"], 1),
                  fmt_seeds(slot["epochs"], 0) if per_seed else fmt(slot["epochs"], 1),
                  fmt(slot["peak_gb"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stats(vals: list[float], digits: int = 3) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _loss(entry: dict, shift: str, severities: list[int], metric: str) -> float | None:
    """Clean metric minus the shift's mean metric over ``severities`` (None where undefined)."""
    clean = entry["clean"].get(metric)
    vals = [entry["shifts"][shift][str(s)].get(metric) for s in severities
            if str(s) in entry["shifts"].get(shift, {})]
    if clean is None or not vals or any(v is None for v in vals):
        return None
    return clean - statistics.mean(vals)


def generalisation_tables(results_dirs: list[Path], viewpoint: str = "rotation") -> str:
    """Markdown tables over the seeds' ``generalisation.json`` files (issue 23's goals).

    The first table: per model, the clean metric (severity-0 pass), mCE and relative mCE against
    the run's reference CNN (``reference`` in the file; the reference's own are 1 by definition),
    and the ``viewpoint`` shift's loss at severities 3-5 (clean minus the mean over 3, 4, 5) with
    its ratio to the reference's loss in the same seed. The second: each shift's loss over all
    severities per model. Mean ± sd over seeds (sd: the seed spread).
    """
    docs = []
    for res in results_dirs:
        docs += [json.loads(p.read_text()) for p in sorted(res.glob("*/generalisation.json"))]
    if not docs:
        return "(no generalisation.json yet)"
    out = []
    for dataset in dict.fromkeys(d["dataset"] for d in docs):
        runs = [d for d in docs if d["dataset"] == dataset]
        metric, ref = runs[0]["metric"], runs[0].get("reference")
        shifts, sev = runs[0]["shifts"], runs[0]["severities"]
        hi = [s for s in sev if s >= 3]
        models = list(runs[0]["models"])
        out.append(f"**{dataset}** ({len(runs)} seed(s); metric {metric}; reference CNN {ref}; "
                   f"severities {sev}; shifts: {', '.join(shifts)})\n")
        head = ["model", f"clean {metric}", "mCE", "relative mCE",
                f"{viewpoint} loss s3-5", f"ratio to {ref}"]
        out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for m in models:
            clean = [r["models"][m]["clean"].get(metric) for r in runs]
            mce = [r["models"][m].get("mce") for r in runs]
            rmce = [r["models"][m].get("relative_mce") for r in runs]
            loss, ratio = [], []
            if viewpoint in shifts:
                for r in runs:
                    mine = _loss(r["models"][m], viewpoint, hi, metric)
                    theirs = _loss(r["models"][ref], viewpoint, hi, metric) if ref else None
                    loss.append(mine)
                    if mine is not None and theirs is not None and abs(theirs) >= 0.01:
                        ratio.append(mine / theirs)
            out.append("| " + " | ".join([m, _stats(clean), _stats(mce, 2), _stats(rmce, 2),
                                          _stats(loss), _stats(ratio, 2)]) + " |")
        out.append("")
        head = ["shift (loss over all severities)", *models]
        out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for s in shifts:
            cells = [s] + [_stats([_loss(r["models"][m], s, sev, metric) for r in runs])
                           for m in models]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        curve = [r["learning_curve"] for r in runs if r.get("learning_curve")]
        if curve:
            fr = curve[0]["fractions"]
            head = ["model", *(f"{metric} at {f}" for f in fr)]
            out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
            for m in curve[0]["models"]:
                cells = [m] + [_stats([c["models"][m].get(f, {}).get(metric) for c in curve])
                               for f in fr]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("row", choices=sorted(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--report-only", action="store_true", help="only tabulate existing results")
    ap.add_argument("--ablation", action="store_true",
                    help="also train the config's routing ablations (same results folders)")
    ap.add_argument("--models", nargs="+", metavar="NAME",
                    help="train these entries of the config's models instead of the dataset's list")
    ap.add_argument("--stage", choices=("train", "val", "test"), default="test",
                    help="the stage whose metrics the table shows (default test)")
    ap.add_argument("--per-seed", action="store_true", help="also show each seed's metric values")
    ap.epilog = "Arguments after -- go to snakemake."
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]
    dirs = []
    for seed in args.seeds:
        results = args.out / f"{args.row}_seed{seed}"
        dirs.append(results)
        cmd = command(args.row, seed, results, args.extra, args.ablation, args.models)
        print("$", shlex.join(cmd), flush=True)
        if not args.report_only:
            t0 = time.time()
            subprocess.run(cmd, cwd=ROOT, check=True)
            print(f"  seed {seed}: {time.time() - t0:.0f} s", flush=True)
    print(table(args.row, dirs, args.stage, args.per_seed))
    print()
    print(generalisation_tables(dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
