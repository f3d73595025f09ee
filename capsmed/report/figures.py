"""Matplotlib figures for reports, returned as ``data:image/png;base64`` URIs.

Figures are built with the object-oriented API (:class:`matplotlib.figure.Figure` rendered by the Agg
canvas), never through ``pyplot``, so no global backend or figure state is touched and nothing stays
open. Each function returns None when it has nothing to draw.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, MaxNLocator, NullFormatter

logger = logging.getLogger(__name__)

DPI = 90
#: Distinct label colours (label 1 gets the first), readable over grey images and in print.
LABEL_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                 "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324")
CAPSULE_COLOUR = "#d95f02"
CNN_COLOUR = "#1b9e77"


def label_colour(label: int) -> str:
    """The overlay colour of integer label ``label`` (>= 1)."""
    return LABEL_COLOURS[(int(label) - 1) % len(LABEL_COLOURS)]


def new_figure(width: float, height: float, left: float = 0.65, right: float = 0.15,
               top: float = 0.35, bottom: float = 0.55, wspace: float = 0.35,
               hspace: float = 0.35) -> Figure:
    """A ``width`` x ``height`` inch figure on an Agg canvas, with margins given in inches.

    Axes are placed by fixed margins rather than a layout engine: constrained layout doubles the
    cost of a figure, which adds up over thousands of study reports.
    """
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=min(left / width, 0.45), right=1 - min(right / width, 0.3),
                        top=1 - min(top / height, 0.4), bottom=min(bottom / height, 0.45),
                        wspace=wspace, hspace=hspace)
    return fig


def _text_inches(labels: Sequence[str], fontsize: float = 8) -> float:
    """Rough width in inches of the longest label at ``fontsize`` points."""
    longest = max((len(str(x)) for x in labels), default=0)
    return 0.55 * fontsize / 72 * longest


def to_data_uri(fig: Figure) -> str:
    """Render a figure to PNG and return it as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- training


def learning_curves(history: Mapping[str, Sequence[float]], best_epoch: float | None = None
                    ) -> str | None:
    """Loss, validation metrics and learning rate against epoch.

    Args:
        history: Columns of ``history.csv`` (``epoch``, ``train_loss``, ``val_loss``,
            ``val_<metric>``, ``lr``).
        best_epoch: Epoch of the best checkpoint, marked with a dashed line.

    Returns:
        PNG data URI, or None without an ``epoch`` column and at least one curve.
    """
    if "epoch" not in history or len(history["epoch"]) == 0:
        return None
    epoch = np.asarray(history["epoch"], dtype=float)
    losses = [c for c in ("train_loss", "val_loss") if c in history]
    metrics = [c for c in history if c.startswith("val_") and c != "val_loss"]
    lr = np.asarray(history["lr"], dtype=float) if "lr" in history else None
    show_lr = lr is not None and np.isfinite(lr).any() and np.nanmax(lr) > np.nanmin(lr)
    panels = [p for p in (losses, metrics) if p] + ([["lr"]] if show_lr else [])
    if not panels:
        return None
    fig = new_figure(3.6 * len(panels), 2.8, wspace=0.3)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    titles = {id(losses): "Loss", id(metrics): "Validation metrics"}
    for ax, cols in zip(axes, panels, strict=True):
        for col in cols:
            y = np.asarray(history[col], dtype=float)
            ax.plot(epoch, y, marker="." if epoch.size < 30 else None, label=col)
        if cols == ["lr"]:
            ax.set_title("Learning rate")
            ax.set_yscale("log" if np.nanmin(lr) > 0 else "linear")
        else:
            ax.set_title(titles.get(id(cols), ""))
            ax.legend(fontsize=7)
        if best_epoch is not None and np.isfinite(best_epoch):
            ax.axvline(best_epoch, color="0.4", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return to_data_uri(fig)


# ----------------------------------------------------------------------------- classification


def roc_figure(curves: Sequence[tuple[str, Sequence[float], Sequence[float], float]]) -> str | None:
    """ROC curves: one ``(name, fpr, tpr, auc)`` per class (one-vs-rest) or one for binary tasks."""
    if not curves:
        return None
    fig = new_figure(3.6, 3.4)
    ax = fig.subplots()
    for i, (name, fpr, tpr, auc) in enumerate(curves):
        label = f"{name} (AUC {auc:.3f})" if np.isfinite(auc) else name
        ax.plot(fpr, tpr, color=LABEL_COLOURS[i % len(LABEL_COLOURS)], label=label)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate",
           title="ROC")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return to_data_uri(fig)


def pr_figure(curves: Sequence[tuple[str, Sequence[float], Sequence[float], float, float]]
              ) -> str | None:
    """Precision-recall curves: ``(name, recall, precision, average_precision, prevalence)``."""
    if not curves:
        return None
    fig = new_figure(3.6, 3.4)
    ax = fig.subplots()
    for i, (name, recall, precision, ap, prevalence) in enumerate(curves):
        colour = LABEL_COLOURS[i % len(LABEL_COLOURS)]
        label = f"{name} (AP {ap:.3f})" if np.isfinite(ap) else name
        ax.plot(recall, precision, color=colour, label=label, drawstyle="steps-post")
        if np.isfinite(prevalence):
            ax.axhline(prevalence, color=colour, linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall", ylabel="Precision",
           title="Precision-recall (dotted: prevalence)")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return to_data_uri(fig)


def confusion_figure(matrix: np.ndarray, names: Sequence[str]) -> str | None:
    """Confusion matrix: counts in cells, colour = fraction of the true class (row)."""
    cm = np.asarray(matrix, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.size == 0:
        return None
    n = cm.shape[0]
    names = [str(x)[:18] for x in names] if len(names) == n else [str(i) for i in range(n)]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    size = min(2.6 + 0.45 * n, 9)
    label_in = _text_inches(names)
    fig = new_figure(size + 0.8 + label_in, size + label_in * (0.75 if n > 3 else 0.0),
                     left=0.55 + label_in, right=0.2, top=0.35,
                     bottom=0.55 + (label_in * 0.75 if n > 3 else 0.0))
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(n), names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center",
                  fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set(xlabel="Predicted class", ylabel="True class", title="Confusion matrix")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of true class", fraction=0.08, pad=0.04)
    return to_data_uri(fig)


def reliability_figure(bin_confidence: Sequence[float], bin_accuracy: Sequence[float],
                       bin_count: Sequence[float], ece: float | None = None) -> str | None:
    """Reliability diagram: accuracy against confidence per bin, with the case count per bin."""
    conf = np.asarray(bin_confidence, dtype=float)
    acc = np.asarray(bin_accuracy, dtype=float)
    cnt = np.asarray(bin_count, dtype=float)
    if conf.size == 0 or not (conf.size == acc.size == cnt.size):
        return None
    n = conf.size
    edges = np.linspace(0, 1, n + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = new_figure(3.6, 4.0, hspace=0.08)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ok = cnt > 0
    top.bar(centres[ok], np.nan_to_num(acc[ok]), width=1 / n, edgecolor="black", linewidth=0.5,
            color="#4363d8", alpha=0.8, label="accuracy")
    top.plot(np.nan_to_num(conf[ok]), np.nan_to_num(acc[ok]), "o", color="black", markersize=3,
             label="mean confidence")
    top.plot([0, 1], [0, 1], color="0.5", linestyle=":", label="perfect calibration")
    title = "Reliability diagram"
    if ece is not None and np.isfinite(ece):
        title += f" (ECE {ece:.3f})"
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy", title=title)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(centres, cnt, width=1 / n, color="0.5")
    bottom.set(xlabel="Confidence", ylabel="cases")
    return to_data_uri(fig)


# ----------------------------------------------------------------------------- segmentation


def box_figure(panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]]) -> str | None:
    """Box plots (with the cases as dots), one panel per ``(title, {group: values})``."""
    panels = [(t, {k: np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for k, v in g.items()})
              for t, g in panels if g]
    panels = [(t, g) for t, g in panels if any(v.size for v in g.values())]
    if not panels:
        return None
    fig = new_figure(3.4 * len(panels), 3.0, wspace=0.3)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, (title, groups) in zip(axes, panels, strict=True):
        names = list(groups)
        data = [groups[n] if groups[n].size else np.array([np.nan]) for n in names]
        ax.boxplot(data, showfliers=False, widths=0.5)
        for i, values in enumerate(data, start=1):
            ax.plot(i + rng.uniform(-0.12, 0.12, values.size), values, ".", color="#4363d8",
                    alpha=0.6, markersize=4)
        ax.set_xticks(range(1, len(names) + 1), [n[:16] for n in names], fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    return to_data_uri(fig)


def volume_agreement(pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> str | None:
    """Predicted against true structure volume (mL), one colour per label."""
    pairs = {k: (np.asarray(p, float), np.asarray(t, float)) for k, (p, t) in pairs.items()}
    pairs = {k: v for k, v in pairs.items() if np.isfinite(v[0]).any() and np.isfinite(v[1]).any()}
    if not pairs:
        return None
    fig = new_figure(3.6, 3.4)
    ax = fig.subplots()
    hi = 0.0
    for i, (name, (pred, true)) in enumerate(pairs.items()):
        ax.plot(true, pred, "o", color=LABEL_COLOURS[i % len(LABEL_COLOURS)], label=name,
                markersize=4, alpha=0.8)
        hi = max(hi, np.nanmax(pred), np.nanmax(true))
    hi = hi * 1.05 if hi > 0 else 1.0
    ax.plot([0, hi], [0, hi], color="0.5", linestyle=":")
    ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="True volume (mL)", ylabel="Predicted volume (mL)",
           title="Volume agreement")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return to_data_uri(fig)


@dataclass
class OverlayRow:
    """One row of an orthogonal-slice figure.

    Attributes:
        title: Row title (e.g. "Prediction", "Ground truth").
        overlay: ``(X, Y, Z)`` array in the image's display orientation, or None (image only).
        kind: ``"labels"`` (integer label map, coloured per label) or ``"heat"`` (continuous map,
            e.g. voxel uncertainty, drawn with a colour bar).
        vmax: Top of the colour scale of a ``"heat"`` row (default: the map's maximum), e.g. 1
            for probabilities, so that rows compare.
        heat_label: Colour-bar label of this ``"heat"`` row (default: the figure's).
    """

    title: str
    overlay: np.ndarray | None = None
    kind: str = "labels"
    vmax: float | None = None
    heat_label: str | None = None


def structure_centre(mask: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Slice indices through a structure: per axis, the slice with the most foreground voxels.

    Args:
        mask: ``(X, Y, Z)`` foreground mask (or label map; non-zero = foreground), or None.
        shape: Volume shape, used for the centre when there is no foreground.

    Returns:
        ``(i, j, k)`` slice indices.
    """
    shape = tuple(int(s) for s in shape[:3])
    if mask is None or not np.any(mask):
        return tuple(s // 2 for s in shape)  # type: ignore[return-value]
    fg = np.asarray(mask) > 0
    centre = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        centre.append(int(np.argmax(fg.sum(axis=other))))
    return tuple(centre)  # type: ignore[return-value]


def _views(shape: Sequence[int], spacing: Sequence[float], centre: Sequence[int]):
    """The display views ``(name, slicer, aspect, (left, right) letters)`` of a RAS volume."""
    sx, sy, sz = spacing
    i, j, k = centre
    axial = ("Axial", (slice(None), slice(None), k), sy / sx, ("L", "R"))
    if shape[2] <= 1:
        return [axial]
    sagittal = ("Sagittal", (i, slice(None), slice(None)), sz / sy, ("P", "A"))
    coronal = ("Coronal", (slice(None), j, slice(None)), sz / sx, ("L", "R"))
    return [sagittal, coronal, axial]


def _window(data: np.ndarray) -> tuple[float, float]:
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _label_rgba(labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgba = np.zeros((*labels.shape, 4), dtype=float)
    ids = np.unique(np.rint(labels[np.isfinite(labels)]).astype(int))
    for k in ids[ids > 0]:
        colour = np.array([int(label_colour(k)[p:p + 2], 16) / 255 for p in (1, 3, 5)])
        mask = np.rint(labels) == k
        rgba[mask, :3] = colour
        rgba[mask, 3] = alpha
    return rgba


def ortho_figure(image: np.ndarray | None, spacing: Sequence[float], rows: Sequence[OverlayRow],
                 centre: Sequence[int], label_names: Mapping[int, str] | None = None,
                 heat_label: str = "uncertainty") -> str | None:
    """Orthogonal slices (sagittal, coronal, axial; axial only for 2-D images) with overlays.

    Args:
        image: ``(X, Y, Z)`` grey image in RAS orientation, or None (overlays on black).
        spacing: Voxel size in mm per axis (sets the aspect ratio).
        rows: One row per overlay; each row repeats the image with its overlay.
        centre: Slice indices ``(i, j, k)``.
        label_names: Names of the integer labels, for the legend.
        heat_label: Colour-bar label of ``"heat"`` rows.

    Returns:
        PNG data URI, or None when there is neither an image nor an overlay.
    """
    arrays = [r.overlay for r in rows if r.overlay is not None]
    if image is None and not arrays:
        return None
    shape = image.shape if image is not None else arrays[0].shape
    base = image if image is not None else np.zeros(shape, dtype=np.float32)
    centre = [min(max(int(c), 0), s - 1) for c, s in zip(centre, shape, strict=True)]
    views = _views(shape, spacing, centre)
    lo, hi = _window(base)
    rows = list(rows) or [OverlayRow("Image")]
    has_heat = any(r.kind == "heat" and r.overlay is not None for r in rows)
    width, height = 2.4 * len(views) + 0.4 + (0.9 if has_heat else 0), 2.4 * len(rows) + 0.8
    fig = new_figure(width, height)
    fig.subplots_adjust(left=0.3 / width, right=1 - (1.0 if has_heat else 0.1) / width,
                        top=1 - 0.3 / height, bottom=0.5 / height, wspace=0.04, hspace=0.06)
    axes = fig.subplots(len(rows), len(views), squeeze=False)
    used_labels: set[int] = set()
    for r, row in enumerate(rows):
        overlay = row.overlay
        if overlay is not None and overlay.shape != tuple(shape):
            logger.warning("overlay %s has shape %s, image %s; drawn without the image",
                           row.title, overlay.shape, tuple(shape))
            row_base = np.zeros(overlay.shape, dtype=np.float32)
        else:
            row_base = base
        heat_im = None
        for c, (name, slicer, aspect, letters) in enumerate(views):
            ax = axes[r, c]
            ax.imshow(row_base[slicer].T, cmap="gray", origin="lower", vmin=lo, vmax=hi,
                      aspect=aspect, interpolation="nearest")
            if overlay is not None:
                sl = overlay[slicer].T
                if row.kind == "heat":
                    finite = overlay[np.isfinite(overlay)]
                    vmax = row.vmax if row.vmax is not None else (
                        float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
                    masked = np.ma.masked_where(~np.isfinite(sl) | (sl <= 0), sl)
                    heat_im = ax.imshow(masked, cmap="magma", origin="lower", vmin=0, vmax=vmax,
                                        alpha=0.75, aspect=aspect, interpolation="nearest")
                else:
                    ax.imshow(_label_rgba(sl), origin="lower", aspect=aspect,
                              interpolation="nearest")
                    ids = np.unique(np.rint(sl[np.isfinite(sl)]).astype(int))
                    used_labels.update(int(k) for k in ids if k > 0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.02, 0.5, letters[0], transform=ax.transAxes, color="yellow", fontsize=7,
                    va="center")
            ax.text(0.98, 0.5, letters[1], transform=ax.transAxes, color="yellow", fontsize=7,
                    va="center", ha="right")
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(row.title, fontsize=9)
        if heat_im is not None:
            box = axes[r, -1].get_position()
            cax = fig.add_axes((box.x1 + 0.15 / width, box.y0 + 0.1 * box.height,
                                0.12 / width, 0.8 * box.height))
            fig.colorbar(heat_im, cax=cax, label=row.heat_label or heat_label)
    if used_labels:
        names = label_names or {}
        handles = [Patch(color=label_colour(k), label=str(names.get(k, f"label {k}"))[:24])
                   for k in sorted(used_labels)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4),
                   fontsize=8, frameon=False, borderaxespad=0.2)
    return to_data_uri(fig)


def array_slices(arrays: Sequence[tuple[str, np.ndarray]]) -> str | None:
    """Middle slices of raw arrays (input and capsule reconstruction), side by side.

    Args:
        arrays: ``(title, array)`` pairs; arrays are ``(*S)`` or ``(C, *S)`` with ``S`` 2-D or 3-D
            (the first channel is shown; 3-D arrays show their middle slice along the last axis).

    Returns:
        PNG data URI, or None when no array is drawable.
    """
    panels = []
    for title, arr in arrays:
        a = np.asarray(arr, dtype=float)
        while a.ndim > 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim == 4:
            a = a[0]
        if a.ndim == 3:
            a = a[:, :, a.shape[2] // 2]
        if a.ndim != 2:
            continue
        panels.append((title, a))
    if not panels:
        return None
    fig = new_figure(2.4 * len(panels), 2.6)
    fig.subplots_adjust(left=0.03, right=0.97, top=0.88, bottom=0.03, wspace=0.06)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, a) in zip(axes, panels, strict=True):
        lo, hi = _window(a)
        ax.imshow(a.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return to_data_uri(fig)


def pose_effects(panel: np.ndarray, centre: int) -> np.ndarray:
    """How much moving each pose dimension changes the reconstruction.

    Args:
        panel: ``(D, steps, *S)`` reconstructions (dimension, offset).
        centre: The column of the unmoved capsule (offset 0).

    Returns:
        ``(D,)``: the mean absolute change from the unmoved reconstruction over offsets and
        pixels.
    """
    p = np.asarray(panel, dtype=np.float64)
    diff = np.abs(p - p[:, centre:centre + 1])
    return diff.reshape(p.shape[0], -1).mean(axis=1)


def pose_grid(panel: np.ndarray, order: Sequence[int], steps: Sequence[float],
              effects: Sequence[float]) -> str | None:
    """Sabour et al. (2017) figure 4: reconstructions as each pose dimension is moved.

    Args:
        panel: ``(D, steps, H, W)`` reconstructions.
        order: Dimensions in the order of the rows (largest effect first).
        steps: The offset of each column.
        effects: Effect per dimension (shown beside each row).

    Returns:
        PNG data URI, or None when the panel is not 2-D images.
    """
    p = np.asarray(panel, dtype=float)
    if p.ndim != 4 or not len(order):
        return None
    lo, hi = float(np.nanmin(p)), float(np.nanmax(p))
    hi = hi if hi > lo else lo + 1.0
    cell = 0.55
    width, height = cell * len(steps) + 1.3, cell * len(order) + 0.6
    fig = new_figure(width, height)
    fig.subplots_adjust(left=1.2 / width, right=1 - 0.1 / width, top=1 - 0.45 / height,
                        bottom=0.1 / height, wspace=0.05, hspace=0.05)
    axes = fig.subplots(len(order), len(steps), squeeze=False)
    for r, d in enumerate(order):
        for c, step in enumerate(steps):
            ax = axes[r, c]
            ax.imshow(p[d, c].T, cmap="gray", origin="lower", vmin=lo, vmax=hi,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{step:+.2f}", fontsize=7)
        axes[r, 0].set_ylabel(f"dim {d}\n{effects[d]:.3g}", fontsize=7, rotation=0,
                              ha="right", va="center")
    return to_data_uri(fig)


# ----------------------------------------------------------------------------- comparison


@dataclass
class ModelPoint:
    """One model on the comparison plots.

    Attributes:
        name: Model name.
        capsule: True for capsule networks, False for CNN baselines.
        metric: Value of the primary metric (NaN when unknown).
        ci: 95% interval of the metric, or None.
        costs: ``{"params", "flops", "train_seconds", "inference_seconds_per_case",
            "peak_memory_mb"}``; missing values are NaN.
    """

    name: str
    capsule: bool
    metric: float
    ci: tuple[float, float] | None
    costs: Mapping[str, float]


_COST_AXES = (("params", "Parameters", True), ("flops", "FLOPs per forward pass", True),
              ("inference_seconds_per_case", "Inference time per case (s)", True))
_COST_BARS = (("params", "Parameters"), ("flops", "FLOPs per forward pass"),
              ("train_seconds", "Training time (s)"),
              ("inference_seconds_per_case", "Inference per case (s)"),
              ("peak_memory_mb", "Peak memory (MB)"))


def tradeoff_figure(points: Sequence[ModelPoint], metric_label: str) -> str | None:
    """Primary metric (with 95% CI bars) against parameters, FLOPs and inference time."""
    axes_spec = [spec for spec in _COST_AXES
                 if any(np.isfinite(p.costs.get(spec[0], np.nan)) and np.isfinite(p.metric)
                        for p in points)]
    if not axes_spec:
        return None
    fig = new_figure(3.4 * len(axes_spec), 3.4, bottom=0.95, wspace=0.08)
    axes = fig.subplots(1, len(axes_spec), squeeze=False, sharey=True)[0]
    for ax, (key, label, log) in zip(axes, axes_spec, strict=True):
        for p in points:
            x = p.costs.get(key, np.nan)
            if not (np.isfinite(x) and np.isfinite(p.metric)):
                continue
            colour = CAPSULE_COLOUR if p.capsule else CNN_COLOUR
            yerr = None
            if p.ci is not None and all(np.isfinite(p.ci)):
                yerr = [[max(p.metric - p.ci[0], 0)], [max(p.ci[1] - p.metric, 0)]]
            ax.errorbar([x], [p.metric], yerr=yerr, fmt="o" if p.capsule else "s", color=colour,
                        capsize=3, markersize=6)
            ax.annotate(p.name, (x, p.metric), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.margins(x=0.25)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric_label)
    handles = [Patch(color=CAPSULE_COLOUR, label="capsule network"),
               Patch(color=CNN_COLOUR, label="CNN baseline")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    return to_data_uri(fig)


def cost_bars(points: Sequence[ModelPoint]) -> str | None:
    """Small multiples of horizontal bars: each cost per model, capsules and CNNs coloured apart."""
    specs = [s for s in _COST_BARS if any(np.isfinite(p.costs.get(s[0], np.nan)) for p in points)]
    if not specs or not points:
        return None
    label_in = _text_inches([p.name for p in points])
    fig = new_figure(2.3 * len(specs) + label_in, 0.9 + 0.35 * len(points), left=0.2 + label_in,
                     top=0.3, bottom=0.35, wspace=0.12)
    axes = fig.subplots(1, len(specs), squeeze=False, sharey=True)[0]
    y = np.arange(len(points))
    for ax, (key, label) in zip(axes, specs, strict=True):
        vals = np.array([p.costs.get(key, np.nan) for p in points], dtype=float)
        colours = [CAPSULE_COLOUR if p.capsule else CNN_COLOUR for p in points]
        ax.barh(y, np.nan_to_num(vals), color=colours)
        ax.set_title(label, fontsize=9)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [p.name for p in points], fontsize=8)
    axes[0].invert_yaxis()
    return to_data_uri(fig)


# ----------------------------------------------------------------------------- QC


def distribution_figure(title: str, series: Mapping[str, Sequence[float]], xlabel: str
                        ) -> str | None:
    """Histograms, one panel per named series (e.g. spacing along each axis)."""
    series = {k: np.asarray(v, dtype=float) for k, v in series.items()}
    series = {k: v[np.isfinite(v)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v.size}
    if not series:
        return None
    fig = new_figure(3.0 * len(series), 2.8, top=0.55, wspace=0.3)
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        bins = min(20, max(1, np.unique(values).size))
        ax.hist(values, bins=bins, color="#4363d8", edgecolor="white")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cases")
    fig.suptitle(title, fontsize=10)
    return to_data_uri(fig)


def count_bars(counts: Mapping[str, float], title: str, xlabel: str = "count") -> str | None:
    """Horizontal bars of counts per label or class, with the share of the total."""
    if not counts:
        return None
    names = list(counts)
    vals = np.array([counts[n] for n in names], dtype=float)
    total = np.nansum(vals)
    label_in = _text_inches([n[:24] for n in names])
    fig = new_figure(4.5 + label_in, 1.0 + 0.32 * len(names), left=0.25 + label_in, bottom=0.5)
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(vals), color=[LABEL_COLOURS[i % len(LABEL_COLOURS)]
                                           for i in range(len(names))])
    for i, v in enumerate(vals):
        share = f" ({100 * v / total:.1f}%)" if total > 0 else ""
        ax.text(np.nan_to_num(v), i, f" {v:,.0f}{share}", va="center", fontsize=8)
    ax.set_yticks(y, [n[:24] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, (np.nanmax(vals) if np.isfinite(vals).any() else 1) * 1.45 or 1)
    ax.set(xlabel=xlabel, title=title)
    return to_data_uri(fig)


# ----------------------------------------------------------------------------- generalisation


@dataclass
class Curve:
    """One model's values along an x axis (severity, training fraction), with a 95% band.

    Attributes:
        name: Model name.
        capsule: True for capsule networks (circles, solid line), False otherwise (squares,
            dashed line).
        x: Positions ``(N,)``.
        y: Values ``(N,)`` (NaN where missing).
        lo: Lower ends of the 95% intervals ``(N,)`` (NaN where none).
        hi: Upper ends ``(N,)``.
    """

    name: str
    capsule: bool
    x: Sequence[float]
    y: Sequence[float]
    lo: Sequence[float]
    hi: Sequence[float]


def model_colour(index: int) -> str:
    """The colour of the ``index``-th model on the generalisation figures."""
    return LABEL_COLOURS[(index + 2) % len(LABEL_COLOURS)]


def curve_panels(panels: Sequence[tuple[str, Sequence[Curve]]], xlabel: str, ylabel: str,
                 xticks: Sequence[float] | None = None, columns: int = 4,
                 reference: str | None = None) -> str | None:
    """Small multiples of curves with 95% bands, one panel per ``(title, curves)``.

    Every model keeps its colour across panels; the legend below names them (and the
    ``reference`` model, drawn thicker).

    Args:
        panels: ``(title, curves)`` per panel (e.g. one per shift).
        xlabel: Label of the x axis.
        ylabel: Label of the y axis (shared).
        xticks: Tick positions (e.g. the severities), or None.
        columns: Panels per row.
        reference: The reference model's name, or None.

    Returns:
        PNG data URI, or None when no panel has a finite value.
    """
    panels = [(t, [c for c in curves if np.isfinite(np.asarray(c.y, float)).any()])
              for t, curves in panels]
    panels = [(t, c) for t, c in panels if c]
    if not panels:
        return None
    names = list(dict.fromkeys(c.name for _, curves in panels for c in curves))
    colours = {n: model_colour(i) for i, n in enumerate(names)}
    ncol = min(columns, len(panels))
    nrow = -(-len(panels) // ncol)
    fig = new_figure(2.6 * ncol + 0.5, 2.2 * nrow + 0.8, left=0.6, bottom=0.85, top=0.3,
                     wspace=0.12, hspace=0.45)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True)
    capsule = {}
    for i, (title, curves) in enumerate(panels):
        ax = axes[i // ncol, i % ncol]
        for c in curves:
            x, y = np.asarray(c.x, float), np.asarray(c.y, float)
            lo, hi = np.asarray(c.lo, float), np.asarray(c.hi, float)
            colour = colours[c.name]
            capsule[c.name] = c.capsule
            band = np.isfinite(lo) & np.isfinite(hi)
            if band.sum() >= 2:
                ax.fill_between(x[band], lo[band], hi[band], color=colour, alpha=0.15,
                                linewidth=0)
            ok = np.isfinite(y)  # a missing value leaves a point out, not a gap in the line
            ax.plot(x[ok], y[ok], marker="o" if c.capsule else "s", markersize=4, color=colour,
                    linestyle="-" if c.capsule else "--",
                    linewidth=2.2 if c.name == reference else 1.3)
        ax.set_title(title[:40], fontsize=9)
        if xticks is not None:
            ax.set_xticks(list(xticks))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i // ncol == nrow - 1 or i + ncol >= len(panels):
            ax.set_xlabel(xlabel, fontsize=8)
    for i in range(len(panels), nrow * ncol):
        axes[i // ncol, i % ncol].set_visible(False)
    for r in range(nrow):
        axes[r, 0].set_ylabel(ylabel, fontsize=8)
    handles = [Patch(color=colours[n], label=n + (" (reference)" if n == reference else "")
                     + (", capsule" if capsule.get(n) else "")) for n in names]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8,
               frameon=False)
    return to_data_uri(fig)


@dataclass
class GalleryPanel:
    """One image of the shift gallery.

    Attributes:
        title: Panel title (e.g. ``severity 3``).
        image: ``(X, Y)`` middle slice.
        label: ``(X, Y)`` true label map (segmentation), or None.
        prediction: ``(X, Y)`` predicted label map (segmentation), or None.
        text: Lines written under the image (e.g. the predicted probability), or empty.
    """

    title: str
    image: np.ndarray
    label: np.ndarray | None = None
    prediction: np.ndarray | None = None
    text: Sequence[str] = ()


def _outline(ax: Any, labels: np.ndarray, colour_of: Callable[[int], str], linestyle: str,
             linewidth: float) -> None:
    """Contours of every non-zero label of ``labels`` (``(X, Y)``, drawn transposed)."""
    lab = np.rint(np.asarray(labels, dtype=float))
    for k in np.unique(lab[np.isfinite(lab)]).astype(int):
        if k <= 0:
            continue
        mask = (lab == k).astype(float).T
        if mask.min() == mask.max():
            continue
        ax.contour(mask, levels=[0.5], colors=[colour_of(k)], linewidths=linewidth,
                   linestyles=linestyle, origin="lower")


def shift_gallery(rows: Sequence[tuple[str, Sequence[GalleryPanel]]]) -> str | None:
    """A grid of images, one row per ``(row title, panels)`` (a model, or the shifted image).

    Segmentation panels fill the prediction in the label colours and outline the true labels in
    white; classification panels print their ``text`` under the image.

    Returns:
        PNG data URI, or None without a panel.
    """
    rows = [(t, list(p)) for t, p in rows if p]
    if not rows:
        return None
    ncol = max(len(p) for _, p in rows)
    lines = max((len(panel.text) for _, p in rows for panel in p), default=0)
    cell = 1.45
    text_h = 0.16 * lines
    width, height = cell * ncol + 0.4, (cell + text_h + 0.25) * len(rows) + 0.1
    fig = new_figure(width, height)
    fig.subplots_adjust(left=0.35 / width, right=1 - 0.05 / width, top=1 - 0.25 / height,
                        bottom=(0.05 + text_h) / height,
                        wspace=0.05, hspace=(0.3 + text_h) / cell)
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for r, (row_title, panels) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.set_visible(False)
                continue
            panel = panels[c]
            img = np.asarray(panel.image, dtype=float)
            lo, hi = _window(img)
            ax.imshow(img.T, cmap="gray", origin="lower", vmin=lo, vmax=hi,
                      interpolation="nearest")
            if panel.prediction is not None:
                ax.imshow(_label_rgba(np.asarray(panel.prediction, dtype=float).T, 0.5),
                          origin="lower", interpolation="nearest")
            if panel.label is not None:
                _outline(ax, panel.label, lambda k: "white", "solid", 0.7)
            ax.set_title(panel.title, fontsize=8)
            if panel.text:
                ax.text(0.5, -0.04, "\n".join(panel.text), transform=ax.transAxes, ha="center",
                        va="top", fontsize=7)
            if c == 0:
                ax.set_ylabel(row_title[:18], fontsize=8)
    return to_data_uri(fig)
