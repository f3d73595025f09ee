"""What a segmenter saw: agreement of its evidence map with its final prediction.

The evidence map (:func:`capsmed.infer.engine.evidence_kind`) of a capsule segmenter is its class
capsules' lengths (coarse ones at their own resolution where the model has them); of a CNN its
softmax. For capsule models the share of voxels where the evidence's strongest class differs from the
final label says how often the capsules and the decoder's prediction disagree.
"""

from __future__ import annotations

import numpy as np


def evidence_disagreement(evidence: np.ndarray, pred: np.ndarray) -> float | None:
    """Share of voxels where the evidence's strongest class differs from the prediction.

    Counted over the voxels that either the evidence or the prediction marks as a structure (not
    background), so large empty backgrounds do not dilute it.

    Args:
        evidence: ``(C, *S)`` evidence per class (class 0 background).
        pred: ``(*S)`` final label map.

    Returns:
        The share in [0, 1], or None when neither marks any structure.
    """
    strongest = np.asarray(evidence).argmax(0)
    region = (strongest > 0) | (pred > 0)
    if not region.any():
        return None
    return round(float(np.mean(strongest[region] != pred[region])), 6)
