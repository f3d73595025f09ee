"""The files a prediction leaves for its study page, beside its label map or probabilities.

One writer serves ``capsmed evaluate`` (test-stage studies) and ``capsmed predict`` (new studies),
so both kinds of study page show the same evidence and pose sections
(:mod:`capsmed.report.study` reads these files):

- segmenters: ``{stem}_evidence.nii.gz`` (capsule lengths, or a CNN's softmax) and
  ``{stem}_probs.nii.gz`` (the mean probabilities), channels last, uint8 over [0, 1];
- classifiers with a decoder: ``{stem}_recon.npy``, the reconstruction from the longest capsule,
  and ``{stem}_poses.npz``, the pose-perturbation panel of the winning capsule
  (``reconstructions`` ``(D, steps, *S)`` float16, first input channel, 3D inputs at their middle
  slice of the last axis; ``steps``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from capsmed.fileio import save_nifti


def save_segmentation_maps(out: dict[str, Any], folder: Path, stem: str) -> dict[str, Path]:
    """Write a segmentation's evidence and probability maps.

    Args:
        out: :func:`capsmed.infer.engine.predict_segmentation_case` output made with
            ``evidence``: ``evidence`` and ``probs`` ``(C, *S)`` in [0, 1], ``affine``.
        folder: Where the files go (created).
        stem: File name stem of the study.

    Returns:
        ``{"evidence": path, "probability_maps": path}``; empty when ``out`` has no evidence.
    """
    if out.get("evidence") is None:
        return {}
    paths = {}
    for key, suffix, maps in (("evidence", "_evidence", out["evidence"]),
                              ("probability_maps", "_probs", out["probs"])):
        paths[key] = Path(folder) / f"{stem}{suffix}.nii.gz"
        save_nifti(np.moveaxis(np.asarray(maps), 0, -1), paths[key], out["affine"],
                   dtype=np.uint8, slope=1 / 255)
    return paths


def save_classification_panels(out: dict[str, Any], folder: Path, stem: str) -> dict[str, Path]:
    """Write a capsule classifier's reconstruction and pose-perturbation panel.

    Args:
        out: :func:`capsmed.infer.engine.predict_classification_case` output:
            ``reconstruction`` ``(C_in, *S)`` and ``perturbation`` ``(D, steps, C_in, *S)``
            (either None for models without a decoder), ``perturbation_steps``.
        folder: Where the files go (created).
        stem: File name stem of the study.

    Returns:
        ``{"reconstruction": path, "pose_perturbation": path}`` for those the model has.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    if out.get("reconstruction") is not None:
        paths["reconstruction"] = folder / f"{stem}_recon.npy"
        np.save(paths["reconstruction"], np.asarray(out["reconstruction"], dtype=np.float32))
    if out.get("perturbation") is not None:
        panel = np.asarray(out["perturbation"])[:, :, 0]  # first channel: (D, steps, *S)
        if panel.ndim == 5:  # 3D: the middle slice of the last axis keeps the file small
            panel = panel[..., panel.shape[-1] // 2]
        paths["pose_perturbation"] = folder / f"{stem}_poses.npz"
        np.savez_compressed(paths["pose_perturbation"], reconstructions=panel.astype(np.float16),
                            steps=np.asarray(out["perturbation_steps"]))
    return paths
