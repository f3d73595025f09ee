"""Device, threads, determinism, versions and atomic file helpers shared by training and inference."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# The atomic writers live in capsmed.fileio (torch-free); imported here for the training code.
from capsmed.fileio import atomic_write_bytes as atomic_write_bytes
from capsmed.fileio import atomic_write_json as atomic_write_json
from capsmed.fileio import atomic_write_text as atomic_write_text

logger = logging.getLogger(__name__)


def select_device(choice: str = "auto") -> torch.device:
    """Pick the compute device.

    Args:
        choice: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.

    Returns:
        The device.

    Raises:
        ValueError: If ``cuda`` is asked for and none is available.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def configure_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads (the rule's ``threads:``), or the environment's default."""
    if threads is None:
        env = os.environ.get("SNAKEMAKE_THREADS") or os.environ.get("OMP_NUM_THREADS")
        threads = int(env) if env else torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine results, recorded with every result."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("capsmed", "torch", "monai", "numpy", "scikit-learn", "nibabel", "snakemake"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` atomically: a killed process never leaves a truncated checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
