"""Inference: sliding-window segmentation mapped back to each study's geometry, and classification.

Segmentation runs MONAI ``sliding_window_inference`` on the preprocessed image, optionally averages
test-time flips (their spread is the per-voxel uncertainty), and maps the class probabilities back to
the original image grid with MONAI ``Invertd`` before the argmax, so a prediction has the input's shape
and affine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Test-time flips: none, then each spatial axis (dims counted with batch and channel)."""
    return [()] + [(2 + d,) for d in range(spatial_dims)]


def segment(model: torch.nn.Module, image: torch.Tensor, patch: list[int], *, overlap: float = 0.25,
            sw_batch_size: int = 2, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities of one preprocessed image by sliding windows.

    Args:
        model: A capsmed segmenter (``model(x)`` gives class scores, ``model.probabilities``).
        image: ``(1, C_in, *S)`` preprocessed image on the model's device.
        patch: Window size.
        overlap: Window overlap.
        sw_batch_size: Windows per forward pass.
        tta: Average over flips along each spatial axis.

    Returns:
        ``(probs, uncertainty)``: ``(1, C, *S)`` probabilities and, with ``tta``, the ``(1, 1, *S)``
        standard deviation over flips of the winning class's probability (else None).
    """
    from monai.inferers import sliding_window_inference

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return model.probabilities(model(x))

    runs = []
    flips = _flip_sets(image.ndim - 2) if tta else [()]
    with torch.no_grad():
        for dims in flips:
            x = torch.flip(image, dims) if dims else image
            p = sliding_window_inference(x, roi_size=patch, sw_batch_size=sw_batch_size,
                                         predictor=predictor, overlap=overlap, mode="gaussian")
            runs.append(torch.flip(p, dims) if dims else p)
    probs = torch.stack(runs).mean(0)
    uncertainty = None
    if tta:
        winner = probs.argmax(1, keepdim=True)
        per_run = torch.stack([r.gather(1, winner) for r in runs])
        uncertainty = per_run.std(0, unbiased=False)
    return probs.float(), uncertainty


def invert_to_original(data: dict, key: str, tensor: torch.Tensor, preprocess) -> torch.Tensor:
    """Map a ``(C, *S)`` tensor in preprocessed space back to the original image grid.

    Args:
        data: The preprocessed sample dict (its ``image`` MetaTensor carries the transform trace).
        key: Name to give the tensor in the dict.
        tensor: ``(C, *S)`` values aligned with ``data['image']``.
        preprocess: The deterministic, invertible transform that produced ``data``.

    Returns:
        ``(C, *S_orig)`` MetaTensor with the original affine.
    """
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    img = data["image"]
    data = dict(data)
    data[key] = MetaTensor(tensor.detach().cpu(), meta=dict(img.meta),
                           applied_operations=list(img.applied_operations))
    inv = Invertd(keys=key, transform=preprocess, orig_keys="image", nearest_interp=False)
    return inv(data)[key]


def original_affine(path: str) -> np.ndarray:
    """Affine of the original study (NIfTI header, or the DICOM geometry MONAI reads)."""
    p = Path(path)
    if p.is_file() and p.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return np.asarray(nib.load(str(p)).affine, dtype=np.float64)
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True)(str(p))
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


def predict_segmentation_case(model, item: dict, plan: dict, preprocess, device: torch.device,
                              inference: dict[str, Any]) -> dict[str, Any]:
    """Segment one study and map the result back to its original geometry.

    Args:
        model: Trained segmenter in eval mode on ``device``.
        item: ``{"image": path, ...}``.
        plan: Preprocessing plan (``patch_size`` used as the window).
        preprocess: Deterministic preprocessing transform.
        device: Device of the model.
        inference: ``overlap``, ``sw_batch_size``, ``tta``, ``largest_component``.

    Returns:
        ``{"pred": (*S_orig) uint8 label map, "uncertainty": (*S_orig) float32 or None,
        "affine": (4, 4)}``.
    """
    data = preprocess({k: v for k, v in item.items() if k in ("image",)})
    image = data["image"].unsqueeze(0).to(device)
    probs, unc = segment(model, image, plan["patch_size"], overlap=inference["overlap"],
                         sw_batch_size=inference["sw_batch_size"], tta=inference["tta"])
    probs_orig = invert_to_original(data, "pred", probs[0], preprocess)
    pred = probs_orig.argmax(0).cpu().numpy().astype(np.uint8)
    if inference.get("largest_component"):
        pred = keep_largest_components(pred, int(probs_orig.shape[0]))
    unc_orig = None
    if unc is not None:
        unc_orig = invert_to_original(data, "unc", unc[0], preprocess)[0].cpu().numpy()
    affine = original_affine(item["image"])
    return {"pred": pred, "uncertainty": unc_orig, "affine": affine}


def classification_tta_axes(plan: dict) -> list[int]:
    """Spatial axes (0-based) flipped for classification test-time augmentation.

    The axes the training augmentation flips: every axis, except the first (vertical) one of
    ultrasound, whose top-down geometry training keeps too (:mod:`capsmed.data.transforms`).
    """
    from capsmed.data.transforms import is_ultrasound

    dims = int(plan["spatial_dims"])
    return list(range(1, dims)) if is_ultrasound(plan) else list(range(dims))


def predict_classification_case(model, item: dict, preprocess, device: torch.device,
                                tta_axes: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """Classify one study.

    Args:
        model: Trained classifier in eval mode on ``device``.
        item: ``{"image": path, ...}``.
        preprocess: Deterministic preprocessing transform.
        device: Device of the model.
        tta_axes: spatial axes to flip for test-time augmentation (e.g.
            :func:`classification_tta_axes`): the probabilities are averaged over the image and
            its flip along each of them. Empty: one pass.

    Returns:
        ``{"probs": (C,), "lengths": (C,) or None, "reconstruction": (C_in, *S) or None}``;
        lengths and reconstruction come from the unflipped image.
    """
    data = preprocess({"image": item["image"]})
    image = data["image"].unsqueeze(0).to(device)
    with torch.no_grad():
        # one pass: scores, and for capsule networks the lengths and the reconstruction from the
        # longest capsule (what extra_outputs gives, without running the network twice)
        out = model.forward_train(image, None)
        runs = [model.probabilities(out["scores"])[0].float()]
        for axis in tta_axes:
            flipped = torch.flip(image, (axis + 2,))
            runs.append(model.probabilities(model(flipped))[0].float())
        probs = torch.stack(runs).mean(0).cpu().numpy()
    lengths = out.get("lengths")
    recon = out.get("reconstruction")
    return {
        "probs": probs,
        "lengths": None if lengths is None else lengths[0].float().cpu().numpy(),
        "reconstruction": None if recon is None else recon[0].float().cpu().numpy(),
    }
