"""Inference: sliding-window segmentation mapped back to each study's geometry, and classification.

Segmentation runs MONAI ``sliding_window_inference`` on the preprocessed image, optionally averages
test-time flips (the normalised entropy of their mean probabilities is the per-voxel uncertainty, and
their separate label maps the spread of each structure's volume), and maps the class probabilities back
to the original image grid with MONAI ``Invertd`` before the argmax, so a prediction has the input's
shape and affine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsmed.measures import normalised_entropy

logger = logging.getLogger(__name__)


def evidence_kind(model: torch.nn.Module) -> str:
    """What a segmenter's evidence map is: ``"capsule lengths"`` or ``"softmax"`` (CNNs).

    Capsule segmenters with coarse class capsules (``has_coarse_capsules``: ``forward_train``
    returns ``"coarse_lengths"`` ``(B, C, *S/k)``) show those; capsule segmenters whose output is
    capsule lengths show their raw lengths; other models their softmax probabilities.
    """
    if getattr(model, "has_coarse_capsules", False) or getattr(model, "output_kind", "") == "lengths":
        return "capsule lengths"
    return "softmax"


def _evidence(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, evidence)`` of one window, both ``(B, C, *S)``.

    Coarse capsule lengths are repeated to the window's size (nearest neighbour), so the map keeps
    its own resolution as blocks of ``k`` voxels.
    """
    out = model.forward_train(x)
    probs = model.probabilities(out["scores"])
    if "coarse_lengths" in out:
        ev = torch.nn.functional.interpolate(out["coarse_lengths"], size=x.shape[2:],
                                             mode="nearest")
    elif getattr(model, "output_kind", "") == "lengths":
        ev = out["scores"]
    else:
        ev = probs
    return probs, ev


def _autocast(device: torch.device, precision: str):
    """The forward pass's arithmetic: float32 as it is, or bfloat16 autocast."""
    import contextlib

    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def segment(model: torch.nn.Module, image: torch.Tensor, patch: list[int], *, overlap: float = 0.25,
            sw_batch_size: int = 2, flips: list[tuple[int, ...]] | None = None,
            evidence: bool = False, mode: str = "gaussian",
            precision: str = "float32") -> dict[str, Any]:
    """Class probabilities of one preprocessed image by sliding windows.

    Args:
        model: A capsmed segmenter (``model(x)`` gives class scores, ``model.probabilities``).
        image: ``(1, C_in, *S)`` preprocessed image on the model's device.
        patch: Window size.
        overlap: Window overlap.
        sw_batch_size: Windows per forward pass (memory and time only).
        flips: Test-time flips, one tuple of 0-based spatial axes per pass
            (:func:`capsmed.infer.settings.flip_sets`); ``None`` or ``[()]``: one pass.
        evidence: Also return the evidence map of the unflipped pass (see :func:`evidence_kind`).
        mode: Window blending, ``gaussian`` or ``constant`` (MONAI ``sliding_window_inference``).
        precision: ``float32`` or ``bfloat16`` (autocast of the forward pass).

    Returns:
        ``{"probs", "passes", "seconds", "evidence"}``: the ``(1, C, *S)`` mean probabilities, the
        ``(1, C, *S)`` probabilities of each pass (flipped back; only with several passes, else
        empty), the wall-clock seconds of each pass, and the ``(1, C, *S)`` evidence map (or None).
    """
    from monai.inferers import sliding_window_inference

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return model.probabilities(model(x)).float()

    def with_evidence(x: torch.Tensor) -> torch.Tensor:
        # one tensor, classes then evidence: MONAI blends tuple outputs unevenly
        return torch.cat(_evidence(model, x), dim=1).float()

    runs, seconds = [], []
    ev = None
    flips = list(flips or [()])
    with torch.no_grad(), _autocast(image.device, precision):
        for axes in flips:
            dims = tuple(2 + a for a in axes)
            t0 = time.perf_counter()
            x = torch.flip(image, dims) if dims else image
            want = evidence and not dims
            p = sliding_window_inference(x, roi_size=patch, sw_batch_size=sw_batch_size,
                                         predictor=with_evidence if want else predictor,
                                         overlap=overlap, mode=mode)
            if want:
                n = p.shape[1] // 2
                p, ev = p[:, :n], p[:, n:].float()
            runs.append((torch.flip(p, dims) if dims else p).float())
            if image.is_cuda:
                torch.cuda.synchronize(image.device)
            seconds.append(time.perf_counter() - t0)
    probs = torch.stack(runs).mean(0)
    return {"probs": probs, "passes": runs if len(runs) > 1 else [], "seconds": seconds,
            "evidence": ev}


def invert_to_original(data: dict, key: str, tensor: torch.Tensor, preprocess, *,
                       nearest: bool = False) -> torch.Tensor:
    """Map a ``(C, *S)`` tensor in preprocessed space back to the original image grid.

    Args:
        data: The preprocessed sample dict (its ``image`` MetaTensor carries the transform trace).
        key: Name to give the tensor in the dict.
        tensor: ``(C, *S)`` values aligned with ``data['image']``.
        preprocess: The deterministic, invertible transform that produced ``data``.
        nearest: Resample by nearest neighbour (keeps blocks of coarse maps) instead of linearly.

    Returns:
        ``(C, *S_orig)`` MetaTensor with the original affine.
    """
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    img = data["image"]
    data = dict(data)
    data[key] = MetaTensor(tensor.detach().cpu(), meta=dict(img.meta),
                           applied_operations=list(img.applied_operations))
    inv = Invertd(keys=key, transform=preprocess, orig_keys="image", nearest_interp=nearest)
    return inv(data)[key]


def original_affine(path: str) -> np.ndarray:
    """Affine of the original study (NIfTI header, or the DICOM geometry MONAI reads)."""
    p = Path(path)
    if p.is_file() and p.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return np.asarray(nib.load(str(p)).affine, dtype=np.float64)
    from capsmed.data.transforms import LoadPinnedImaged

    img = LoadPinnedImaged(keys="image", image_only=True)({"image": str(p)})["image"]
    return np.asarray(img.affine, dtype=np.float64)


def keep_largest_components(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep only the largest connected component of each foreground label.

    MONAI ``KeepLargestConnectedComponent`` on every label ``1 .. num_classes - 1`` independently,
    with full connectivity; removed voxels become background.

    Args:
        pred: label map ``(*S)``, integers in ``[0, num_classes)``.
        num_classes: number of classes including background.

    Returns:
        The cleaned label map, same shape and dtype.
    """
    from monai.transforms import KeepLargestConnectedComponent

    if num_classes < 2:
        return pred
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)),
                                         is_onehot=False, independent=True)
    out = keep(torch.as_tensor(pred[None].astype(np.int64)))
    return np.asarray(out[0]).astype(pred.dtype)


def segmentation_flips(spatial_dims: int, inference: dict[str, Any]) -> list[tuple[int, ...]]:
    """A segmenter's test-time flips: every spatial axis (``tta_flips``), or one pass without TTA."""
    from capsmed.infer.settings import flip_sets

    if not inference.get("tta"):
        return [()]
    return flip_sets(range(spatial_dims), inference.get("tta_flips", "axes"))


def predict_segmentation_case_plain(model, item: dict, plan: dict, preprocess,
                                    device: torch.device, inference: dict[str, Any],
                                    ) -> dict[str, Any]:
    """Segment one study with whole-volume buffers (the reference for the bounded path).

    MONAI ``sliding_window_inference`` over the whole image for every pass, every pass's map
    kept, the mean probabilities inverted with ``Invertd`` and only then the argmax: what
    :func:`predict_segmentation_case` replaced, kept as the reference that its tests and
    ``benchmarks/bench_bigvolume.py`` compare with. Memory grows with passes x classes x volume.

    With ``inference["tta"]`` the image is also segmented flipped (:func:`segmentation_flips`);
    the uncertainty map is the normalised entropy of the mean probabilities over these passes, and
    each pass's own label map, post-processed as the reported one, gives the spread of the
    structure volumes.

    Args:
        model: Trained segmenter in eval mode on ``device``.
        item: ``{"image": path, ...}``.
        plan: Preprocessing plan (``patch_size`` used as the window).
        preprocess: Deterministic preprocessing transform.
        device: Device of the model.
        inference: Settings (:mod:`capsmed.infer.settings`): ``overlap``, ``sw_batch_size``,
            ``tta``, ``largest_component``; optional ``tta_flips``, ``mode``, ``precision`` and
            ``evidence`` (bool).

    Returns:
        ``{"pred": (*S_orig) uint8 label map, "uncertainty": (*S_orig) float32 entropy in [0, 1]
        or None, "pass_counts": (passes, C) voxels of each class in each pass's label map (one row
        without TTA), "pass_seconds": seconds of each network pass, "affine": (4, 4)}``; with
        ``evidence`` also ``"evidence"`` and ``"probs"``, ``(C, *S_orig)`` float32: the evidence
        map of the unflipped pass (:func:`evidence_kind`; nearest-neighbour resampled) and the
        mean probabilities.
    """
    data = preprocess({k: v for k, v in item.items() if k in ("image",)})
    image = data["image"].unsqueeze(0).to(device)
    res = segment(model, image, plan["patch_size"], overlap=inference["overlap"],
                  sw_batch_size=inference["sw_batch_size"],
                  flips=segmentation_flips(image.ndim - 2, inference),
                  evidence=bool(inference.get("evidence")),
                  mode=inference.get("mode", "gaussian"),
                  precision=inference.get("precision", "float32"))
    probs_orig = invert_to_original(data, "pred", res["probs"][0], preprocess).cpu().numpy()
    n_classes = probs_orig.shape[0]

    def labels_of(probs: np.ndarray) -> np.ndarray:
        pred = probs.argmax(0).astype(np.uint8)
        if inference.get("largest_component"):
            pred = keep_largest_components(pred, n_classes)
        return pred

    pred = labels_of(probs_orig)
    unc_orig = normalised_entropy(probs_orig) if res["passes"] else None
    counts = []
    for run in res["passes"] or [None]:
        labels = pred if run is None else labels_of(invert_to_original(
            data, "pass", run[0], preprocess).cpu().numpy())
        counts.append(np.bincount(labels.ravel(), minlength=n_classes)[:n_classes])
    affine = original_affine(item["image"])
    out = {"pred": pred, "uncertainty": unc_orig, "pass_counts": np.stack(counts),
           "pass_seconds": res["seconds"], "affine": affine}
    if res["evidence"] is not None:
        out["evidence"] = invert_to_original(data, "evidence", res["evidence"][0], preprocess,
                                             nearest=True).cpu().numpy().astype(np.float32)
        out["probs"] = probs_orig.astype(np.float32)
    return out


def predict_segmentation_case(model, item: dict, plan: dict, preprocess, device: torch.device,
                              inference: dict[str, Any]) -> dict[str, Any]:
    """Segment one study in bounded memory and map the result back to its original geometry.

    The windows, weights and passes of :func:`predict_segmentation_case_plain`, stitched slab by
    slab (:func:`capsmed.infer.stream.stream_segment`) and reduced at once to what the outputs
    need (:mod:`capsmed.infer.bounded`); windows outside the body are not run. Where the plan
    does not resample, the label map is the reference path's; where it resamples, the mean
    probabilities are inverted one class at a time and the label map is again their argmax.
    ``inference["memory_mb"]`` (optional) bounds the need: a study that cannot fit fails first.

    With ``inference["tta"]`` the image is also segmented flipped (:func:`segmentation_flips`);
    the uncertainty map is the normalised entropy of the mean probabilities over these passes, and
    each pass's own label map, post-processed as the reported one, gives the spread of the
    structure volumes.

    Args:
        model: Trained segmenter in eval mode on ``device``.
        item: ``{"image": path, ...}``.
        plan: Preprocessing plan (``patch_size`` used as the window).
        preprocess: Deterministic preprocessing transform.
        device: Device of the model.
        inference: Settings (:mod:`capsmed.infer.settings`): ``overlap``, ``sw_batch_size``,
            ``tta``, ``largest_component``; optional ``tta_flips``, ``mode``, ``precision``,
            ``memory_mb`` and ``evidence`` (bool).

    Returns:
        ``{"pred": (*S_orig) uint8 label map, "uncertainty": (*S_orig) float32 entropy in [0, 1]
        or None, "pass_counts": (passes, C) voxels of each class in each pass's label map (one row
        without TTA), "pass_seconds": seconds of each network pass, "affine": (4, 4),
        "memory": the run-time settings and the estimated need}``; with ``evidence`` also
        ``"evidence"`` and ``"probs"``, ``(C, *S_orig)`` float16 on the 1/255 grid of their
        files: the evidence map of the unflipped pass (:func:`evidence_kind`; nearest-neighbour
        resampled) and the mean probabilities.

    Raises:
        CapsmedError: The study needs more than ``memory_mb``, naming it, the need and the budget.
    """
    from capsmed.infer.bounded import predict_bounded

    return predict_bounded(model, item, plan, preprocess, device, inference,
                           flips=segmentation_flips(len(plan["patch_size"]), inference),
                           probabilities=lambda x: model.probabilities(model(x)).float(),
                           with_evidence=lambda x: torch.cat(_evidence(model, x), dim=1).float(),
                           autocast=lambda: _autocast(device, inference.get("precision",
                                                                            "float32")),
                           finish_labels=keep_largest_components,
                           affine=original_affine)


#: Pose perturbation in the manner of Sabour et al. (2017), figure 4: each dimension of the winning
#: class capsule moved in steps of 0.05 over [-0.25, 0.25].
POSE_STEPS = tuple(round(-0.25 + 0.05 * i, 2) for i in range(11))


def pose_perturbation(decoder: torch.nn.Module, poses: torch.Tensor, index: int,
                      steps: tuple[float, ...] = POSE_STEPS) -> torch.Tensor:
    """Decoder reconstructions as each pose dimension of one class capsule is moved.

    Args:
        decoder: ``decoder(poses (B, C, D), index (B,))`` -> ``(B, C_in, *S)`` (the capsule
            classifiers' :class:`~capsmed.models.capsnet.CapsuleDecoder`).
        poses: ``(C, D)`` class capsules of one study.
        index: The class capsule to move (the winning one).
        steps: Offsets added to one dimension at a time.

    Returns:
        ``(D, len(steps), C_in, *S)`` reconstructions; row ``d``, column ``j`` has dimension ``d``
        moved by ``steps[j]``.
    """
    dims = poses.shape[-1]
    delta = torch.tensor(steps, dtype=poses.dtype, device=poses.device)
    batch = poses.unsqueeze(0).unsqueeze(0).repeat(dims, len(steps), 1, 1)  # (D, S, C, D)
    eye = torch.eye(dims, dtype=poses.dtype, device=poses.device)
    batch[:, :, index, :] += delta[None, :, None] * eye[:, None, :]
    flat = batch.reshape(dims * len(steps), *poses.shape)
    idx = torch.full((flat.shape[0],), int(index), dtype=torch.long, device=poses.device)
    with torch.no_grad():
        recon = decoder(flat, idx)
    return recon.reshape(dims, len(steps), *recon.shape[1:])


def classification_flips(plan: dict, inference: dict[str, Any]) -> list[tuple[int, ...]]:
    """A classifier's test-time flips: the axes of :func:`classification_tta_axes`.

    ``tta_flips: axes`` flips one axis at a time, ``mirror`` every combination of them; without
    ``tta`` one pass.
    """
    from capsmed.infer.settings import flip_sets

    if not inference.get("tta"):
        return [()]
    return flip_sets(classification_tta_axes(plan), inference.get("tta_flips", "axes"))


def classification_tta_axes(plan: dict) -> list[int]:
    """Spatial axes (0-based) flipped for classification test-time augmentation.

    The axes the training augmentation flips: every axis, except the first (vertical) one of
    ultrasound, whose top-down geometry training keeps too (:mod:`capsmed.data.transforms`).
    """
    from capsmed.data.transforms import is_ultrasound

    dims = int(plan["spatial_dims"])
    return list(range(1, dims)) if is_ultrasound(plan) else list(range(dims))


def predict_classification_case(model, item: dict, preprocess, device: torch.device,
                                flips: list[tuple[int, ...]] | None = None,
                                precision: str = "float32") -> dict[str, Any]:
    """Classify one study.

    Args:
        model: Trained classifier in eval mode on ``device``.
        item: ``{"image": path, ...}``.
        preprocess: Deterministic preprocessing transform.
        device: Device of the model.
        flips: Test-time flips (:func:`classification_flips`), one tuple of 0-based spatial axes
            per pass, the unflipped pass first: the probabilities are averaged over them.
            ``None``: one pass.
        precision: ``float32`` or ``bfloat16`` (autocast of the forward pass).

    Returns:
        ``{"probs": (C,), "lengths": (C,) or None, "reconstruction": (C_in, *S) or None,
        "perturbation": (D, steps, C_in, *S) or None, "perturbation_steps"}``; the perturbation
        (capsule classifiers with a decoder) moves each pose dimension of the winning capsule by
        each of ``perturbation_steps`` (:data:`POSE_STEPS`).
        Lengths and reconstruction come from the unflipped image.
    """
    data = preprocess({"image": item["image"]})
    image = data["image"].unsqueeze(0).to(device)
    with torch.no_grad(), _autocast(device, precision):
        # one pass: scores, and for capsule networks the lengths and the reconstruction from the
        # longest capsule (what extra_outputs gives, without running the network twice)
        out = model.forward_train(image, None)
        runs = [model.probabilities(out["scores"])[0].float()]
        for axes in (flips or [()]):
            if axes:
                flipped = torch.flip(image, tuple(a + 2 for a in axes))
                runs.append(model.probabilities(model(flipped))[0].float())
        probs = torch.stack(runs).mean(0).cpu().numpy()
    lengths = out.get("lengths")
    recon = out.get("reconstruction")
    perturbation = None
    decoder = getattr(model, "decoder", None)
    if decoder is not None and out.get("poses") is not None and lengths is not None:
        winner = int(lengths[0].argmax())
        perturbation = pose_perturbation(decoder, out["poses"][0], winner).float().cpu().numpy()
    return {
        "probs": probs,
        "lengths": None if lengths is None else lengths[0].float().cpu().numpy(),
        "reconstruction": None if recon is None else recon[0].float().cpu().numpy(),
        "perturbation": perturbation,
        "perturbation_steps": POSE_STEPS,
    }
