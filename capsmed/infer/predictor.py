"""One inference path: a trained model, its recorded settings, and the prediction of one study.

:class:`Predictor` is what ``capsmed evaluate`` (every stage, and the shifted stages) and
``capsmed predict`` call, and nothing else: it loads a checkpoint (:mod:`capsmed.infer.checkpoint`),
builds the deterministic preprocessing of its plan, and predicts a study with the result settings
of :mod:`capsmed.infer.settings` (sliding window, blending, test-time flips, largest-component
post-processing, precision), inverted to the study's original grid (:mod:`capsmed.infer.engine`).
The same checkpoint and settings therefore give the same prediction whichever command asks,
as nnU-Net's ``nnUNetPredictor.initialize_from_trained_model_folder`` reads what training left.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from capsmed.infer.checkpoint import build_model, load_checkpoint
from capsmed.infer.engine import (
    classification_flips,
    evidence_kind,
    predict_classification_case,
    predict_segmentation_case,
)
from capsmed.infer.runtime import select_device, sha256_file
from capsmed.infer.settings import (
    RUNTIME_KEYS,
    apply_overrides,
    check_settings,
    read_settings,
    result_settings,
)

logger = logging.getLogger(__name__)


class Predictor:
    """A trained model ready to predict studies with fixed inference settings.

    Args:
        checkpoint: ``best.pt`` (or any checkpoint) written by ``capsmed train``.
        settings: Inference settings (:mod:`capsmed.infer.settings`: result and run-time keys).
        device: ``auto``, ``cpu`` or ``cuda``, or a ``torch.device``.
        ckpt: The checkpoint already loaded (saves reading it twice).

    Attributes:
        ckpt: The checkpoint dict. plan, task, names: its plan, task and label or class names.
        model: The network in eval mode on ``device``. preprocess: the plan's transform.
        settings: The settings used. settings_source: where they came from.
        overrides: Command-line overrides that changed a recorded setting (provenance).
        evidence_kind: A segmenter's evidence map kind (``None`` for classifiers).
        label_codes: The labels' SNOMED CT codes recorded at training (or None).

    Raises:
        CapsmedError: Unreadable checkpoint or bad settings, naming the file.
    """

    def __init__(self, checkpoint: Path, settings: Mapping[str, Any], *,
                 device: str | torch.device = "auto", ckpt: dict[str, Any] | None = None) -> None:
        from capsmed.data.transforms import build_preprocess_transforms

        self.checkpoint = Path(checkpoint)
        self.ckpt = ckpt if ckpt is not None else load_checkpoint(self.checkpoint)
        self.settings = check_settings(settings, str(self.checkpoint))
        self.settings_source = "config"
        self.overrides: dict[str, Any] = {}
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.plan, self.task, self.names = self.ckpt["plan"], self.ckpt["task"], self.ckpt["names"]
        self.model = build_model(self.ckpt).to(self.device)
        self.preprocess = build_preprocess_transforms(self.plan)
        self.evidence_kind = evidence_kind(self.model) if self.task == "segmentation" else None
        self.label_codes = self.ckpt.get("label_codes")
        self._sha256: str | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, *, overrides: Mapping[str, Any] | None = None,
                        device: str | torch.device = "auto",
                        ckpt: dict[str, Any] | None = None) -> Predictor:
        """The predictor of a checkpoint with the settings recorded in its model folder.

        Args:
            checkpoint: A ``.pt`` file; ``inference.json`` beside it holds the settings.
            overrides: Settings given on the command line (``None`` values: not given); result
                settings that differ from the recorded ones are kept in :attr:`overrides`.
            device: Where to run.
            ckpt: The checkpoint already loaded.

        Returns:
            The predictor.
        """
        recorded, source = read_settings(Path(checkpoint))
        settings, changed = apply_overrides(recorded, overrides)
        for key, change in changed.items():
            logger.info("%s: inference setting %s = %r overrides the recorded %r", checkpoint, key,
                        change["used"], change["recorded"])
        predictor = cls(Path(checkpoint), settings, device=device, ckpt=ckpt)
        predictor.settings_source, predictor.overrides = source, changed
        return predictor

    @property
    def checkpoint_sha256(self) -> str:
        """SHA-256 of the checkpoint file (computed once)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.checkpoint)
        return self._sha256

    @property
    def result_settings(self) -> dict[str, Any]:
        """The settings that change a prediction (what the outputs' provenance records)."""
        return result_settings(self.settings)

    def provenance(self) -> dict[str, Any]:
        """Model, checkpoint, training record and inference settings of the predictions."""
        return {"model": self.ckpt["model"]["name"], "checkpoint": str(self.checkpoint),
                "checkpoint_sha256": self.checkpoint_sha256,
                "config_hash": self.ckpt.get("config_hash"), "seed": self.ckpt.get("seed"),
                "params": sum(p.numel() for p in self.model.parameters()),
                "versions": self.ckpt.get("versions", {}), "trained_on": self.ckpt.get("dataset"),
                "inference": self.result_settings, "inference_source": self.settings_source,
                "inference_overrides": self.overrides,
                **{k: self.settings[k] for k in RUNTIME_KEYS}}

    def predict(self, item: Mapping[str, Any], *, evidence: bool = True) -> dict[str, Any]:
        """Predict one study.

        Args:
            item: ``{"image": path, ...}`` (a NIfTI file or a DICOM series folder).
            evidence: Segmenters: also return the evidence and probability maps.

        Returns:
            :func:`capsmed.infer.engine.predict_segmentation_case`'s or
            :func:`capsmed.infer.engine.predict_classification_case`'s output.
        """
        if self.task == "segmentation":
            return predict_segmentation_case(self.model, dict(item), self.plan, self.preprocess,
                                             self.device, {**self.settings, "evidence": evidence})
        return predict_classification_case(self.model, dict(item), self.preprocess, self.device,
                                           classification_flips(self.plan, self.settings),
                                           self.settings["precision"])
