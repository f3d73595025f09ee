"""capsmed models: capsule classifiers and segmenters, CNN baselines, and the ``get_model`` registry.

Every model subclasses :class:`capsmed.models.base.CapsmedModel` and serves 2D and 3D inputs through
``spatial_dims``. Build one by name with :func:`get_model`; :func:`describe_models` lists them.
"""

from capsmed.models.base import CapsmedModel, capsule_lengths
from capsmed.models.registry import (
    MODEL_REGISTRY,
    describe_models,
    get_model,
    list_models,
    model_arguments,
    register_model,
)

# Importing the model modules registers them.
from capsmed.models import baselines, capsnet, capsunet, emcaps, segcaps, ucaps  # noqa: E402,F401  isort: skip

__all__ = [
    "MODEL_REGISTRY",
    "CapsmedModel",
    "capsule_lengths",
    "describe_models",
    "get_model",
    "list_models",
    "model_arguments",
    "register_model",
]
