"""capsmed: capsule networks for medical image segmentation and classification.

A Snakemake workflow over MONAI: data sources and validation (:mod:`capsmed.data`), capsule layers
(:mod:`capsmed.layers`), losses (:mod:`capsmed.losses`), models (:mod:`capsmed.models`), inference
(:mod:`capsmed.infer`), training (:mod:`capsmed.train`), evaluation (:mod:`capsmed.evaluate`) and
HTML reports (:mod:`capsmed.report`). The ``capsmed`` command (:mod:`capsmed.cli`) runs each stage.
"""

__version__ = "0.1.0"
