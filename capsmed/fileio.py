"""Reading and writing the pipeline's files, in one place: JSON, text, NIfTI, hashes.

Every writer is atomic (temporary file in the same folder, ``fsync``, rename), so a killed job never
leaves a truncated file that the next stage or Snakemake would take as done. Nothing here imports
torch or MONAI: the reports, ``capsmed validate`` and the Snakefile use these too.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.errors import CapsmedError


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename.

    Args:
        path: destination; its folder is created.
        data: the new content.
        mode: permission bits of the new file (e.g. ``0o644`` for files a web server or another
            user reads); None keeps the temporary file's private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically (UTF-8); see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_text_if_changed(path: Path, text: str) -> bool:
    """Atomically write ``text`` to ``path`` unless the file already holds exactly that text.

    Args:
        path: destination file; its folder is created.
        text: the new content.

    Returns:
        True when the file was (re)written.
    """
    path = Path(path)
    if path.is_file():
        try:
            if path.read_text(encoding="utf-8") == text:
                return False
        except (OSError, UnicodeDecodeError):
            pass
    atomic_write_text(path, text)
    return True


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_dumps(obj: Any) -> str:
    """Readable JSON text in the given key order (case lists and splits: order is the contract)."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically, indented, with sorted keys (records, metrics, fingerprints)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: Path, what: str = "file", *, required: bool = True, default: Any = None
              ) -> Any:
    """Read a JSON file written by an earlier stage.

    Args:
        path: the file.
        what: what the file is, for the message when it is missing (``"case list"``).
        required: raise when the file is missing; otherwise return ``default``.
        default: the value of a missing optional file.

    Returns:
        The parsed document, or ``default``.

    Raises:
        CapsmedError: the file is required and missing, or it is not readable as JSON (the
            message names the file).
    """
    path = Path(path)
    if not path.is_file():
        if required:
            raise CapsmedError(f"{path}: {what} not found; run the earlier pipeline stage first")
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CapsmedError(f"{path}: not readable as JSON ({exc})") from None


def stable_hash(obj: Any) -> str:
    """SHA-256 (hex, first 16 characters) of the canonical JSON form of ``obj``.

    The one hash of configs and inputs: split files, materialised data, checkpoints, caches and
    the Snakefile's params all use it.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_nifti(array: np.ndarray, path: Path, affine: np.ndarray | None = None,
               dtype: Any = None, slope: float | None = None) -> None:
    """Write ``array`` as a NIfTI file atomically, spatial units mm, reproducible bytes.

    Args:
        array: the voxel array, spatial axes first (2D arrays are written as 2D NIfTI).
        path: destination ``.nii`` or ``.nii.gz`` path; its folder is created.
        affine: 4x4 voxel-to-world matrix (RAS, as nibabel uses); identity when None.
        dtype: stored data type; the array's own when None.
        slope: store ``round(array / slope)`` (clipped to the integer ``dtype``) with the NIfTI
            scale factor ``slope``, e.g. maps in [0, 1] as uint8 with ``slope=1/255``; None
            stores the values as they are.
    """
    import nibabel as nib

    data = np.asarray(array)
    if slope is not None:
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data / slope), info.min, info.max)
    data = data if dtype is None else np.asarray(data, dtype=dtype)
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else np.asarray(affine, float))
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=6, mtime=0)
    atomic_write_bytes(Path(path), raw)
