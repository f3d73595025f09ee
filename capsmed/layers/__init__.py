"""Capsule layers: squashing, routing (dynamic, attention, EM), vector and matrix capsules.

Tensor layout: capsules ``(B, capsules, dim, *spatial)``; dense capsules ``(B, capsules, dim)``;
votes ``(B, I, J, D, *spatial)``. Matrix capsules (EM routing): poses ``(B, capsules, 16, *spatial)``
(4x4 flattened row-major) and activations ``(B, capsules, *spatial)``.
"""

from capsmed.layers.capsules import (
    ConvCapsule,
    ConvTransposeCapsule,
    DenseCapsule,
    GridCapsule,
    PrimaryCapsule,
)
from capsmed.layers.em import em_routing, inverse_temperatures
from capsmed.layers.matrix import ClassMatrixCapsule, ConvMatrixCapsule, PrimaryMatrixCapsule
from capsmed.layers.routing import attention_routing, coupling_statistics, dynamic_routing
from capsmed.layers.squash import squash, squash_efficient
from capsmed.layers.tensors import plain_tensor

__all__ = [
    "ClassMatrixCapsule",
    "ConvMatrixCapsule",
    "PrimaryMatrixCapsule",
    "em_routing",
    "inverse_temperatures",
    "ConvCapsule",
    "ConvTransposeCapsule",
    "DenseCapsule",
    "GridCapsule",
    "PrimaryCapsule",
    "attention_routing",
    "coupling_statistics",
    "dynamic_routing",
    "plain_tensor",
    "squash",
    "squash_efficient",
]
