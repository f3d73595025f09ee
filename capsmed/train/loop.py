"""The training loop: config-driven, deterministic on CPU, resumable after a kill.

Every epoch writes ``last.pt`` (and ``best.pt`` when the validation metric improved) atomically under
``results/{dataset}/models/{model}/``, plus ``history.csv``. A run started again with the same config
resumes from ``last.pt`` and ends with exactly the metrics of an uninterrupted run: each epoch
re-seeds every random source (weights are restored, data order and augmentation derive from
``seed`` and the epoch number), so nothing depends on how many epochs ran in this process.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsmed.config import (
    config_hash,
    dataset_config,
    inference_config,
    model_args,
    model_class,
    model_config_hash,
    resolve_fold,
    train_config,
)
from capsmed.data.splits import stage_cases
from capsmed.errors import CapsmedError
from capsmed.paths import Layout, read_json
from capsmed.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from capsmed.train.runtime import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    configure_threads,
    package_versions,
    peak_memory_mb,
    select_device,
    sha256_file,
)

logger = logging.getLogger(__name__)

# Seconds to pause after each epoch's checkpoint; only the resume-after-SIGKILL test sets it.
_EPOCH_SLEEP = float(os.environ.get("CAPSMED_TEST_EPOCH_SLEEP", "0") or 0)

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_metric", "lr", "seconds")


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


def label_names(cases_doc: dict) -> dict[str, str]:
    """Label (segmentation) or class (classification) names by index string."""
    names = cases_doc.get("labels") or cases_doc.get("classes") or {}
    return {str(k): str(v) for k, v in names.items()}


def _as_cached(item: Any) -> Any:
    """An item as MONAI's PersistentDataset stores it: tensors without metadata."""
    from monai.utils import convert_to_tensor

    return convert_to_tensor(item, convert_numeric=False, track_meta=False)


def build_datasets(plan: dict, train_items: list[dict], val_items: list[dict], cache: str,
                   cache_dir: Path, augment: bool):
    """MONAI datasets for training (deterministic part cached) and validation.

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

    train_tf = build_transforms(plan, train=augment)
    val_tf = build_preprocess_transforms(plan)
    if cache == "disk":
        # PersistentDataset stores plain tensors (its track_meta=False) but hands out the MetaTensors
        # it has just computed. When another job (cross-validation folds, other models) or a killed
        # run filled part of the cache, one batch would mix both and fail to collate
        # ("'Tensor' object has no attribute 'meta'"). Drop the metadata before caching, as the
        # cache does, so an item is the same whether it was read or computed.
        plain = Lambda(func=_as_cached)
        pre = list(val_tf.transforms) + [plain]
        post = list(build_augment_transforms(plan).transforms) if augment else []
        sub = Path(cache_dir) / config_hash(plan)
        sub.mkdir(parents=True, exist_ok=True)
        return (PersistentDataset(train_items, Compose(pre + post), cache_dir=sub),
                PersistentDataset(val_items, Compose(pre), cache_dir=sub))
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

    The AUC is :func:`capsmed.evaluate.metrics.roc_auc` (binary, or macro one-vs-rest), as in the
    evaluation.
    """
    from capsmed.evaluate.metrics import roc_auc

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


def train_model(cfg: dict, dataset: str, model_name: str, *, threads: int | None = None,
                max_epochs: int | None = None, fold: int | None = None) -> dict[str, Any]:
    """Train one model on one dataset from the config; resume from ``last.pt`` when present.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model_name: Model name (``capsmed models``).
        threads: CPU threads (default: the rule's / environment's).
        max_epochs: Stop after this epoch in this process (for tests of resuming); the record
            ``train.json`` is only written when training is complete.
        fold: Cross-validation fold (default ``split.fold``); with several folds the model is
            written to ``models/{model}/fold{fold}``.

    Returns:
        The training record written to ``train.json`` (or the partial state when ``max_epochs``
        cut the run short).

    Raises:
        CapsmedError: On missing inputs, a model that does not fit the task, or a non-finite loss
            (naming epoch and batch; the last good checkpoint is kept).
    """
    from monai.data import DataLoader
    from monai.utils import set_determinism

    from capsmed.losses import build_loss

    layout = Layout(Path(cfg["results"]))
    ds_cfg = dataset_config(cfg, dataset)
    tcfg = train_config(cfg, dataset, model_name)
    icfg = inference_config(cfg, dataset)
    seed = int(cfg["seed"])
    n_threads = configure_threads(threads or cfg["threads"])
    device = select_device(cfg["device"])
    cases_doc = read_json(layout.cases(dataset), "case list")
    splits = read_json(layout.splits(dataset), "splits")
    plan = read_json(layout.plan(dataset), "preprocessing plan")
    task = plan["task"]
    fold, path_fold = resolve_fold(cfg, dataset, fold)
    names = label_names(cases_doc)
    out_channels = len(names) if names else int(plan.get("num_classes", 2))
    in_channels = int(plan.get("in_channels", 1))
    chash = model_config_hash(cfg, dataset, model_name)

    set_determinism(seed=seed)
    model, args, patch = resolve_model(cfg, dataset, model_name, plan, in_channels, out_channels)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    train_items = model_input_items(stage_cases(cases_doc, splits, "train", fold), task)
    val_items = model_input_items(stage_cases(cases_doc, splits, "val", fold), task)
    if not train_items:
        raise CapsmedError(f"dataset {dataset}: no training cases in fold {fold}")
    class_weights = None
    if task == "classification" and tcfg["class_weights"] == "balanced":
        from capsmed.train.recipe import balanced_class_weights

        class_weights = balanced_class_weights([i["class"] for i in train_items], out_channels)
        logger.info("%s/%s: class weights %s", dataset, model_name,
                    [round(float(w), 3) for w in class_weights])
    if class_weights is not None:
        class_weights = class_weights.to(device)
    loss_fn = build_loss(model, class_weights=class_weights, **tcfg["loss"])
    opt = make_optimizer(model.parameters(), tcfg)
    ema = None
    if tcfg["ema_decay"]:
        from capsmed.train.recipe import ModelEMA

        ema = ModelEMA(model, tcfg["ema_decay"])

    model_dir = layout.model_dir(dataset, model_name, path_fold)
    model_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = model_dir / "last.pt", model_dir / "best.pt"

    base = {
        "format": CHECKPOINT_FORMAT,
        "model": {"name": model_class(cfg, model_name), "entry": model_name,
                  "spatial_dims": int(plan["spatial_dims"]),
                  "in_channels": in_channels, "out_channels": out_channels, "args": args},
        "task": task, "plan": {**plan, "patch_size": patch}, "names": names,
        "config_hash": chash, "seed": seed, "versions": package_versions(),
        "metric_name": "dice" if task == "segmentation" else "auc",
        "dataset": dataset,
    }
    start_epoch, history, step = 1, [], 0
    best_metric, best_epoch, bad_epochs, train_seconds = -math.inf, 0, 0, 0.0
    if last_path.is_file():
        ckpt = load_checkpoint(last_path)
        if ckpt.get("config_hash") == chash:
            model.load_state_dict(ckpt.get("train_state_dict") or ckpt["state_dict"])
            opt.load_state_dict(ckpt["optimizer"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            step = int(ckpt.get("step", 0))
            start_epoch = int(ckpt["epoch"]) + 1
            history = list(ckpt["history"])
            best_metric, best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
            bad_epochs, train_seconds = int(ckpt["bad_epochs"]), float(ckpt["train_seconds"])
            logger.info("%s/%s: resuming after epoch %d from %s", dataset, model_name,
                        start_epoch - 1, last_path)
        else:
            logger.warning("%s: written for another config; training %s/%s from scratch",
                           last_path, dataset, model_name)

    sample_plan = {**plan, "patch_size": patch, "samples_per_case": tcfg["samples_per_case"]}
    train_ds, val_ds = build_datasets(sample_plan, train_items, val_items,
                                      ds_cfg["preprocess"]["cache"], layout.cache(dataset),
                                      tcfg["augment"])
    val_loader = DataLoader(val_ds, batch_size=1 if task == "segmentation" else 64,
                            shuffle=False, num_workers=0)
    amp = device.type == "cuda"
    use_tty = sys.stderr.isatty()
    logger.info("%s/%s: %d parameters, %d train / %d val cases, device %s, %d threads",
                dataset, model_name, n_params, len(train_items), len(val_items), device, n_threads)

    steps_per_epoch = math.ceil(len(train_ds) / tcfg["batch_size"])
    total_steps = max(1, tcfg["epochs"] * steps_per_epoch)
    eval_model = model if ema is None else ema.module  # the weights validated and checkpointed
    stop_after = tcfg["epochs"] if max_epochs is None else min(tcfg["epochs"], max_epochs)
    if tcfg["patience"] and bad_epochs >= tcfg["patience"]:
        stop_after = start_epoch - 1  # the run being resumed had already stopped early
    epoch = start_epoch - 1
    for epoch in range(start_epoch, stop_after + 1):
        t0 = time.perf_counter()
        eseed = epoch_seed(seed, epoch)
        set_determinism(seed=eseed)
        if hasattr(train_ds, "transform") and hasattr(train_ds.transform, "set_random_state"):
            train_ds.transform.set_random_state(seed=eseed)
        gen = torch.Generator().manual_seed(eseed)
        loader = DataLoader(train_ds, batch_size=tcfg["batch_size"], shuffle=True,
                            num_workers=0, generator=gen)
        model.train()
        total, count = 0.0, 0
        batches = loader
        if use_tty:
            from tqdm import tqdm

            batches = tqdm(loader, desc=f"{model_name} epoch {epoch}", leave=False)
        for b, batch in enumerate(batches, start=1):
            image = batch["image"].to(device)
            if task == "segmentation":
                target = batch["label"].to(device).long()
            else:
                target = torch.as_tensor(batch["class"]).long().to(device)
            lr = set_learning_rate(opt, tcfg, step, total_steps,
                                   train_seconds + time.perf_counter() - t0)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = model.forward_train(image, target)
                loss = loss_fn(outputs, target, image)
            if not torch.isfinite(loss):
                raise CapsmedError(
                    f"{dataset}/{model_name}: loss is {loss.item()} at epoch {epoch}, batch {b}; "
                    f"training stopped, the last good checkpoint is kept at {last_path}"
                )
            loss.backward()
            opt.step()
            step += 1
            if ema is not None:
                ema.update(model)
            total += float(loss.detach()) * image.shape[0]
            count += image.shape[0]
        lr = opt.param_groups[0]["lr"]
        val_loss, val_metric = math.nan, math.nan
        if epoch % tcfg["val_every"] == 0 or epoch == tcfg["epochs"]:
            val_loss, val_metric = validate_epoch(
                eval_model, loss_fn, val_loader, plan, patch, device, icfg["sw_batch_size"],
                icfg["overlap"])
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss,
                        "val_metric": val_metric, "lr": lr, "seconds": round(seconds, 3)})
        improved = not math.isnan(val_metric) and val_metric > best_metric
        if improved:
            best_metric, best_epoch, bad_epochs = val_metric, epoch, 0
        elif not math.isnan(val_metric):
            bad_epochs += 1
        state = {**base, "state_dict": eval_model.state_dict(), "epoch": epoch,
                 "history": history, "best_metric": best_metric, "best_epoch": best_epoch,
                 "bad_epochs": bad_epochs, "train_seconds": train_seconds, "step": step}
        if tcfg["select"] == "last" or improved or not best_path.is_file():
            atomic_torch_save(best_path, state)
        resume = {"optimizer": opt.state_dict()}
        if ema is not None:
            resume.update(train_state_dict=model.state_dict(), ema=ema.state_dict())
        atomic_torch_save(last_path, {**state, **resume})
        atomic_write_text(model_dir / "history.csv", _history_csv(history))
        logger.info("%s/%s epoch %d: train loss %.4f, val %s %.4f (best %.4f @ %d), %.1fs",
                    dataset, model_name, epoch, total / max(count, 1), base["metric_name"],
                    val_metric, best_metric, best_epoch, seconds)
        if _EPOCH_SLEEP:  # test hook: widen the window in which a test kills training
            time.sleep(_EPOCH_SLEEP)
        if tcfg.get("max_minutes") and train_seconds >= 60 * tcfg["max_minutes"]:
            logger.info("%s/%s: time budget of %s min used after %d epochs", dataset,
                        model_name, tcfg["max_minutes"], epoch)
            break
        if tcfg["patience"] and bad_epochs >= tcfg["patience"]:
            logger.info("%s/%s: early stop after %d epochs without improvement",
                        dataset, model_name, bad_epochs)
            break
    else:
        if max_epochs is not None and stop_after < tcfg["epochs"]:
            return {"partial": True, "epoch": epoch}

    record = {
        "dataset": dataset, "model": model_name, "model_class": model_class(cfg, model_name),
        "task": task, "family": model.family, "params": n_params,
        "flops": estimate_flops(model.cpu(), in_channels, patch), "select": tcfg["select"],
        "checkpoint_epoch": len(history) if tcfg["select"] == "last" else best_epoch,
        "train_seconds": round(train_seconds, 3), "peak_memory_mb": round(peak_memory_mb(device), 1),
        "epochs": len(history), "best_epoch": best_epoch, "best_metric": best_metric,
        "metric_name": base["metric_name"], "seed": seed, "versions": base["versions"],
        "config_hash": chash, "checkpoint": "best.pt",
        "checkpoint_sha256": sha256_file(best_path), "device": str(device),
        "threads": n_threads, "patch_size": patch, "fold": fold,
    }
    atomic_write_json(model_dir / "train.json", record)
    return record
