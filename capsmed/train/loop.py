"""The training loop: config-driven, deterministic on CPU, resumable after a kill.

Every epoch writes ``last.pt`` (and ``best.pt`` when the validation metric improved) atomically under
``results/{dataset}/models/{model}/``, plus ``history.csv``. A run started again with the same config
resumes from ``last.pt`` and ends with exactly the metrics of an uninterrupted run: each epoch
re-seeds every random source (weights are restored, data order and augmentation derive from
``seed`` and the epoch number), so nothing depends on how many epochs ran in this process.

A run resumes only when ``last.pt`` was written for the same training inputs
(:func:`resume_identity`: the model, its training settings, the plan, the cases and a digest of
their files, the validation's overlap); otherwise it trains from scratch and says which input
changed. Settings that change only memory or speed (threads, ``preprocess.cache``,
``inference.sw_batch_size``) do not count. A run that stopped (``epochs`` done, the time budget
spent, early stopping) records why in ``last.pt`` and ``train.json`` (``stop_reason``), and started
again trains no further epoch. The epoch a run stops at is always validated, so ``last.pt`` and
``best.pt`` both hold validated weights.

Learning curves (``train_model(..., fraction="0.25")``, ``capsmed train --fraction 0.25``): the
model is trained on a subset of the fold's training cases (:func:`capsmed.data.splits.fraction_cases`:
nested, grouped by patient, stratified by class; ``"minority0.25"`` keeps the other classes whole
and a share of the minority class) into ``models/{model}[/fold{k}]/fraction-{label}``, validated on
the same validation cases, with the same recipe and the same budget rule as the ordinary model
(:data:`BUDGET_RULE`): its ``epochs`` and ``max_minutes``, whichever ends first. ``train.json``
records the subset, the number of training cases and which bound ended the run (``budget``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsmed.config import (
    config_hash,
    dataset_config,
    hashed_train_config,
    inference_config,
    model_args,
    model_class,
    model_config_hash,
    resolve_fold,
    subset_spec,
    train_config,
)
from capsmed.data.splits import stage_cases
from capsmed.errors import CapsmedError
from capsmed.infer.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from capsmed.infer.runtime import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    configure_threads,
    package_versions,
    peak_memory_mb,
    select_device,
    sha256_file,
)
from capsmed.infer.settings import config_settings, record_settings
from capsmed.paths import Layout, read_json

logger = logging.getLogger(__name__)

# Seconds to pause after each epoch's checkpoint; only the resume-after-SIGKILL test sets it.
_EPOCH_SLEEP = float(os.environ.get("CAPSMED_TEST_EPOCH_SLEEP", "0") or 0)

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_metric", "lr", "seconds")

#: Why a run ended (``stop_reason`` in ``last.pt`` and ``train.json``): every epoch done, the time
#: budget ``max_minutes`` spent, or ``patience`` validations without improvement.
STOP_REASONS = ("epochs", "time_budget", "early_stop")

#: How a run's length is set, for a learning-curve subset as for the ordinary model (``train.json``'s
#: ``budget.rule``). Where ``epochs`` binds, a model trained on a share f of the cases takes about f
#: of the ordinary model's optimiser steps; where ``max_minutes`` binds, the same wall-clock time.
BUDGET_RULE = ("the configured epochs and max_minutes, whichever ends first (patience may stop "
               "earlier); an epoch is one pass over the training cases the model is given, "
               "ceil(cases / batch_size) steps")

#: ``stop_reason`` -> the bound that ended a run (``train.json``'s ``budget.binding``).
BINDING = {"epochs": "epochs", "time_budget": "max_minutes", "early_stop": "patience"}

#: The parts of a run's resume identity (:func:`resume_identity`), as the log names a changed one.
RESUME_PARTS = {
    "model": "the model (class, arguments, outputs) or the seed",
    "train": "the training settings",
    "plan": "the preprocessing plan (spacing, patch size, normalisation)",
    "cases": "the training / validation cases",
    "data": "the cases' files (size or modification time)",
    "validation": "the validation's sliding-window overlap",
}


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's data order and augmentation."""
    return (seed * 1_000_003 + epoch * 7919) % (2**31 - 1)


def model_input_items(cases: list[dict], task: str) -> list[dict]:
    """Reduce case dicts to the keys the transforms and collation need."""
    items = []
    for case in cases:
        item = {"image": case["image"], "case_id": case["case_id"]}
        if task == "segmentation":
            item["label"] = case["label"]
        else:
            item["class"] = int(case["class"])
        items.append(item)
    return items


def case_file_stamps(item: dict) -> list[list]:
    """``[path, size in bytes, mtime_ns]`` of every file a case's image and label are read from.

    A DICOM series folder contributes every file below it; a missing path is ``[path, -1, -1]``.
    """
    stamps = []
    for key in ("image", "label"):
        if key not in item:
            continue
        path = Path(item[key])
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                stamps.append([str(f), -1, -1])
            else:
                stamps.append([str(f), st.st_size, st.st_mtime_ns])
    return stamps


def data_digest(items: list[dict]) -> str:
    """Digest of the cases' files: path, size and modification time (ns) of each, not contents.

    Cheap (one ``stat`` per file, no read): a file rewritten in place changes its mtime and so the
    digest, also when its size stays; a file copied elsewhere changes its path.

    Args:
        items: Cases as :func:`model_input_items` gives them.

    Returns:
        :func:`capsmed.config.config_hash` of every item's :func:`case_file_stamps`.
    """
    return config_hash([case_file_stamps(item) for item in items])


def _cache_key(item: dict) -> bytes:
    """``PersistentDataset``'s key of an item: the item and its files' stamps.

    A case whose file was edited in place gets a new key, so the disk cache never hands out the
    preprocessing of the file as it was.
    """
    from monai.data.utils import pickle_hashing

    return pickle_hashing({**item, "files": case_file_stamps(item)})


def output_names(cases_doc: dict) -> dict[str, str]:
    """The names of the model's outputs as ``cases.json`` gives them, by index string.

    Label (segmentation) or class (classification) names, stored in the checkpoint; the pages'
    fallbacks for files without names are :func:`capsmed.report.files.label_names`.
    """
    names = cases_doc.get("labels") or cases_doc.get("classes") or {}
    return {str(k): str(v) for k, v in names.items()}


def _as_cached(item: Any) -> Any:
    """An item as MONAI's PersistentDataset stores it: tensors without metadata."""
    from monai.utils import convert_to_tensor

    return convert_to_tensor(item, convert_numeric=False, track_meta=False)


def build_datasets(plan: dict, train_items: list[dict], val_items: list[dict], cache: str,
                   cache_dir: Path, augment: bool, spatial_augment: bool = True,
                   rotate_degrees: float = 0.0, scale: float = 0.0):
    """MONAI datasets for training (deterministic part cached) and validation.

    The disk cache keys an item by its paths and its files' size and mtime (:func:`_cache_key`).
    ``spatial_augment`` False (``train.spatial_augment``) keeps the crop and the intensity
    augmentation but no flips, turns, rotations or scalings; ``rotate_degrees`` and ``scale``
    (``train.rotate_augment``, ``train.scale_augment``) add random rotations and scalings.

    Returns:
        ``(train_ds, val_ds)``.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.transforms import Compose, Lambda

    from capsmed.data.transforms import (
        build_augment_transforms,
        build_preprocess_transforms,
        build_transforms,
    )

    options = {"spatial": spatial_augment, "rotate_degrees": rotate_degrees, "scale": scale}
    train_tf = build_transforms(plan, train=augment, **options)
    val_tf = build_preprocess_transforms(plan)
    if cache == "disk":
        # PersistentDataset stores plain tensors (its track_meta=False) but hands out the MetaTensors
        # it has just computed. When another job (cross-validation folds, other models) or a killed
        # run filled part of the cache, one batch would mix both and fail to collate
        # ("'Tensor' object has no attribute 'meta'"). Drop the metadata before caching, as the
        # cache does, so an item is the same whether it was read or computed.
        plain = Lambda(func=_as_cached)
        pre = list(val_tf.transforms) + [plain]
        post = (list(build_augment_transforms(plan, **options).transforms) if augment else [])
        sub = Path(cache_dir) / config_hash(plan)
        sub.mkdir(parents=True, exist_ok=True)
        return (PersistentDataset(train_items, Compose(pre + post), cache_dir=sub,
                                  hash_func=_cache_key),
                PersistentDataset(val_items, Compose(pre), cache_dir=sub, hash_func=_cache_key))
    if cache == "memory":
        return (CacheDataset(train_items, train_tf, progress=False, num_workers=0),
                CacheDataset(val_items, val_tf, progress=False, num_workers=0))
    return Dataset(train_items, train_tf), Dataset(val_items, val_tf)


def make_optimizer(params, tcfg: dict) -> torch.optim.Optimizer:
    """Optimiser from the config."""
    lr, wd = tcfg["learning_rate"], tcfg["weight_decay"]
    if tcfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if tcfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=0.9, nesterov=True)


def set_learning_rate(opt: torch.optim.Optimizer, tcfg: dict, step: int, total_steps: int,
                      seconds: float) -> float:
    """Set the learning rate for the next step from the elapsed fraction of training.

    See :mod:`capsmed.train.recipe`: the schedule ends with ``epochs`` or with ``max_minutes``,
    whichever comes first.

    Returns:
        The learning rate set.
    """
    from capsmed.train.recipe import lr_factor, training_progress

    progress = training_progress(step, total_steps, seconds, tcfg.get("max_minutes"))
    lr = tcfg["learning_rate"] * lr_factor(tcfg["scheduler"], progress)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def estimate_flops(model: torch.nn.Module, in_channels: int, size: list[int]) -> int:
    """Forward FLOPs (matrix multiplications and convolutions) of one input of ``size``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the CPU; elementwise work (squash,
    softmax) is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, *size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def resolve_model(cfg: dict, dataset: str, model_name: str, plan: dict, in_channels: int,
                  out_channels: int):
    """Build the model with its configured arguments and the size the data plan gives it.

    Returns:
        ``(model, args, patch_size)``: the model, the constructor arguments recorded in the
        checkpoint, and the patch / image size it is trained on.
    """
    from capsmed.models import MODEL_REGISTRY, get_model

    class_name = model_class(cfg, model_name)
    if class_name not in MODEL_REGISTRY:
        raise CapsmedError(
            f"model {class_name!r} (dataset {dataset}) is unknown; known models: "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        )
    cls = MODEL_REGISTRY[class_name]
    args = model_args(cfg, model_name)
    spatial_dims = int(plan["spatial_dims"])
    patch = [int(p) for p in plan["patch_size"]]
    if plan["task"] == "segmentation":
        k = int(getattr(cls, "size_divisible", 1))
        patch = [int(math.ceil(p / k) * k) for p in patch]
    elif getattr(cls, "fixed_size", False):
        args.setdefault("image_size", int(patch[0]))
    model = get_model(class_name, spatial_dims, in_channels, out_channels, **args)
    if model.task != plan["task"]:
        raise CapsmedError(
            f"model {model_name!r} is a {model.task} model but dataset {dataset} is a "
            f"{plan['task']} task"
        )
    return model, args, patch


def _classification_metric(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Validation metric for classification: AUC when every class is present, else accuracy.

    The AUC is :func:`capsmed.measures.roc_auc` (binary, or macro one-vs-rest), as in the
    evaluation.
    """
    from capsmed.measures import roc_auc

    if len(np.unique(y_true)) == probs.shape[1] and probs.shape[1] >= 2:
        return roc_auc(y_true, probs)
    return float((probs.argmax(1) == y_true).mean())


def validate_epoch(model, loss_fn, val_loader, plan: dict, patch: list[int], device: torch.device,
                   sw_batch_size: int, overlap: float) -> tuple[float, float]:
    """Validation loss (classification only, else NaN) and metric (mean Dice / AUC).

    Segmentation runs MONAI ``sliding_window_inference`` over whole preprocessed images and scores
    the mean foreground Dice with ``DiceMetric``.
    """
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    model.eval()
    with torch.no_grad():
        if plan["task"] == "segmentation":
            dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
            for batch in val_loader:
                image = batch["image"].to(device)
                label = batch["label"].to(device)
                scores = sliding_window_inference(
                    image, roi_size=patch, sw_batch_size=sw_batch_size, predictor=model,
                    overlap=overlap, mode="gaussian",
                )
                n = scores.shape[1]
                pred = one_hot(scores.argmax(1, keepdim=True), n)
                dice(pred, one_hot(label.long(), n))
            value = float(dice.aggregate().item())
            return math.nan, value
        losses, ys, ps = [], [], []
        for batch in val_loader:
            image = batch["image"].to(device)
            target = torch.as_tensor(batch["class"]).long().to(device)
            outputs = model.forward_train(image, None)
            losses.append(float(loss_fn(outputs, target, image)) * len(target))
            ps.append(model.probabilities(outputs["scores"]).float().cpu().numpy())
            ys.append(target.cpu().numpy())
        y, p = np.concatenate(ys), np.concatenate(ps)
        return sum(losses) / len(y), _classification_metric(y, p)


def _history_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in HISTORY_FIELDS})
    return buf.getvalue()


@dataclass
class TrainingRun:
    """What one training run is built from, fixed before its first epoch.

    Attributes:
        dataset: Dataset name.
        model_name: Model name (the config's entry).
        tcfg: The model's training settings (:func:`capsmed.config.train_config`).
        icfg: The dataset's inference settings (sliding window of the validation).
        plan: The preprocessing plan.
        patch: Patch (segmentation) or image size the model is trained on.
        seed: The config's seed.
        fold: Cross-validation fold index.
        device: Where the model runs.
        n_threads: CPU threads in use.
        model: The model being trained.
        loss_fn: ``loss_fn(outputs, target, image)``.
        opt: The optimiser.
        ema: The weight average (``train.ema_decay``), or None.
        train_items: Training cases as the transforms take them.
        val_items: Validation cases.
        model_dir: Where checkpoints, ``history.csv`` and ``train.json`` are written.
        cache: ``preprocess.cache`` of the dataset.
        cache_dir: The dataset's preprocessing cache folder.
        base: The fields every checkpoint of this run starts with (format, model, plan, names,
            config hash, resume identity, seed, versions, metric name, dataset; ``subset`` for a
            learning-curve model).
        subset: A learning-curve model's subset (label, kind, share, minority class, training
            cases and the fold's), None for the ordinary model.
    """

    dataset: str
    model_name: str
    tcfg: dict
    icfg: dict
    plan: dict
    patch: list[int]
    seed: int
    fold: int
    device: torch.device
    n_threads: int
    model: torch.nn.Module
    loss_fn: Any
    opt: torch.optim.Optimizer
    ema: Any
    train_items: list[dict]
    val_items: list[dict]
    model_dir: Path
    cache: str
    cache_dir: Path
    base: dict
    subset: dict | None = None

    @property
    def task(self) -> str:
        """``"segmentation"`` or ``"classification"``."""
        return self.plan["task"]

    @property
    def last_path(self) -> Path:
        """``last.pt``: the latest epoch, with what resuming needs."""
        return self.model_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        """``best.pt``: the selected epoch (``train.select``)."""
        return self.model_dir / "best.pt"

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validated and checkpointed: the EMA's when there is one."""
        return self.model if self.ema is None else self.ema.module

    @property
    def label(self) -> str:
        """``dataset/model`` (``dataset/model/fraction-{label}``) for messages."""
        name = f"{self.dataset}/{self.model_name}"
        return name if self.subset is None else f"{name}/fraction-{self.subset['label']}"


@dataclass
class TrainingState:
    """Where training stands after its last finished epoch; ``last.pt`` stores it for resuming.

    Attributes:
        epoch: The last finished epoch (0 before the first).
        history: One row per finished epoch (:data:`HISTORY_FIELDS`).
        step: Optimiser steps taken.
        best_metric: The best validation metric so far.
        best_epoch: The epoch that reached it.
        bad_epochs: Validations since the last improvement (early stopping).
        train_seconds: Training time so far, over every process that ran.
        stop_reason: Why the run ended (one of :data:`STOP_REASONS`), None while it goes on.
    """

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    train_seconds: float = 0.0
    stop_reason: str | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TrainingState:
        """The state a ``last.pt`` recorded."""
        return cls(epoch=int(ckpt["epoch"]), history=list(ckpt["history"]),
                   step=int(ckpt.get("step", 0)), best_metric=float(ckpt["best_metric"]),
                   best_epoch=int(ckpt["best_epoch"]), bad_epochs=int(ckpt["bad_epochs"]),
                   train_seconds=float(ckpt["train_seconds"]),
                   stop_reason=ckpt.get("stop_reason"))

    def checkpoint_fields(self) -> dict[str, Any]:
        """The fields a checkpoint stores (besides weights and optimiser)."""
        return {"epoch": self.epoch, "history": self.history, "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "train_seconds": self.train_seconds, "step": self.step}

    def finish_epoch(self, row: dict) -> bool:
        """Record a finished epoch's history row; track the best metric and the bad epochs.

        Args:
            row: The epoch's history row; ``val_metric`` is NaN when the epoch was not validated.

        Returns:
            Whether the validation metric improved on the best so far.
        """
        self.epoch = int(row["epoch"])
        self.train_seconds += row["seconds"]
        self.history.append({**row, "seconds": round(row["seconds"], 3)})
        val_metric = row["val_metric"]
        improved = not math.isnan(val_metric) and val_metric > self.best_metric
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = val_metric, self.epoch, 0
        elif not math.isnan(val_metric):
            self.bad_epochs += 1
        return improved


def build_objective(model: torch.nn.Module, tcfg: dict, train_items: list[dict],
                    n_classes: int, device: torch.device, label: str
                    ) -> tuple[Any, torch.optim.Optimizer, Any]:
    """The loss, optimiser and weight average of a model, from its training settings.

    Args:
        model: The model (on ``device``).
        tcfg: Its training settings.
        train_items: The training cases (their classes weigh the loss with
            ``class_weights: balanced``).
        n_classes: Output classes.
        device: Where the model runs.
        label: ``dataset/model`` for the log.

    Returns:
        ``(loss_fn, optimizer, ema)``; ``ema`` is None without ``ema_decay``.
    """
    from capsmed.losses import build_loss

    class_weights = None
    if model.task == "classification" and tcfg["class_weights"] == "balanced":
        from capsmed.train.recipe import balanced_class_weights

        class_weights = balanced_class_weights([i["class"] for i in train_items], n_classes)
        logger.info("%s: class weights %s", label, [round(float(w), 3) for w in class_weights])
        class_weights = class_weights.to(device)
    loss_fn = build_loss(model, class_weights=class_weights, **tcfg["loss"])
    opt = make_optimizer(model.parameters(), tcfg)
    ema = None
    if tcfg["ema_decay"]:
        from capsmed.train.recipe import ModelEMA

        ema = ModelEMA(model, tcfg["ema_decay"])
    return loss_fn, opt, ema


def trained_model_dir(cfg: dict, dataset: str, model_name: str, fold: int | None = None,
                      fraction: str | None = None) -> Path:
    """Where a model is trained: ``models/{model}[/fold{k}]``, or ``.../fraction-{label}``.

    ``fraction``: a learning-curve model's label (:func:`capsmed.config.subset_spec` checks it and
    gives its canonical form, ``"0.250"`` -> ``"0.25"``).
    """
    layout = Layout(Path(cfg["results"]))
    path_fold = resolve_fold(cfg, dataset, fold)[1]
    if fraction is None:
        return layout.model_dir(dataset, model_name, path_fold)
    label = subset_spec(cfg, dataset, model_name, fraction)["label"]
    return layout.fraction_model_dir(dataset, model_name, label, path_fold)


def subset_items(cfg: dict, dataset: str, model_name: str, fraction: str, cases: list[dict],
                 task: str, fold: int) -> tuple[list[dict], dict]:
    """The training cases of a learning-curve model, and its ``subset`` record.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model_name: Model name.
        fraction: The subset's label (``"0.25"``, ``"minority0.25"``).
        cases: The fold's training cases.
        task: ``segmentation`` or ``classification``.
        fold: The fold index (for messages).

    Returns:
        ``(cases, subset)``: the chosen cases (:func:`capsmed.data.splits.fraction_cases` with the
        config's seed) and ``{"label", "kind", "value", "minority_class", "train_cases",
        "fold_train_cases"}`` (the minority class resolved when the config leaves it to the data).

    Raises:
        CapsmedError: the label is not configured (:func:`capsmed.config.subset_spec`), or
            ``train.minority_class`` is not a class of the training cases.
    """
    from capsmed.data.splits import fraction_cases, minority_class_of

    spec = subset_spec(cfg, dataset, model_name, fraction)
    minority = spec["kind"] == "minority"
    chosen = fraction_cases(cases, spec["value"], seed=int(cfg["seed"]), task=task,
                            minority=minority, minority_class=spec["minority_class"],
                            where=f"dataset {dataset}, fold {fold}")
    if minority and spec["minority_class"] is None:
        spec["minority_class"] = minority_class_of(cases)
    return chosen, {**spec, "train_cases": len(chosen), "fold_train_cases": len(cases)}


def prepare_training(cfg: dict, dataset: str, model_name: str, *, threads: int | None = None,
                     fold: int | None = None, fraction: str | None = None) -> TrainingRun:
    """Read the stage's inputs and build the model, loss, optimiser and EMA from the config.

    Seeds every random source with the config's seed before the model is built, so its initial
    weights depend on the seed only.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model_name: Model name.
        threads: CPU threads (default: the config's).
        fold: Cross-validation fold (default ``split.fold``).
        fraction: A learning-curve model's subset label (:func:`subset_items`); None: the
            ordinary model on every training case of the fold.

    Returns:
        The run.

    Raises:
        CapsmedError: On missing inputs, an unknown model, a model that does not fit the task, a
            fold without training cases, or a subset the config does not ask for.
    """
    from monai.utils import set_determinism

    layout = Layout(Path(cfg["results"]))
    tcfg = train_config(cfg, dataset, model_name)
    seed = int(cfg["seed"])
    n_threads = configure_threads(threads or cfg["threads"])
    device = select_device(cfg["device"])
    cases_doc = read_json(layout.cases(dataset), "case list")
    splits = read_json(layout.splits(dataset), "splits")
    plan = read_json(layout.plan(dataset), "preprocessing plan")
    task = plan["task"]
    fold, path_fold = resolve_fold(cfg, dataset, fold)
    names = output_names(cases_doc)
    out_channels = len(names) if names else int(plan.get("num_classes", 2))
    in_channels = int(plan.get("in_channels", 1))

    set_determinism(seed=seed)
    model, args, patch = resolve_model(cfg, dataset, model_name, plan, in_channels, out_channels)
    model.to(device)
    train_cases = stage_cases(cases_doc, splits, "train", fold)
    if not train_cases:
        raise CapsmedError(f"dataset {dataset}: no training cases in fold {fold}")
    subset = None
    if fraction is not None:
        train_cases, subset = subset_items(cfg, dataset, model_name, fraction, train_cases, task,
                                           fold)
    train_items = model_input_items(train_cases, task)
    val_items = model_input_items(stage_cases(cases_doc, splits, "val", fold), task)
    loss_fn, opt, ema = build_objective(model, tcfg, train_items, out_channels, device,
                                        f"{dataset}/{model_name}")
    model_dir = (layout.model_dir(dataset, model_name, path_fold) if subset is None else
                 layout.fraction_model_dir(dataset, model_name, subset["label"], path_fold))
    model_dir.mkdir(parents=True, exist_ok=True)
    base = {
        "format": CHECKPOINT_FORMAT,
        "model": {"name": model_class(cfg, model_name), "entry": model_name,
                  "spatial_dims": int(plan["spatial_dims"]),
                  "in_channels": in_channels, "out_channels": out_channels, "args": args},
        "task": task, "plan": {**plan, "patch_size": patch}, "names": names,
        "config_hash": model_config_hash(cfg, dataset, model_name,
                                         None if subset is None else subset["label"]),
        "seed": seed,
        "versions": package_versions(),
        "metric_name": "dice" if task == "segmentation" else "auc",
        "dataset": dataset,
        # the config's SNOMED CT codes of the labels, for the DICOM SEG of new studies
        "label_codes": cases_doc.get("label_codes"),
    }
    if subset is not None:
        base["subset"] = subset
    icfg = inference_config(cfg, dataset)
    base["resume_identity"] = resume_identity(base, tcfg, icfg, train_items, val_items)
    return TrainingRun(
        dataset=dataset, model_name=model_name, tcfg=tcfg, icfg=icfg,
        plan=plan, patch=patch, seed=seed, fold=fold, device=device, n_threads=n_threads,
        model=model, loss_fn=loss_fn, opt=opt, ema=ema, train_items=train_items,
        val_items=val_items, model_dir=model_dir,
        cache=dataset_config(cfg, dataset)["preprocess"]["cache"],
        cache_dir=layout.cache(dataset), base=base, subset=subset)


def resume_identity(base: dict, tcfg: dict, icfg: dict, train_items: list[dict],
                    val_items: list[dict]) -> dict[str, str]:
    """What a resumed run must share with the run that wrote ``last.pt``, part by part.

    Each part is a :func:`capsmed.config.config_hash` (see :data:`RESUME_PARTS`): ``model``
    (registered class, config entry, arguments, channels, output names, seed), ``train`` (the
    merged training settings as :func:`capsmed.config.hashed_train_config` gives them, like the
    model's hash), ``plan`` (the preprocessing plan as trained: spacing, patch size,
    normalisation, crop, ...), ``cases`` (the training and validation cases of the fold: ids,
    paths, classes; a learning-curve subset differs here), ``data`` (:func:`data_digest` of their
    files) and ``validation`` (the sliding-window ``overlap`` the validation metric uses). Left
    out, because they change memory or speed only: threads, device, ``preprocess.cache``,
    ``inference.sw_batch_size``, and the
    inference settings validation does not use.

    Returns:
        ``{part: hash}`` for every key of :data:`RESUME_PARTS`.
    """
    model = {"model": base["model"], "names": base["names"], "seed": base["seed"]}
    return {
        "model": config_hash(model),
        "train": config_hash(hashed_train_config(tcfg)),
        "plan": config_hash(base["plan"]),
        "cases": config_hash({"train": train_items, "val": val_items}),
        "data": data_digest(train_items + val_items),
        "validation": config_hash({"overlap": icfg["overlap"]}),
    }


def resume(run: TrainingRun) -> TrainingState:
    """Restore weights, optimiser and EMA from ``last.pt`` when it was written for this run.

    "This run" means the same :func:`resume_identity`; another ``last.pt`` is trained over, with
    a warning naming the parts that changed (data edited in place: "the cases' files").

    Returns:
        The state after the checkpoint's epoch, or a fresh state (no checkpoint, or one written
        for other training inputs or by a capsmed that did not record them).
    """
    if not run.last_path.is_file():
        return TrainingState()
    ckpt = load_checkpoint(run.last_path)
    saved = ckpt.get("resume_identity")
    if not isinstance(saved, dict):
        logger.warning("%s: written without a resume identity (an older capsmed); training %s "
                       "from scratch", run.last_path, run.label)
        return TrainingState()
    changed = [text for part, text in RESUME_PARTS.items()
               if saved.get(part) != run.base["resume_identity"][part]]
    if changed:
        logger.warning("%s: %s changed since it was written; training %s from scratch",
                       run.last_path, "; ".join(changed), run.label)
        return TrainingState()
    run.model.load_state_dict(ckpt.get("train_state_dict") or ckpt["state_dict"])
    run.opt.load_state_dict(ckpt["optimizer"])
    if run.ema is not None:
        run.ema.load_state_dict(ckpt["ema"])
    state = TrainingState.from_checkpoint(ckpt)
    logger.info("%s: resuming after epoch %d from %s", run.label, state.epoch, run.last_path)
    return state


def training_data(run: TrainingRun) -> tuple[Any, Any]:
    """The training dataset and the validation loader.

    Returns:
        ``(train_ds, val_loader)``; the training loader is made per epoch (:func:`train_epoch`).
    """
    from monai.data import DataLoader

    sample_plan = {**run.plan, "patch_size": run.patch,
                   "samples_per_case": run.tcfg["samples_per_case"]}
    train_ds, val_ds = build_datasets(sample_plan, run.train_items, run.val_items, run.cache,
                                      run.cache_dir, run.tcfg["augment"],
                                      run.tcfg.get("spatial_augment", True),
                                      run.tcfg.get("rotate_augment", 0.0),
                                      run.tcfg.get("scale_augment", 0.0))
    val_loader = DataLoader(val_ds, batch_size=1 if run.task == "segmentation" else 64,
                            shuffle=False, num_workers=0)
    return train_ds, val_loader


def last_epoch(run: TrainingRun, state: TrainingState, max_epochs: int | None) -> int:
    """The last epoch this process may run.

    Returns:
        ``epochs``, or ``max_epochs`` when smaller; the state's epoch (none left to run) when the
        run being resumed had already stopped, whatever the reason (``state.stop_reason``: the
        epochs done, the time budget spent, early stopping).
    """
    tcfg = run.tcfg
    if state.stop_reason is not None:
        return state.epoch
    return tcfg["epochs"] if max_epochs is None else min(tcfg["epochs"], max_epochs)


def train_epoch(run: TrainingRun, state: TrainingState, train_ds: Any, epoch: int, total_steps: int,
                t0: float) -> float:
    """One pass over the training data; updates weights, EMA and ``state.step``.

    The epoch re-seeds every random source from ``seed`` and ``epoch`` (:func:`epoch_seed`), so
    its data order and augmentation do not depend on earlier epochs having run in this process.

    Args:
        run: The run.
        state: The state before the epoch (its step count advances).
        train_ds: The training dataset.
        epoch: The epoch number (from 1).
        total_steps: Steps of the whole schedule (``epochs`` times steps per epoch).
        t0: ``time.perf_counter()`` at the epoch's start (time-budgeted schedules).

    Returns:
        The mean training loss per sample.

    Raises:
        CapsmedError: A non-finite loss, naming epoch and batch.
    """
    from monai.data import DataLoader
    from monai.utils import set_determinism

    tcfg, device = run.tcfg, run.device
    eseed = epoch_seed(run.seed, epoch)
    set_determinism(seed=eseed)
    if hasattr(train_ds, "transform") and hasattr(train_ds.transform, "set_random_state"):
        train_ds.transform.set_random_state(seed=eseed)
    gen = torch.Generator().manual_seed(eseed)
    loader = DataLoader(train_ds, batch_size=tcfg["batch_size"], shuffle=True, num_workers=0,
                        generator=gen)
    run.model.train()
    total, count = 0.0, 0
    batches = loader
    if sys.stderr.isatty():
        from tqdm import tqdm

        batches = tqdm(loader, desc=f"{run.model_name} epoch {epoch}", leave=False)
    for b, batch in enumerate(batches, start=1):
        image = batch["image"].to(device)
        if run.task == "segmentation":
            target = batch["label"].to(device).long()
        else:
            target = torch.as_tensor(batch["class"]).long().to(device)
        set_learning_rate(run.opt, tcfg, state.step, total_steps,
                          state.train_seconds + time.perf_counter() - t0)
        if hasattr(run.loss_fn, "set_progress"):  # losses with a schedule (the spread loss)
            from capsmed.train.recipe import training_progress

            run.loss_fn.set_progress(training_progress(
                state.step, total_steps, state.train_seconds + time.perf_counter() - t0,
                tcfg.get("max_minutes")))
        run.opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = run.model.forward_train(image, target)
            loss = run.loss_fn(outputs, target, image)
        if not torch.isfinite(loss):
            raise CapsmedError(
                f"{run.label}: loss is {loss.item()} at epoch {epoch}, batch {b}; "
                f"training stopped, the last good checkpoint is kept at {run.last_path}"
            )
        loss.backward()
        run.opt.step()
        state.step += 1
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        total += float(loss.detach()) * image.shape[0]
        count += image.shape[0]
    return total / max(count, 1)


def budget_spent(run: TrainingRun, seconds: float) -> bool:
    """Whether ``seconds`` of training use up the time budget ``max_minutes`` (False without)."""
    max_minutes = run.tcfg.get("max_minutes")
    return bool(max_minutes) and seconds >= 60 * max_minutes


def validation_due(run: TrainingRun, epoch: int, seconds: float) -> bool:
    """Whether ``epoch`` is validated.

    Every ``val_every``-th epoch is, the last, and the one whose training pass spends the time
    budget (``seconds``: training seconds after that pass), so the epoch a run stops at always
    has a validation metric.
    """
    return (epoch % run.tcfg["val_every"] == 0 or epoch >= run.tcfg["epochs"]
            or budget_spent(run, seconds))


def validate(run: TrainingRun, val_loader: Any) -> tuple[float, float]:
    """:func:`validate_epoch` of the run's evaluated weights with its validation settings."""
    return validate_epoch(run.eval_model, run.loss_fn, val_loader, run.plan, run.patch, run.device,
                          run.icfg["sw_batch_size"], run.icfg["overlap"])


def save_checkpoints(run: TrainingRun, state: TrainingState, improved: bool) -> None:
    """Write ``best.pt`` (when selected), ``last.pt`` and ``history.csv``, each atomically.

    ``best.pt`` is rewritten every epoch with ``select: last``, else when the metric improved (or
    before the first validation, so that it always exists). ``last.pt`` adds the optimiser,
    ``stop_reason`` and, with an EMA, the raw weights and the average's state.
    """
    state_doc = {**run.base, "state_dict": run.eval_model.state_dict(),
                 **state.checkpoint_fields()}
    if run.tcfg["select"] == "last" or improved or not run.best_path.is_file():
        atomic_torch_save(run.best_path, state_doc)
    extra = {"optimizer": run.opt.state_dict(), "stop_reason": state.stop_reason}
    if run.ema is not None:
        extra.update(train_state_dict=run.model.state_dict(), ema=run.ema.state_dict())
    atomic_torch_save(run.last_path, {**state_doc, **extra})
    atomic_write_text(run.model_dir / "history.csv", _history_csv(state.history))


def stop_reason(run: TrainingRun, state: TrainingState, validated: bool) -> str | None:
    """Why training ends after the state's epoch (one of :data:`STOP_REASONS`); None to go on.

    Args:
        run: The run.
        state: The state after the epoch.
        validated: Whether the epoch was validated. A run stops only at a validated epoch;
            ``epochs`` and the spent budget are validated by :func:`validation_due`, early
            stopping counts validations only.

    Returns:
        ``"epochs"`` after the last epoch, ``"early_stop"`` after ``patience`` validations without
        improvement, ``"time_budget"`` once the training seconds reach ``max_minutes``; the first
        of these that holds. None otherwise.
    """
    tcfg = run.tcfg
    if not validated:
        return None
    if state.epoch >= tcfg["epochs"]:
        return "epochs"
    if tcfg["patience"] and state.bad_epochs >= tcfg["patience"]:
        return "early_stop"
    if budget_spent(run, state.train_seconds):
        return "time_budget"
    return None


def _stop_message(run: TrainingRun, state: TrainingState) -> str:
    """The log line of a stop before ``epochs``."""
    if state.stop_reason == "time_budget":
        return (f"time budget of {run.tcfg['max_minutes']} min used after {state.epoch} epochs "
                f"({state.train_seconds:.1f} s)")
    return f"early stop after {state.bad_epochs} validations without improvement"


def training_record(run: TrainingRun, state: TrainingState) -> dict[str, Any]:
    """The record of a finished run (``train.json``); moves the model to the CPU to count FLOPs."""
    from capsmed.models import model_arguments

    tcfg, base = run.tcfg, run.base
    return {
        "dataset": run.dataset, "model": run.model_name, "model_class": base["model"]["name"],
        "model_args": model_arguments(base["model"]["name"], base["model"]["args"]),
        "task": run.task, "family": run.model.family,
        "params": sum(p.numel() for p in run.model.parameters()),
        "flops": estimate_flops(run.model.cpu(), base["model"]["in_channels"], run.patch),
        "select": tcfg["select"],
        "checkpoint_epoch": len(state.history) if tcfg["select"] == "last" else state.best_epoch,
        "train_seconds": round(state.train_seconds, 3),
        "peak_memory_mb": round(peak_memory_mb(run.device), 1),
        "epochs": len(state.history), "best_epoch": state.best_epoch,
        "best_metric": state.best_metric, "metric_name": base["metric_name"], "seed": run.seed,
        "versions": base["versions"], "config_hash": base["config_hash"], "checkpoint": "best.pt",
        "checkpoint_sha256": sha256_file(run.best_path), "device": str(run.device),
        "threads": run.n_threads, "patch_size": run.patch, "fold": run.fold,
        "stop_reason": state.stop_reason, "data_digest": base["resume_identity"]["data"],
        "train_cases": len(run.train_items), "val_cases": len(run.val_items),
        "budget": {"rule": BUDGET_RULE, "binding": BINDING.get(state.stop_reason or ""),
                   "epochs": tcfg["epochs"], "max_minutes": tcfg.get("max_minutes"),
                   "steps_per_epoch": math.ceil(len(run.train_items) / tcfg["batch_size"]),
                   "steps": state.step},
        "subset": run.subset,
    }


def train_model(cfg: dict, dataset: str, model_name: str, *, threads: int | None = None,
                max_epochs: int | None = None, fold: int | None = None,
                fraction: str | None = None) -> dict[str, Any]:
    """Train one model on one dataset from the config; resume from ``last.pt`` when present.

    The run lasts the configured ``epochs`` or ``max_minutes``, whichever ends first
    (:data:`BUDGET_RULE`, the recipe's rule, :mod:`capsmed.train.recipe`), for a learning-curve
    subset as for the ordinary model; ``train.json`` records ``train_cases`` and ``budget``
    (``binding``: ``epochs``, ``max_minutes`` or ``patience``, and the steps taken).

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model_name: Model name (``capsmed models``).
        threads: CPU threads (default: the rule's / environment's).
        max_epochs: Stop after this epoch in this process (for tests of resuming); the record
            ``train.json`` is only written when training is complete.
        fold: Cross-validation fold (default ``split.fold``); with several folds the model is
            written to ``models/{model}/fold{fold}``.
        fraction: Train the learning-curve model of this subset label (``"0.25"``: that share of
            the fold's training cases; ``"minority0.25"``: the other classes whole and that share
            of the minority class; see :func:`subset_items`) into
            ``models/{model}[/fold{k}]/fraction-{label}``, with the same validation cases. None:
            the ordinary model.

    Returns:
        The training record written to ``train.json`` (or the partial state when ``max_epochs``
        cut the run short).

    Raises:
        CapsmedError: On missing inputs, a model that does not fit the task, or a non-finite loss
            (naming epoch and batch; the last good checkpoint is kept).
    """
    run = prepare_training(cfg, dataset, model_name, threads=threads, fold=fold,
                           fraction=fraction)
    state = resume(run)
    train_ds, val_loader = training_data(run)
    logger.info("%s: %d parameters, %d train / %d val cases, device %s, %d threads", run.label,
                sum(p.numel() for p in run.model.parameters()), len(run.train_items),
                len(run.val_items), run.device, run.n_threads)
    steps_per_epoch = math.ceil(len(train_ds) / run.tcfg["batch_size"])
    total_steps = max(1, run.tcfg["epochs"] * steps_per_epoch)
    stop_after = last_epoch(run, state, max_epochs)
    if state.stop_reason is not None:
        logger.info("%s: stopped after epoch %d (%s); nothing left to train", run.label,
                    state.epoch, state.stop_reason)
    for epoch in range(state.epoch + 1, stop_after + 1):
        t0 = time.perf_counter()
        train_loss = train_epoch(run, state, train_ds, epoch, total_steps, t0)
        lr = run.opt.param_groups[0]["lr"]
        due = validation_due(run, epoch, state.train_seconds + time.perf_counter() - t0)
        val_loss, val_metric = validate(run, val_loader) if due else (math.nan, math.nan)
        improved = state.finish_epoch({
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
            "val_metric": val_metric, "lr": lr, "seconds": time.perf_counter() - t0})
        state.stop_reason = stop_reason(run, state, validated=due)
        save_checkpoints(run, state, improved)
        logger.info("%s epoch %d: train loss %.4f, val %s %.4f (best %.4f @ %d), %.1fs",
                    run.label, epoch, train_loss, run.base["metric_name"], val_metric,
                    state.best_metric, state.best_epoch, state.history[-1]["seconds"])
        if _EPOCH_SLEEP:  # test hook: widen the window in which a test kills training
            time.sleep(_EPOCH_SLEEP)
        if state.stop_reason is not None:
            if state.stop_reason != "epochs":
                logger.info("%s: %s", run.label, _stop_message(run, state))
            break
    if state.stop_reason is None:
        return {"partial": True, "epoch": state.epoch}
    record = training_record(run, state)
    # the inference settings beside best.pt, so capsmed predict finds them from the model alone
    record_settings(run.model_dir, config_settings(cfg, dataset))
    atomic_write_json(run.model_dir / "train.json", record)
    return record
