"""``build_loss``: the training loss that fits a model's task and score kind.

Every loss built here is called as ``loss(outputs, target, image) -> scalar`` where ``outputs``
is the dictionary returned by ``model.forward_train(image, target)``. The weighted terms of the
last call are kept, detached, in ``loss.last_terms`` for logging.

Choices, per ``(model.task, model.output_kind)``:

- classification, logits: cross entropy (``ce_weight``).
- classification, capsule lengths: margin loss (``margin_weight``) plus, when the model has a
  decoder, the CapsNet reconstruction loss (``reconstruction_weight`` on the summed squared error).
- classification, matrix-capsule activations (models with ``class_loss = "spread"``, EM routing):
  the spread loss of Hinton et al. 2018 (``spread_weight``), margin from ``spread_m_min`` (0.2) to
  ``spread_m_max`` (0.9) with the elapsed fraction of training (``loss.set_progress``).
- segmentation, logits: MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)`` with
  ``lambda_dice=dice_weight`` and ``lambda_ce=ce_weight``; models with coarse class capsules
  (3D-UCaps) add the margin loss on those capsules against the area-downsampled one-hot label
  (``margin_weight``); models with a decoder add the masked reconstruction loss.
- segmentation, capsule lengths (SegCaps): MONAI ``DiceLoss(to_onehot_y=True)`` applied to the
  lengths as they are (``dice_weight``) plus the margin loss per voxel, averaged over voxels
  (``margin_weight``), plus the masked reconstruction loss. Why not DiceCE: cross entropy needs
  logits, and the logit of a capsule length, ``log(l / (1 - l))``, is unbounded where squash
  saturates (float32 lengths do reach 1.0) and treats the class lengths, which are independent
  presence scores, as if they competed in a softmax. The lengths already lie in [0, 1), so soft
  Dice can use them directly as per-class foreground probabilities (as SegCaps used its length as
  a sigmoid output in a BCE loss), and the margin loss is the capsule-native per-voxel
  classification term with bounded gradients. In a GPU check (SegCaps, synthetic 32^3 volumes,
  600 Adam steps) Dice + margin reached a validation Dice of 0.50, Dice alone 0.47 and margin
  alone 0.41. ``ce_weight`` is accepted and unused for such models.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from capsmed.layers.tensors import plain_tensor
from capsmed.losses.margin import MarginLoss, as_one_hot
from capsmed.losses.reconstruction import MaskedReconstructionLoss, ReconstructionLoss
from capsmed.losses.spread import SpreadLoss

if TYPE_CHECKING:  # pragma: no cover
    from capsmed.models.base import CapsmedModel

__all__ = [
    "LOSS_WEIGHT_KEYS",
    "CapsuleClassificationLoss",
    "CapsuleSegmentationLoss",
    "ClassificationLoss",
    "SegmentationLoss",
    "SpreadClassificationLoss",
    "build_loss",
]

logger = logging.getLogger(__name__)

#: Keyword arguments ``build_loss`` accepts, with the paper defaults used when a model gives none.
LOSS_WEIGHT_KEYS: dict[str, float] = {
    "margin_m_plus": 0.9,
    "margin_m_minus": 0.1,
    "margin_lambda": 0.5,
    "reconstruction_weight": 0.0005,
    "dice_weight": 1.0,
    "ce_weight": 1.0,
    "margin_weight": 1.0,
    "spread_m_min": 0.2,
    "spread_m_max": 0.9,
    "spread_weight": 1.0,
}


class _TermsLoss(nn.Module):
    """Base: sums named, already weighted terms and keeps them for logging."""

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, torch.Tensor] = {}

    def _total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        total = None
        for value in terms.values():
            total = value if total is None else total + value
        if total is None:  # pragma: no cover - every loss has at least one term
            raise RuntimeError("loss has no terms")
        return total

    def _set_capsule_weights(self, margin_weight: float, reconstruction: nn.Module | None) -> None:
        """Keep the margin-loss scale and the (already weighted) reconstruction loss or None."""
        self.margin_weight = margin_weight
        self.reconstruction = reconstruction

    def _add_reconstruction(
        self,
        terms: dict[str, torch.Tensor],
        outputs: dict[str, torch.Tensor],
        image: torch.Tensor,
        *label: torch.Tensor,
    ) -> None:
        """Add ``terms["reconstruction"]`` when the loss has a reconstruction term.

        Args:
            terms: the weighted terms so far, updated in place.
            outputs: model outputs with ``"reconstruction"`` ``(B, C_in, *S)``.
            image: input batch ``(B, C_in, *S)``, the reconstruction target.
            *label: label map ``(B, 1, *S)`` for masked reconstruction losses; none otherwise.

        Raises:
            ValueError: when the outputs lack ``"reconstruction"``.

        """
        if self.reconstruction is not None:
            terms["reconstruction"] = self.reconstruction(
                _require(outputs, "reconstruction"), plain_tensor(image), *label
            )


def _scores(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if "scores" not in outputs:
        raise ValueError(f"outputs must contain 'scores'; got keys {sorted(outputs)}")
    return plain_tensor(outputs["scores"])


def _require(outputs: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in outputs:
        raise ValueError(
            f"outputs must contain {key!r} for this loss (call model.forward_train); got keys "
            f"{sorted(outputs)}"
        )
    return plain_tensor(outputs[key])


def _class_indices(target: torch.Tensor, batch: int) -> torch.Tensor:
    """Class indices ``(B,)`` from ``(B,)`` or ``(B, 1)`` targets."""
    target = plain_tensor(target)
    if target.dim() == 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(
            f"classification target must be class indices of shape ({batch},); "
            f"got shape {tuple(target.shape)}"
        )
    return target.long()


def _label_map(target: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Label map ``(B, 1, *S)`` from ``(B, 1, *S)`` or ``(B, *S)`` targets."""
    target = plain_tensor(target)
    if target.dim() == scores.dim() - 1:
        target = target.unsqueeze(1)
    if target.dim() != scores.dim() or target.shape[1] != 1 or target.shape[2:] != scores.shape[2:]:
        raise ValueError(
            f"segmentation target shape {tuple(target.shape)} does not fit scores shape "
            f"{tuple(scores.shape)}: expected (B, 1, *S) or (B, *S) label map"
        )
    return target


class ClassificationLoss(_TermsLoss):
    """Cross entropy on class logits.

    Args:
        ce_weight: scale of the cross entropy.
        class_weights: per-class weights ``(C,)`` of the cross entropy (weighted mean), or None.

    """

    def __init__(self, ce_weight: float = 1.0, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.ce = nn.CrossEntropyLoss(weight=class_weights)

    def forward(
        self, outputs: dict[str, torch.Tensor], target: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            outputs: ``{"scores": logits (B, C), ...}``.
            target: class indices ``(B,)`` or ``(B, 1)``.
            image: input batch (unused).

        Returns:
            Scalar loss.

        """
        logits = _scores(outputs)
        indices = _class_indices(target, len(logits))
        return self._total({"ce": self.ce_weight * self.ce(logits, indices)})


class CapsuleClassificationLoss(_TermsLoss):
    """Margin loss on class-capsule lengths plus the CapsNet reconstruction loss.

    Args:
        margin: the margin loss (mean over the batch).
        margin_weight: scale of the margin loss.
        reconstruction: reconstruction loss, or None for models without a decoder or weight 0.
        class_weights: per-class weights ``(C,)``: the margin loss becomes the weighted mean
            ``sum_i w[y_i] L_i / sum_i w[y_i]`` (as cross entropy's ``weight``), or None.

    """

    def __init__(
        self,
        margin: MarginLoss,
        margin_weight: float = 1.0,
        reconstruction: ReconstructionLoss | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.margin = margin
        self._set_capsule_weights(margin_weight, reconstruction)
        self.register_buffer("class_weights", class_weights, persistent=False)
        # per-sample margin loss for the weighted mean, built once (not on every step)
        self.per_item = MarginLoss(margin.m_plus, margin.m_minus, margin.lambda_, "none")

    def forward(
        self, outputs: dict[str, torch.Tensor], target: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            outputs: ``{"scores": lengths (B, C), "reconstruction": (B, C_in, *S), ...}``.
            target: class indices ``(B,)`` / ``(B, 1)`` or one-hot ``(B, C)``.
            image: input batch ``(B, C_in, *S)``, the reconstruction target.

        Returns:
            Scalar loss.

        """
        lengths = _scores(outputs)
        target = plain_tensor(target)
        if target.dim() == 2 and target.shape[1] == 1 and lengths.shape[1] != 1:
            target = target[:, 0]
        if self.class_weights is None:
            margin = self.margin(lengths, target)
        else:
            per_item = self.per_item(lengths, target)  # (B,)
            w = (as_one_hot(target, lengths) * self.class_weights.to(lengths)).sum(dim=1)
            margin = (w * per_item).sum() / w.sum().clamp_min(1e-12)
        terms = {"margin": self.margin_weight * margin}
        self._add_reconstruction(terms, outputs, image)
        return self._total(terms)


class SpreadClassificationLoss(_TermsLoss):
    """Spread loss on class activations (matrix capsules, Hinton et al. 2018).

    Args:
        spread: the spread loss (its reduction is ignored: per-sample values are averaged here).
        spread_weight: scale of the loss.
        class_weights: per-class weights ``(C,)`` (weighted mean over the batch, as cross
            entropy's ``weight``), or None.

    """

    def __init__(self, spread: SpreadLoss, spread_weight: float = 1.0,
                 class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spread = spread
        self.spread_weight = spread_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def set_progress(self, progress: float) -> None:
        """Pass the elapsed fraction of training to the spread loss (anneals its margin)."""
        self.spread.set_progress(progress)

    def forward(
        self, outputs: dict[str, torch.Tensor], target: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            outputs: ``{"scores": activations (B, C), ...}``.
            target: class indices ``(B,)`` / ``(B, 1)`` or one-hot ``(B, C)``.
            image: input batch (unused).

        Returns:
            Scalar loss.

        """
        acts = _scores(outputs)
        target = plain_tensor(target)
        if target.dim() == 2 and target.shape[1] == 1 and acts.shape[1] != 1:
            target = target[:, 0]
        per_item = self.spread.forward_items(acts, target)
        if self.class_weights is None:
            value = per_item.mean()
        else:
            w = (as_one_hot(target, acts) * self.class_weights.to(acts)).sum(dim=1)
            value = (w * per_item).sum() / w.sum().clamp_min(1e-12)
        return self._total({"spread": self.spread_weight * value})


class SegmentationLoss(_TermsLoss):
    """MONAI Dice + cross entropy on segmentation logits, with optional capsule terms (3D-UCaps).

    Args:
        dice_weight: ``lambda_dice`` of MONAI ``DiceCELoss``.
        ce_weight: ``lambda_ce`` of MONAI ``DiceCELoss``.
        coarse_margin: margin loss on coarse class-capsule lengths ``outputs["coarse_lengths"]``
            against the one-hot label averaged down to their grid, or None.
        margin_weight: scale of ``coarse_margin``.
        reconstruction: masked reconstruction loss on ``outputs["reconstruction"]``, or None.

    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        coarse_margin: MarginLoss | None = None,
        margin_weight: float = 1.0,
        reconstruction: MaskedReconstructionLoss | None = None,
    ) -> None:
        super().__init__()
        self.dice_ce = DiceCELoss(
            to_onehot_y=True, softmax=True, lambda_dice=dice_weight, lambda_ce=ce_weight
        )
        self.coarse_margin = coarse_margin
        self._set_capsule_weights(margin_weight, reconstruction)

    def forward(
        self, outputs: dict[str, torch.Tensor], target: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            outputs: ``{"scores": logits (B, C, *S)}`` plus ``"coarse_lengths"`` ``(B, C, *S')`` and
                ``"reconstruction"`` ``(B, C_in, *S)`` where the model has them.
            target: label map ``(B, 1, *S)`` or ``(B, *S)``.
            image: input batch ``(B, C_in, *S)``.

        Returns:
            Scalar loss.

        """
        logits = _scores(outputs)
        label = _label_map(target, logits)
        terms = {"dice_ce": self.dice_ce(logits, label)}
        if self.coarse_margin is not None:
            coarse = _require(outputs, "coarse_lengths")
            one_hot = as_one_hot(label, logits)
            coarse_target = F.interpolate(one_hot, size=tuple(coarse.shape[2:]), mode="area")
            terms["margin"] = self.margin_weight * self.coarse_margin(coarse, coarse_target)
        self._add_reconstruction(terms, outputs, image, label)
        return self._total(terms)


class CapsuleSegmentationLoss(_TermsLoss):
    """Soft Dice on capsule lengths + per-voxel margin loss + masked reconstruction (SegCaps).

    See the module docstring for why lengths get Dice and margin loss rather than Dice-CE.

    Args:
        dice_weight: scale of MONAI ``DiceLoss(to_onehot_y=True)`` on the lengths.
        margin: margin loss (mean over batch and voxels).
        margin_weight: scale of the margin loss.
        reconstruction: masked reconstruction loss on ``outputs["reconstruction"]``, or None.

    """

    def __init__(
        self,
        dice_weight: float,
        margin: MarginLoss,
        margin_weight: float = 1.0,
        reconstruction: MaskedReconstructionLoss | None = None,
    ) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.dice = DiceLoss(to_onehot_y=True)
        self.margin = margin
        self._set_capsule_weights(margin_weight, reconstruction)

    def forward(
        self, outputs: dict[str, torch.Tensor], target: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            outputs: ``{"scores": lengths (B, C, *S), "reconstruction": (B, C_in, *S), ...}``.
            target: label map ``(B, 1, *S)`` or ``(B, *S)``.
            image: input batch ``(B, C_in, *S)``.

        Returns:
            Scalar loss.

        """
        lengths = _scores(outputs)
        label = _label_map(target, lengths)
        terms: dict[str, torch.Tensor] = {}
        if self.dice_weight > 0:
            terms["dice"] = self.dice_weight * self.dice(lengths, label)
        if self.margin_weight > 0:
            terms["margin"] = self.margin_weight * self.margin(lengths, label)
        self._add_reconstruction(terms, outputs, image, label)
        return self._total(terms)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite; got {value!r}")
    return float(value)


def _resolve_weights(model: CapsmedModel, weights: dict[str, Any]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(LOSS_WEIGHT_KEYS))
    if unknown:
        raise ValueError(
            f"unknown loss weight(s) {unknown}; known: {sorted(LOSS_WEIGHT_KEYS)}"
        )
    resolved = dict(LOSS_WEIGHT_KEYS)
    defaults = getattr(model, "loss_defaults", {}) or {}
    resolved.update({key: value for key, value in defaults.items() if key in LOSS_WEIGHT_KEYS})
    for key, value in weights.items():
        if value is not None:
            resolved[key] = _number(key, value)
    for key in ("reconstruction_weight", "dice_weight", "ce_weight", "margin_weight",
                "margin_lambda"):
        if resolved[key] < 0:
            raise ValueError(f"{key} must be >= 0; got {resolved[key]}")
    if not 0.0 < resolved["margin_m_plus"] <= 1.0:
        raise ValueError(f"margin_m_plus must lie in (0, 1]; got {resolved['margin_m_plus']}")
    if resolved["spread_weight"] < 0:
        raise ValueError(f"spread_weight must be >= 0; got {resolved['spread_weight']}")
    if not 0.0 < resolved["spread_m_min"] <= resolved["spread_m_max"] <= 1.0:
        raise ValueError(
            f"spread margins must satisfy 0 < spread_m_min <= spread_m_max <= 1; got "
            f"{resolved['spread_m_min']} and {resolved['spread_m_max']}"
        )
    if not 0.0 <= resolved["margin_m_minus"] < resolved["margin_m_plus"]:
        raise ValueError(
            f"margin_m_minus must lie in [0, margin_m_plus={resolved['margin_m_plus']}); "
            f"got {resolved['margin_m_minus']}"
        )
    return resolved


def build_loss(
    model: CapsmedModel, class_weights: torch.Tensor | None = None, **weights: Any
) -> nn.Module:
    """Build the training loss for ``model`` (see the module docstring for the choices).

    Args:
        model: a :class:`capsmed.models.base.CapsmedModel`; its ``task``, ``output_kind``,
            ``has_decoder``, ``has_coarse_capsules`` and ``loss_defaults`` (paper defaults of that
            model, e.g. SegCaps' reconstruction weight) decide the terms.
        **weights: optional overrides, any of ``margin_m_plus`` (0.9), ``margin_m_minus`` (0.1),
            ``margin_lambda`` (0.5), ``reconstruction_weight`` (0.0005 for CapsNet on 28^2 inputs,
            the model's default otherwise; 0 switches the term off), ``dice_weight`` (1),
            ``ce_weight`` (1), ``margin_weight`` (1; 0.1 for 3D-UCaps), ``spread_m_min`` (0.2),
            ``spread_m_max`` (0.9), ``spread_weight`` (1). ``None`` means the default.
            Weights that do not apply to the model are accepted and ignored, so that one config
            section can serve every model.
        class_weights: classification only: per-class weights ``(C,)`` of the cross entropy or
            margin loss (e.g. :func:`capsmed.train.recipe.balanced_class_weights`); ignored by
            segmentation losses.

    Returns:
        Module called as ``loss(outputs, target, image) -> scalar``.

    Raises:
        ValueError: for an unknown weight name, a value that is not a finite number, a negative
            weight, margins out of range, both Dice and CE weights 0 for a logits segmenter, or a
            model whose ``task`` / ``output_kind`` is not known.

    """
    task = getattr(model, "task", None)
    kind = getattr(model, "output_kind", None)
    if task not in ("classification", "segmentation"):
        raise ValueError(f"model task must be 'classification' or 'segmentation'; got {task!r}")
    if kind not in ("logits", "lengths"):
        raise ValueError(f"model output_kind must be 'logits' or 'lengths'; got {kind!r}")
    w = _resolve_weights(model, weights)
    has_decoder = bool(getattr(model, "has_decoder", False))
    name = type(model).__name__

    def margin(reduction: str = "mean") -> MarginLoss:
        return MarginLoss(w["margin_m_plus"], w["margin_m_minus"], w["margin_lambda"], reduction)

    region = (getattr(model, "loss_defaults", {}) or {}).get("reconstruction_region", "all")
    masked_recon = None
    if has_decoder and w["reconstruction_weight"] > 0:
        masked_recon = MaskedReconstructionLoss(w["reconstruction_weight"], region=region)

    if task == "classification" and kind == "logits":
        loss: nn.Module = ClassificationLoss(w["ce_weight"], class_weights)
    elif task == "classification" and getattr(model, "class_loss", "margin") == "spread":
        loss = SpreadClassificationLoss(
            SpreadLoss(w["spread_m_min"], w["spread_m_max"]), w["spread_weight"], class_weights
        )
    elif task == "classification":
        recon = None
        if has_decoder and w["reconstruction_weight"] > 0:
            recon = ReconstructionLoss(w["reconstruction_weight"])
        loss = CapsuleClassificationLoss(margin(), w["margin_weight"], recon, class_weights)
    elif kind == "logits":
        if w["dice_weight"] == 0 and w["ce_weight"] == 0:
            raise ValueError(
                "dice_weight and ce_weight must not both be 0 for a segmentation model"
            )
        coarse = bool(getattr(model, "has_coarse_capsules", False)) and w["margin_weight"] > 0
        loss = SegmentationLoss(
            w["dice_weight"], w["ce_weight"], margin() if coarse else None, w["margin_weight"],
            masked_recon,
        )
    else:
        if w["dice_weight"] == 0 and w["margin_weight"] == 0:
            raise ValueError(
                "dice_weight and margin_weight must not both be 0 for a capsule segmentation model"
            )
        loss = CapsuleSegmentationLoss(w["dice_weight"], margin(), w["margin_weight"], masked_recon)
    logger.debug("loss for %s: %s", name, loss)
    return loss
