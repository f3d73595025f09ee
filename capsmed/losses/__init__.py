"""Capsule losses (margin, spread, reconstruction) and ``build_loss``, which picks the training loss.

Dice and cross entropy come from MONAI (``monai.losses``).
"""

from capsmed.losses.factory import (
    LOSS_WEIGHT_KEYS,
    CapsuleClassificationLoss,
    CapsuleSegmentationLoss,
    ClassificationLoss,
    SegmentationLoss,
    SpreadClassificationLoss,
    build_loss,
)
from capsmed.losses.margin import MarginLoss, as_one_hot
from capsmed.losses.reconstruction import MaskedReconstructionLoss, ReconstructionLoss
from capsmed.losses.spread import SpreadLoss

__all__ = [
    "LOSS_WEIGHT_KEYS",
    "CapsuleClassificationLoss",
    "CapsuleSegmentationLoss",
    "ClassificationLoss",
    "MarginLoss",
    "MaskedReconstructionLoss",
    "ReconstructionLoss",
    "SegmentationLoss",
    "SpreadClassificationLoss",
    "SpreadLoss",
    "as_one_hot",
    "build_loss",
]
