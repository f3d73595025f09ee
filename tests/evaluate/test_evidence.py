"""Disagreement of a capsule segmenter's evidence with its final prediction."""

import numpy as np

from capsmed.evaluate.evidence import evidence_disagreement


def test_evidence_disagreement_counts_structure_voxels_only():
    pred = np.zeros((10, 10), np.uint8)
    pred[2:6, 2:6] = 1  # 16 voxels
    evidence = np.zeros((3, 10, 10))
    evidence[0] = 0.5
    evidence[1, 2:6, 2:4] = 0.9  # agrees on 8 voxels
    evidence[2, 2:6, 4:6] = 0.9  # says class 2 on the other 8
    evidence[2, 8, 8] = 0.9  # and marks one voxel the prediction leaves empty
    assert evidence_disagreement(evidence, pred) == round(9 / 17, 6)
    assert evidence_disagreement(np.stack([np.ones((4, 4)), np.zeros((4, 4))]),
                                 np.zeros((4, 4), np.uint8)) is None
