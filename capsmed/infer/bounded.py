"""One study's segmentation in bounded memory: run-time settings from the budget, reduced outputs.

:func:`predict_bounded` is what :func:`capsmed.infer.engine.predict_segmentation_case` runs:

1. the need of the study is estimated from its header and the plan (:func:`memory_need_mb`), the
   run-time settings (band planes, windows per forward call, stitching device) are chosen to fit
   ``inference.memory_mb`` (:func:`runtime_settings`), and a study that cannot fit fails with one
   line naming the study, the need and the budget, before anything big is read;
2. the preprocessed image is segmented slab by slab (:func:`capsmed.infer.stream.stream_segment`),
   each finished slab reduced at once: the label map (uint8), the entropy of the mean (float32,
   with TTA), each pass's label map (uint8, with TTA), evidence and probability maps (float16
   on the 1/255 grid their files store, only when asked for). Where the plan resamples
   (``plan["spacing"]``), the mean probabilities are kept (float32) instead of the label map,
   since labels cannot be resampled;
3. the results are inverted to the original grid one map (one class) at a time with MONAI
   ``Invertd``: label maps by nearest neighbour where the plan does not resample (there the
   inversion only crops, pads, flips and transposes, so this is the argmax of the inverted
   probabilities), and the probabilities class by class, linearly, with a running argmax and
   entropy where it resamples (nnU-Net resamples probabilities, not labels).

What differs from the whole-volume reference
(:func:`capsmed.infer.engine.predict_segmentation_case_plain`): nothing in the label map; where
the plan resamples, each TTA pass's own label map (used only for the spread of the volumes) is
inverted by nearest neighbour instead of through its probabilities, and the entropy is summed in
float32 (differences of about 1e-7); the probability and evidence maps are float16 on the 1/255 grid
(:func:`on_file_grid`: the files hold uint8 over [0, 1] anyway, and get the same bytes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsmed.errors import CapsmedError
from capsmed.infer.stream import band_bytes, scan_interval, stream_segment
from capsmed.measures import normalised_entropy

logger = logging.getLogger(__name__)

#: Resident memory of the process before a study (Python, torch, MONAI, a small model), MB.
BASE_MB = 700
#: Activations held per window voxel by a forward pass, in float32 values (capsule segmenters at
#: the demo's widths; the largest of the models measured by ``benchmarks/bench_bigvolume.py``).
ACTIVATION_VALUES_PER_VOXEL = 96
#: Copies of the image alive at once while MONAI's loading and preprocessing run.
PREPROCESS_COPIES = 3


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(int(v) for v in shape))


def study_shape(path: str) -> tuple[list[int], list[float]] | None:
    """Shape and voxel sizes of a NIfTI study from its header (``None`` for a DICOM folder)."""
    p = Path(path)
    if not (p.is_file() and p.name.endswith((".nii", ".nii.gz"))):
        return None
    import nibabel as nib

    header = nib.load(str(p)).header
    return [int(v) for v in header.get_data_shape()], [float(v) for v in header.get_zooms()]


def memory_need_mb(orig_shape: Sequence[int], pre_shape: Sequence[int], *, in_channels: int,
                   n_classes: int, passes: int, evidence: bool, resample: bool,
                   roi: Sequence[int], slab: int, sw_batch_size: int) -> dict[str, float]:
    """Estimated peak memory of one study, by part, in MB.

    Args:
        orig_shape: Spatial shape of the study as stored.
        pre_shape: Spatial shape after preprocessing (the sliding window's image).
        in_channels: Image channels.
        n_classes: Classes including background.
        passes: Test-time passes.
        evidence: Whether evidence and probability maps are returned.
        resample: Whether the plan resamples (the probabilities are kept, not a label map).
        roi: Window size.
        slab: Band planes along the first axis.
        sw_batch_size: Windows per forward call.

    Returns:
        ``{"base", "preprocess", "image", "band", "windows", "reduced", "outputs", "inversion",
        "total"}`` in MB; ``total`` is the largest of the three phases (preprocess, sliding window,
        inversion) on top of ``base``.
    """
    mb = 1024.0 ** 2
    v_pre, v_orig = _prod(pre_shape), _prod(orig_shape)
    c = int(n_classes)
    image = in_channels * 4 * v_pre
    preprocess = PREPROCESS_COPIES * in_channels * 4 * max(v_pre, v_orig)
    channels = [c] * passes
    if evidence:
        channels[0] = 2 * c
    band = 1.1 * band_bytes(pre_shape, roi, channels, slab)  # a tenth more while a band shifts
    windows = sw_batch_size * _prod(roi) * 4 * (ACTIVATION_VALUES_PER_VOXEL + 2 * c + in_channels)
    per_voxel = (4 * c if resample else 1 + (4 if passes > 1 else 0)) + (passes if passes > 1
                                                                        else 0)
    per_voxel += 2 * 2 * c if evidence else 0
    reduced = per_voxel * v_pre
    out_per_voxel = 1 + (4 if passes > 1 else 0) + (2 * 2 * c if evidence else 0)
    outputs = out_per_voxel * v_orig
    # maps are inverted one class at a time and freed: the reduced maps turn into the outputs,
    # with one class in flight (float32, in both grids, twice while MONAI copies it)
    flight = 2 * 4 * (v_pre + v_orig) + (4 * 2 * v_orig if resample else 0)
    phases = [preprocess, image + band + windows + reduced, max(reduced, outputs) + flight]
    parts = {"base": BASE_MB, "preprocess": preprocess / mb, "image": image / mb,
             "band": band / mb, "windows": windows / mb, "reduced": reduced / mb,
             "outputs": outputs / mb, "inversion": flight / mb}
    parts["total"] = BASE_MB + max(phases) / mb
    return {k: round(float(v), 1) for k, v in parts.items()}


def runtime_settings(study: str, orig_shape: Sequence[int], pre_shape: Sequence[int], *,
                     roi: Sequence[int], overlap: float, budget_mb: float | None,
                     sw_batch_size: int, device: torch.device, **need: Any) -> dict[str, Any]:
    """Band planes, windows per call and stitching device for one study within the budget.

    The band is one window and one scan step deep (``roi[0] + step``), or one window deep when
    that does not fit; ``sw_batch_size`` is halved until the windows fit. The band is stitched
    on the model's GPU only when it takes under a quarter of the GPU's free memory, else on the
    host. These change memory and time only, never the result.

    Args:
        study: The study's path (named in the error).
        orig_shape: Spatial shape as stored.
        pre_shape: Spatial shape after preprocessing.
        roi: Window size.
        overlap: Window overlap.
        budget_mb: ``inference.memory_mb`` (``None``: no bound).
        sw_batch_size: The configured windows per call (an upper limit).
        device: The model's device.
        **need: :func:`memory_need_mb`'s other arguments.

    Returns:
        ``{"slab", "sw_batch_size", "stitch_device", "need_mb", "budget_mb"}``.

    Raises:
        CapsmedError: Even one window deep and one window per call, the study needs more than
            the budget.
    """
    roi = [int(v) for v in roi]
    step = scan_interval(pre_shape, roi, overlap)[0]
    slab = min(roi[0] + step, int(pre_shape[0]))
    batch = int(sw_batch_size)

    def estimate() -> dict[str, float]:
        return memory_need_mb(orig_shape, pre_shape, roi=roi, slab=slab, sw_batch_size=batch,
                              **need)

    est = estimate()
    if budget_mb is not None:
        while est["total"] > budget_mb and batch > 1:
            batch //= 2
            est = estimate()
        if est["total"] > budget_mb and slab > roi[0]:
            slab = roi[0]
            est = estimate()
        if est["total"] > budget_mb:
            raise CapsmedError(
                f"{study}: needs about {est['total']:.0f} MB to segment ({tuple(orig_shape)} "
                f"voxels, {tuple(pre_shape)} preprocessed) but inference.memory_mb is "
                f"{budget_mb:.0f} MB; raise the budget or predict it on a larger machine")
    stitch = torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if est["band"] * 1024 ** 2 < free / 4:
            stitch = device
    return {"slab": slab, "sw_batch_size": batch, "stitch_device": str(stitch),
            "need_mb": est["total"], "budget_mb": budget_mb}


def argmax_classes(probs: torch.Tensor) -> np.ndarray:
    """``(C, *S)`` -> ``(*S)`` uint8 index of the largest class, the first one on ties.

    ``torch.argmax`` over the leading axis of a big slab is slow on a CPU (a strided reduction);
    one comparison per class gives the same answer.
    """
    best = probs[0].clone()
    index = torch.zeros(probs.shape[1:], dtype=torch.uint8)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        index[better] = c
        torch.maximum(best, probs[c], out=best)
    return index.numpy()


def on_file_grid(values: np.ndarray) -> np.ndarray:
    """Maps in [0, 1] as float16 on the 1/255 grid their files store them on.

    Rounding float32 values to the grid first makes the stored bytes those the float32 values
    give (half precision alone would move values that differ by float rounding, such as the
    outputs of two window batch sizes, across a step of the grid).
    """
    return (np.rint(np.asarray(values, dtype=np.float32) * 255.0) / 255.0).astype(np.float16)


class _Reduced:
    """What the sink keeps of each finished slab (see the module docstring)."""

    def __init__(self, shape: Sequence[int], passes: int, resample: bool, keep_maps: bool) -> None:
        self.shape, self.resample, self.keep_maps = tuple(shape), resample, keep_maps
        self.label = None if resample else np.zeros(self.shape, np.uint8)
        self.unc = np.zeros(self.shape, np.float32) if passes > 1 and not resample else None
        self.pass_labels = np.zeros((passes, *self.shape), np.uint8) if passes > 1 else None
        self.probs: list[np.ndarray] | None = None  # one map per class, freed as inverted
        self.evidence: list[np.ndarray] | None = None
        self.n_classes = 0

    def __call__(self, z0: int, z1: int, mean: torch.Tensor, passes: list[torch.Tensor],
                 ev: torch.Tensor | None) -> None:
        m = mean.cpu()
        self.n_classes = int(m.shape[0])
        if self.resample or self.keep_maps:
            if self.probs is None:
                dtype = np.float32 if self.resample else np.float16
                self.probs = [np.zeros(self.shape, dtype) for _ in range(m.shape[0])]
            for c, arr in enumerate(self.probs):
                arr[z0:z1] = m[c].numpy() if self.resample else on_file_grid(m[c].numpy())
        if self.label is not None:
            self.label[z0:z1] = argmax_classes(m)
        if self.unc is not None:
            self.unc[z0:z1] = normalised_entropy(m.numpy())
        for k, p in enumerate(passes):
            self.pass_labels[k, z0:z1] = argmax_classes(p.cpu())
        if ev is not None:
            if self.evidence is None:
                self.evidence = [np.zeros(self.shape, np.float16) for _ in range(ev.shape[0])]
            for c, arr in enumerate(self.evidence):
                arr[z0:z1] = on_file_grid(ev[c].cpu().numpy())


def _invert_one(data: dict, array: np.ndarray, preprocess: Any, nearest: bool) -> np.ndarray:
    """One ``(*S)`` map in preprocessed space -> ``(*S_orig)`` ndarray of the same dtype."""
    from capsmed.infer.engine import invert_to_original

    inv = invert_to_original(data, "pred", torch.from_numpy(array[None]), preprocess,
                             nearest=nearest)
    return np.asarray(inv.detach().cpu().numpy()[0], dtype=array.dtype)


def _invert(data: dict, maps: list[np.ndarray], preprocess: Any, nearest: bool) -> np.ndarray:
    """Maps in preprocessed space -> ``(C, *S_orig)``, inverted and freed one at a time."""
    out = None
    for c in range(len(maps)):
        inv = _invert_one(data, maps[c], preprocess, nearest)
        maps[c] = None
        if out is None:
            out = np.empty((len(maps), *inv.shape), inv.dtype)
        out[c] = inv
    return out


def predict_bounded(model: torch.nn.Module, item: dict, plan: dict, preprocess: Any,
                    device: torch.device, inference: dict[str, Any], *,
                    flips: Sequence[tuple[int, ...]],
                    probabilities: Callable[[torch.Tensor], torch.Tensor],
                    with_evidence: Callable[[torch.Tensor], torch.Tensor],
                    autocast: Callable[[], Any],
                    finish_labels: Callable[[np.ndarray, int], np.ndarray],
                    affine: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """Segment one study in bounded memory (the outputs of ``predict_segmentation_case``).

    Args:
        model: The segmenter (only its parameters' count matters here; the callables run it).
        item: ``{"image": path, ...}``.
        plan: Preprocessing plan (``patch_size``, ``spacing``, ``num_classes``, ``in_channels``).
        preprocess: Deterministic preprocessing transform.
        device: The model's device.
        inference: Inference settings (``overlap``, ``mode``, ``sw_batch_size``, ``tta``,
            ``largest_component``, ``evidence``, ``memory_mb``).
        flips: Test-time flips, the unflipped pass first.
        probabilities: ``(B, C_in, *roi)`` -> ``(B, C, *roi)`` probabilities.
        with_evidence: ``(B, C_in, *roi)`` -> ``(B, 2C, *roi)`` probabilities then evidence.
        autocast: Context manager factory of the forward pass's precision.
        finish_labels: Post-processing of a label map ``(pred, n_classes)`` when
            ``largest_component``.
        affine: The original affine of a study path.

    Returns:
        See :func:`capsmed.infer.engine.predict_segmentation_case`.

    Raises:
        CapsmedError: The study does not fit ``inference["memory_mb"]``.
    """
    study = str(item["image"])
    roi = [int(v) for v in plan["patch_size"]]
    flips = list(flips or [()])
    resample = bool(plan.get("spacing"))
    evidence = bool(inference.get("evidence"))
    budget = inference.get("memory_mb")
    overlap = float(inference["overlap"])
    need = {"in_channels": int(plan.get("in_channels") or 1),
            "n_classes": int(plan.get("num_classes") or 2), "passes": len(flips),
            "evidence": evidence, "resample": resample}
    header = study_shape(study)
    if header is not None and budget is not None:  # fail before reading a study that cannot fit
        shape, zooms = header
        dims = len(roi)
        pre = list(shape[:dims])
        if resample:
            pre = [max(1, int(round(s * z / t))) for s, z, t in
                   zip(shape[:dims], zooms[:dims], plan["spacing"], strict=True)]
        pre = [max(p, r) for p, r in zip(pre, roi, strict=True)]
        runtime_settings(study, shape[:dims], pre, roi=roi, overlap=overlap, budget_mb=budget,
                         sw_batch_size=int(inference["sw_batch_size"]), device=device, **need)
    data = preprocess({k: v for k, v in item.items() if k in ("image",)})
    image = data["image"]
    pre_shape = [int(v) for v in image.shape[1:]]
    orig_shape = [int(v) for v in np.asarray(image.meta.get("spatial_shape", pre_shape))]
    need["in_channels"] = int(image.shape[0])
    run = runtime_settings(study, orig_shape, pre_shape, roi=roi, overlap=overlap,
                           budget_mb=budget, sw_batch_size=int(inference["sw_batch_size"]),
                           device=device, **need)
    stitch = torch.device(run["stitch_device"])

    def on_device(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        return lambda x: fn(x.to(device)).to(stitch)

    plain, evident = on_device(probabilities), on_device(with_evidence)  # one each: shared batches
    forwards = [evident if evidence and k == 0 and not axes else plain
                for k, axes in enumerate(flips)]
    reduced = _Reduced(pre_shape, len(flips), resample, evidence)
    res = stream_segment(forwards, image.as_tensor().unsqueeze(0).to(stitch), roi, reduced,
                         overlap=overlap, mode=inference.get("mode", "gaussian"), flips=flips,
                         sw_batch_size=run["sw_batch_size"], slab=run["slab"],
                         evidence_pass=0 if evidence and not flips[0] else None,
                         autocast=autocast)
    run.update(windows=res["windows"], skipped=res["skipped"])
    from monai.data import MetaTensor

    # the inversion reads only the image's metadata and transform trace: free its voxels
    data = dict(data)
    data["image"] = MetaTensor(torch.zeros(1), meta=dict(image.meta),
                               applied_operations=list(image.applied_operations))
    del image
    largest = bool(inference.get("largest_component"))

    def labels_of(label: np.ndarray, n: int) -> np.ndarray:
        return finish_labels(label, n) if largest else label

    unc = probs_out = None
    if resample:
        probs = reduced.probs
        reduced.probs = None
        n_classes = len(probs)
        pred = best = h = None
        for c in range(n_classes):
            pc = _invert_one(data, probs[c], preprocess, nearest=False)
            probs[c] = None
            if best is None:
                best, pred = pc.copy(), np.zeros(pc.shape, np.uint8)
            else:
                better = pc > best
                pred[better] = c
                np.maximum(best, pc, out=best)
            if reduced.pass_labels is not None:
                q = np.clip(pc, 1e-12, 1.0)
                h = -(q * np.log(q)) if h is None else h - q * np.log(q)
            if evidence:
                if probs_out is None:
                    probs_out = np.empty((n_classes, *pc.shape), np.float16)
                probs_out[c] = on_file_grid(pc)
        del best
        if h is not None:
            unc = (h / np.log(n_classes) if n_classes > 1 else np.zeros_like(h))
            unc = unc.clip(0.0, 1.0).astype(np.float32)
        pred = labels_of(pred, n_classes)
    else:
        n_classes = reduced.n_classes
        pred = _invert_one(data, reduced.label, preprocess, nearest=True)
        reduced.label = None
        if reduced.unc is not None:
            unc = _invert_one(data, reduced.unc, preprocess, nearest=True)
            reduced.unc = None
        if evidence:
            probs_out = _invert(data, reduced.probs, preprocess, nearest=True)
            reduced.probs = None
        pred = labels_of(pred, n_classes)
    counts = []
    if reduced.pass_labels is None:
        counts.append(np.bincount(pred.ravel(), minlength=n_classes)[:n_classes])
    else:
        for k in range(len(flips)):
            labels = _invert_one(data, reduced.pass_labels[k], preprocess, nearest=True)
            labels = labels_of(labels, n_classes)
            counts.append(np.bincount(labels.ravel(), minlength=n_classes)[:n_classes])
        reduced.pass_labels = None
    out = {"pred": pred, "uncertainty": unc, "pass_counts": np.stack(counts),
           "pass_seconds": res["seconds"], "affine": affine(study), "memory": run}
    if reduced.evidence is not None:
        out["evidence"] = _invert(data, reduced.evidence, preprocess, nearest=True)
        out["probs"] = probs_out
    logger.info("%s: segmented with %d of %d windows run per pass, band of %d planes, "
                "estimated need %.0f MB", study, res["windows"] - res["skipped"] // len(flips),
                res["windows"], run["slab"], run["need_mb"])
    return out
