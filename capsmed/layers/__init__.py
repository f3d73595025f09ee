"""Capsule layers: squashing, routing, and primary / dense / convolutional / transposed capsules.

Tensor layout: capsules ``(B, capsules, dim, *spatial)``; dense capsules ``(B, capsules, dim)``;
votes ``(B, I, J, D, *spatial)``.
"""

from capsmed.layers.capsules import (
    ConvCapsule,
    ConvTransposeCapsule,
    DenseCapsule,
    GridCapsule,
    PrimaryCapsule,
)
from capsmed.layers.routing import attention_routing, coupling_statistics, dynamic_routing
from capsmed.layers.squash import squash, squash_efficient
from capsmed.layers.tensors import plain_tensor

__all__ = [
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
