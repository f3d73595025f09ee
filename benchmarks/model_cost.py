"""Parameters and forward FLOPs of the capsule models and their baselines (issue 12).

Counts, not timings: parameters, and multiply-adds x 2 of convolutions and matrix products for
one input (``torch.utils.flop_counter``; squash and softmax are not counted), with the widths of
the example configs.

    python benchmarks/model_cost.py
"""

from __future__ import annotations

import sys

import torch

from capsmed.models import get_model
from capsmed.train.loop import estimate_flops

UNET = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2}
DENSENET = {"init_features": 16, "growth_rate": 8, "block_config": (4, 8, 6)}
UCAPS_PAPER = {"stem_channels": (16, 32, 64), "stem_kernel_size": 5, "primary_capsules": 16,
               "encoder_capsules": (16, 16, 8, 8, 8), "encoder_dims": (8, 8, 16, 16, 32, 64),
               "decoder_channels": (256, 128, 128, 64, 64), "reconstruction_hidden": (64, 128),
               "shared_votes": False}

#: (label, model, spatial_dims, classes, input size, kwargs)
ROWS = [
    ("hippocampus, 32^3 patch", "capsunet", 3, 3, 32, {}),
    ("hippocampus, 32^3 patch", "capsunet (routing_iterations=1)", 3, 3, 32,
     {"routing_iterations": 1}),
    ("hippocampus, 32^3 patch", "capsunet (capsule_block=conv)", 3, 3, 32, {"capsule_block": "conv"}),
    ("hippocampus, 32^3 patch", "unet (16-256, 2 res. units)", 3, 3, 32, UNET),
    ("hippocampus, 32^3 patch", "ucaps (narrow default)", 3, 3, 32, {}),
    ("hippocampus, 32^3 patch", "ucaps (paper widths)", 3, 3, 32, UCAPS_PAPER),
    ("BreastMNIST, 28^2", "rescapsnet", 2, 2, 28, {}),
    ("BreastMNIST, 28^2", "rescapsnet (routing_iterations=1)", 2, 2, 28, {"routing_iterations": 1}),
    ("BreastMNIST, 28^2", "rescapsnet (capsule_block=linear)", 2, 2, 28, {"capsule_block": "linear"}),
    ("BreastMNIST, 28^2", "efficient_capsnet", 2, 2, 28, {}),
    ("BreastMNIST, 28^2", "capsnet", 2, 2, 28, {}),
    ("BreastMNIST, 28^2", "seed_cnn", 2, 2, 28, {}),
    ("AdrenalMNIST3D, 28^3", "densecapsnet", 3, 2, 28, {}),
    ("AdrenalMNIST3D, 28^3", "densecapsnet (routing_iterations=1)", 3, 2, 28,
     {"routing_iterations": 1}),
    ("AdrenalMNIST3D, 28^3", "rescapsnet", 3, 2, 28, {}),
    ("AdrenalMNIST3D, 28^3", "rescapsnet (vote_weights=per_type)", 3, 2, 28,
     {"vote_weights": "per_type"}),
    ("AdrenalMNIST3D, 28^3", "densenet (blocks 4, 8, 6)", 3, 2, 28, DENSENET),
    ("AdrenalMNIST3D, 28^3", "capsnet", 3, 2, 28, {}),
]


def main() -> int:
    print("| input | model | params | forward GFLOPs | forward FLOPs |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, title, dims, classes, size, kwargs in ROWS:
        name = title.split(" ")[0]
        torch.manual_seed(0)
        model = get_model(name, dims, 1, classes, **kwargs)
        flops = estimate_flops(model, 1, [size] * dims)
        print(f"| {label} | {title} | {model.num_parameters():,} | {flops / 1e9:.3f} | {flops:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
