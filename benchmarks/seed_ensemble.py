"""What averaging models buys a classifier: the test stage of several seeds' runs, one ensemble.

For each classification model in the given results folders (one folder per seed, the same test
cases, as the MedMNIST rows of ``benchmarks/real_data.py`` have them: the official split), reads
the test stage's ``cases.csv`` that ``capsmed evaluate`` wrote, averages the class probabilities
over the folders and scores the average with the pipeline's own metrics
(:func:`capsmed.evaluate.metrics.classification_metrics`, intervals by
:func:`~capsmed.evaluate.metrics.bootstrap_classification_cis`). Prints one markdown row per model:
each member's metric, their mean, and the ensemble's value with its 95% interval. An ensemble of
the cross-validation folds would average models trained on different subsets; this is the
cheaper measurement of how much averaging moves the numbers, with nothing trained.

For binary tasks the last column is a bound, not a result: the best accuracy that any decision
threshold on ``prob_1`` reaches on these very cases (the threshold is picked on the test set, so
no model may be judged by it). When even that bound stays under an accuracy goal, no choice of
threshold reaches the goal; only a better ranking (AUC) can.

    python benchmarks/seed_ensemble.py benchmarks/out/breastmnist_seed{0,1,2}
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from capsmed.evaluate.metrics import bootstrap_classification_cis, classification_metrics
from capsmed.paths import Layout
from capsmed.report.files import read_table

METRICS = ("auc", "accuracy")


def best_threshold_accuracy(y: np.ndarray, prob_1: np.ndarray) -> float:
    """The largest accuracy of ``prob_1 >= t`` over every threshold ``t`` (a bound; binary only).

    Args:
        y: ``(N,)`` true classes in {0, 1}.
        prob_1: ``(N,)`` probabilities of class 1.

    Returns:
        ``max_t mean((prob_1 >= t) == y)`` over ``t`` in the observed values and above them.
    """
    thresholds = np.append(np.unique(prob_1), np.inf)
    return float(max(np.mean((prob_1 >= t) == (y == 1)) for t in thresholds))


def stage_probabilities(cases_csv: Path) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """Case ids ``(N,)``, true classes ``(N,)`` and probabilities ``(N, C)`` of one cases.csv.

    None for a segmentation stage (no ``prob_<class>`` columns).
    """
    df = read_table(cases_csv, required=True)
    columns = sorted((c for c in df.columns if c.startswith("prob_")), key=lambda c: int(c[5:]))
    if not columns:
        return None
    return list(df["case_id"]), df["class"].to_numpy(dtype=int), df[columns].to_numpy(dtype=float)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="+", help="results folders, one per seed")
    ap.add_argument("--stage", default="test")
    args = ap.parse_args()
    layouts = [Layout(r) for r in args.results]
    print("| dataset | model | members | " + " | ".join(
        f"{m} of each | {m} mean | {m} ensemble [95% CI]" for m in METRICS)
        + " | accuracy at the best test threshold (bound), each |")
    print("| --- | --- | ---: |" + " --- | ---: | --- |" * len(METRICS) + " --- |")
    datasets = sorted({p.name for r in args.results for p in r.iterdir()
                       if (p / "eval").is_dir()})
    for ds in datasets:
        models = sorted({p.parent.parent.name for lay in layouts
                         for p in lay.dataset(ds).glob(f"eval/*/{args.stage}/cases.csv")})
        for model in models:
            files = [lay.eval_dir(ds, model, args.stage) / "cases.csv" for lay in layouts]
            files = [f for f in files if f.is_file()]
            loaded = [stage_probabilities(f) for f in files]
            if loaded[0] is None:
                continue  # a segmentation stage
            ids, y, _ = loaded[0]
            for f, (other_ids, other_y, _) in zip(files, loaded, strict=True):
                if other_ids != ids or not np.array_equal(other_y, y):
                    raise SystemExit(f"{f}: not the same {args.stage} cases as {files[0]}")
            members = [classification_metrics(y, p)["metrics"] for _, _, p in loaded]
            mean_probs = np.mean([p for _, _, p in loaded], axis=0)
            ensemble = classification_metrics(y, mean_probs)["metrics"]
            cis = bootstrap_classification_cis(y, mean_probs, metrics=METRICS)
            cells = []
            for m in METRICS:
                each = [x[m] for x in members]
                cells += [" / ".join(f"{v:.3f}" for v in each), f"{statistics.mean(each):.3f}",
                          f"{ensemble[m]:.3f} [{cis[m][0]:.3f}, {cis[m][1]:.3f}]"]
            bound = (" / ".join(f"{best_threshold_accuracy(y, p[:, 1]):.3f}" for _, _, p in loaded)
                     if loaded[0][2].shape[1] == 2 else "n/a")
            print(f"| {ds} | {model} | {len(files)} | " + " | ".join(cells) + f" | {bound} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
