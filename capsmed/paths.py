"""The results layout, in one place (DESIGN section 2). Paths are under the results folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsmed.fileio import read_json as read_json  # re-exported: stages read their inputs here

STAGES = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    """Where every stage of the pipeline reads and writes.

    Args:
        results: The results folder (``config['results']``).
    """

    results: Path

    def dataset(self, ds: str) -> Path:
        """``results/{ds}``."""
        return Path(self.results) / ds

    def data_dir(self, ds: str) -> Path:
        """Materialised cases and ``cases.json``."""
        return self.dataset(ds) / "data"

    def cases(self, ds: str) -> Path:
        """The dataset's case list."""
        return self.data_dir(ds) / "cases.json"

    def preprocessed(self, ds: str) -> Path:
        """Fingerprint, plan and the preprocessing cache."""
        return self.dataset(ds) / "preprocessed"

    def fingerprint(self, ds: str) -> Path:
        """Dataset fingerprint (nnU-Net style)."""
        return self.preprocessed(ds) / "fingerprint.json"

    def plan(self, ds: str) -> Path:
        """Preprocessing plan derived from the fingerprint and config."""
        return self.preprocessed(ds) / "plan.json"

    def cache(self, ds: str) -> Path:
        """MONAI PersistentDataset cache folder."""
        return self.preprocessed(ds) / "cache"

    def splits(self, ds: str) -> Path:
        """Train / val / test case ids (written once)."""
        return self.dataset(ds) / "splits.json"

    def model_dir(self, ds: str, model: str, fold: int | None = None) -> Path:
        """Checkpoints, history and the training record of one model.

        ``models/{model}``, or ``models/{model}/fold{fold}`` where the dataset has several folds.
        """
        path = self.dataset(ds) / "models" / model
        return path if fold is None else path / f"fold{int(fold)}"

    def eval_dir(self, ds: str, model: str, stage: str, fold: int | None = None) -> Path:
        """Evaluation tables and predictions of one model on one stage.

        ``eval/{model}/{stage}``, or ``eval/{model}/fold{fold}/{stage}`` with several folds.
        """
        path = self.dataset(ds) / "eval" / model
        return (path if fold is None else path / f"fold{int(fold)}") / stage

    def shift_dir(self, ds: str, model: str, shift: str, severity: int,
                  fold: int | None = None) -> Path:
        """One shifted test stage: ``eval/{model}[/fold{k}]/shift/{shift}/s{severity}``.

        ``metrics.json`` and ``cases.csv`` as a stage writes them; the clean reference of the
        shifted stages (their own settings, no shift) is ``shift/none/s0``.
        """
        path = self.dataset(ds) / "eval" / model
        path = path if fold is None else path / f"fold{int(fold)}"
        return path / "shift" / shift / f"s{int(severity)}"

    def fraction_model_dir(self, ds: str, model: str, fraction: str,
                           fold: int | None = None) -> Path:
        """A model trained on a fraction of its training cases (learning curves).

        ``models/{model}[/fold{k}]/fraction-{fraction}``; ``fraction`` as written in the config
        (``"0.25"``).
        """
        return self.model_dir(ds, model, fold) / f"fraction-{fraction}"

    def fraction_eval_dir(self, ds: str, model: str, fraction: str,
                          fold: int | None = None) -> Path:
        """The test stage of a fraction's model: ``eval/{model}[/fold{k}]/fraction-{f}/test``."""
        path = self.dataset(ds) / "eval" / model
        path = path if fold is None else path / f"fold{int(fold)}"
        return path / f"fraction-{fraction}" / "test"

    def generalisation(self, ds: str) -> Path:
        """Shifted stages and learning curves of every model, summarised (``generalisation.json``)."""
        return self.dataset(ds) / "generalisation.json"

    def generalisation_report(self, ds: str) -> Path:
        """The dataset's generalisation page."""
        return self.reports(ds) / "generalisation.html"

    def crossval(self, ds: str, model: str) -> Path:
        """Cross-validation summary of one model over its folds (datasets with several folds)."""
        return self.dataset(ds) / "cv" / f"{model}.json"

    def export_dir(self, ds: str, model: str, fold: int | None = None) -> Path:
        """Exports of one trained model (``capsmed export``).

        ``export/{model}``, or ``export/{model}/fold{fold}`` with several folds: ``model.onnx``,
        ``model.ts``, ``bundle/`` (a MONAI bundle), ``MODEL_CARD.md`` and one ``{format}.json``
        per format recording its check.
        """
        path = self.dataset(ds) / "export" / model
        return path if fold is None else path / f"fold{int(fold)}"

    def export_record(self, ds: str, model: str, fmt: str, fold: int | None = None) -> Path:
        """``export/{model}[/fold{k}]/{fmt}.json``: the check of one format, written last."""
        return self.export_dir(ds, model, fold) / f"{fmt}.json"

    def reports(self, ds: str) -> Path:
        """Reports of one dataset."""
        return self.dataset(ds) / "reports"

    def stage_report(self, ds: str, model: str, stage: str) -> Path:
        """One stage report."""
        return self.reports(ds) / model / f"{stage}.html"

    def studies_dir(self, ds: str, model: str) -> Path:
        """One diagnostic report per test study."""
        return self.reports(ds) / model / "studies"

    def logs(self, ds: str) -> Path:
        """Logs of the dataset's rules."""
        return self.dataset(ds) / "logs"

    @property
    def summary(self) -> Path:
        """``results/summary.json``."""
        return Path(self.results) / "summary.json"

    @property
    def index(self) -> Path:
        """``results/index.html``."""
        return Path(self.results) / "index.html"



class _DatasetPath:
    """A :class:`DatasetLayout` attribute: the path :class:`Layout`'s ``method`` gives its dataset."""

    def __init__(self, method: str) -> None:
        self.method = method

    def __get__(self, obj: DatasetLayout | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.layout, self.method)(obj.dataset)


@dataclass(frozen=True)
class DatasetLayout:
    """One dataset's paths, with its reported fold bound: :class:`Layout` seen from a dataset.

    The pages use it; every path comes from :class:`Layout`. Attributes ``dataset_dir``
    (``results/{ds}``), ``reports_dir``, ``cases``, ``fingerprint``, ``plan`` and ``splits`` are
    the paths of the :class:`Layout` methods of those names (``dataset``, ``reports``, ...).

    Attributes:
        results_dir: The results folder.
        dataset: Dataset name.
        fold: The reported fold where the dataset has several folds (models and evaluations then
            live in ``fold{k}`` folders); ``None`` with one fold.
    """

    results_dir: Path
    dataset: str
    fold: int | None = None

    dataset_dir = _DatasetPath("dataset")
    reports_dir = _DatasetPath("reports")
    cases = _DatasetPath("cases")
    fingerprint = _DatasetPath("fingerprint")
    plan = _DatasetPath("plan")
    splits = _DatasetPath("splits")

    @property
    def layout(self) -> Layout:
        """The results folder's :class:`Layout`."""
        return Layout(Path(self.results_dir))

    def model_dir(self, model: str) -> Path:
        """``results/{ds}/models/{model}[/fold{k}]`` (checkpoints, history.csv, train.json)."""
        return self.layout.model_dir(self.dataset, model, self.fold)

    def eval_dir(self, model: str, stage: str) -> Path:
        """``results/{ds}/eval/{model}[/fold{k}]/{stage}`` (metrics.json, cases.csv, predictions/)."""
        return self.layout.eval_dir(self.dataset, model, stage, self.fold)

    def crossval(self, model: str) -> Path:
        """``results/{ds}/cv/{model}.json``."""
        return self.layout.crossval(self.dataset, model)

    def stage_report(self, model: str, stage: str) -> Path:
        """``results/{ds}/reports/{model}/{stage}.html``."""
        return self.layout.stage_report(self.dataset, model, stage)

    def studies_dir(self, model: str) -> Path:
        """``results/{ds}/reports/{model}/studies``."""
        return self.layout.studies_dir(self.dataset, model)

def safe_name(case_id: str) -> str:
    """A file-name-safe stem for a case id, unique per id.

    Ids made only of letters, digits, ``.``, ``_`` and ``-`` are kept (``case_017``); other ids have
    unsafe runs replaced by ``_`` and a short hash of the original appended, so two ids never share
    a file.
    """
    import hashlib
    import re

    case_id = str(case_id)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._-")[:80] or "study"
    if safe != case_id:
        safe = f"{safe}-{hashlib.sha1(case_id.encode('utf-8')).hexdigest()[:8]}"
    return safe
