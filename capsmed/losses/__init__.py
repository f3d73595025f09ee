"""Capsule losses (margin, reconstruction) and ``build_loss``, which picks a model's training loss.

Dice and cross entropy come from MONAI (``monai.losses``).
"""

from capsmed.losses.factory import (
    LOSS_WEIGHT_KEYS,
    CapsuleClassificationLoss,
    CapsuleSegmentationLoss,
    ClassificationLoss,
    SegmentationLoss,
    build_loss,
)
from capsmed.losses.margin import MarginLoss, as_one_hot
from capsmed.losses.reconstruction import MaskedReconstructionLoss, ReconstructionLoss

__all__ = [
    "LOSS_WEIGHT_KEYS",
    "CapsuleClassificationLoss",
    "CapsuleSegmentationLoss",
    "ClassificationLoss",
    "MarginLoss",
    "MaskedReconstructionLoss",
    "ReconstructionLoss",
    "SegmentationLoss",
    "as_one_hot",
    "build_loss",
]
