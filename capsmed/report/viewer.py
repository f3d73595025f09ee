"""The interactive NiiVue viewer of segmentation study reports: its pinned script and its data.

NiiVue (BSD-2-Clause, WebGL2) comes from the npm package ``@niivue/niivue``; its UMD build is
vendored unchanged as ``capsmed/report/assets/niivue.umd.js`` with its licence, pinned here by
version and SHA-256 (a test recomputes the hash). A report never loads anything from the network:

- :func:`install_assets` puts one copy of NiiVue and of the small glue script
  (``capsmed-viewer.js``) under ``results/assets/niivue-{version}/``; every study page links them
  relatively, so a copied ``results/`` folder keeps working.
- :func:`viewer_data` encodes a study's volumes (image, prediction, ground truth, uncertainty,
  evidence maps) as gzip-compressed NIfTI, base64 inside the page. Browsers refuse ``fetch`` of
  ``file://`` files, so files next to the page could not be read from disk; embedding keeps a page
  self-sufficient at about the size of the compressed volumes. Float images are stored as int16
  with NIfTI scaling (``scl_slope``), so the viewer still reads out intensities; maps in 64 steps
  (:data:`HEAT_LEVELS`), blank under the value they are drawn from.
- :data:`CSP` admits exactly these two scripts, by path relative to the page, and no other script.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from capsmed.errors import CapsmedError
from capsmed.fileio import atomic_write_bytes
from capsmed.report.figures import label_colour

logger = logging.getLogger(__name__)

#: The npm release the vendored build comes from, and the SHA-256 of ``dist/niivue.umd.js`` in it.
#: 0.54.0 is the newest release whose UMD build (0.71 MB) does not bundle zarrita and its WASM
#: codecs (zstd, blosc: 1.3 MB that only OME-Zarr input needs; 0.57.0 added zarrita, 0.58.0 put
#: the codecs in the UMD build, 2.1 MB and more from then on). Everything the study viewer uses
#: (multiplanar and 3D render views, label colour tables, ``NVImage.loadFromBase64``, the
#: location and intensity callbacks) is in it.
NIIVUE_VERSION = "0.54.0"
NIIVUE_SHA256 = "cfa93e307f183ceaf16981cbb94e5d1002557bb45bb0fec3776a86393b48dd92"
NIIVUE_SOURCE = f"npm package @niivue/niivue@{NIIVUE_VERSION}, file dist/niivue.umd.js"

_ASSETS = Path(__file__).parent / "assets"
_FILES = ("niivue.umd.js", "capsmed-viewer.js", "LICENSE.niivue")

#: Images with more voxels than this are not embedded (the static slices still show them).
MAX_VIEWER_VOXELS = 256**3

#: Steps of a ``heat`` layer (maps such as the uncertainty and the evidence, 0 to 1): 63 steps of
#: 1/63 are finer than the two decimals the read-out gives, and the map compresses to about half of
#: what 255 steps take (a noisy 64^3 probability map: 245 kB of base64 at 255 steps, 154 kB at 63).
HEAT_LEVELS = 63


def assets_dir(results_dir: Path) -> Path:
    """Where the shared viewer scripts live: ``results/assets/niivue-{version}``."""
    return Path(results_dir) / "assets" / f"niivue-{NIIVUE_VERSION}"


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def install_assets(target: Path) -> Path:
    """Copy NiiVue, the glue script and NiiVue's licence into ``target`` (created; idempotent).

    Files are written through a temporary file and renamed, so reports written in parallel never
    see a half-written script.

    Args:
        target: The assets folder, normally :func:`assets_dir` of the results folder.

    Returns:
        ``target``.

    Raises:
        CapsmedError: The vendored NiiVue build does not have the pinned SHA-256.
    """
    target = Path(target)
    source = _ASSETS / "niivue.umd.js"
    digest = sha256_bytes(source.read_bytes())
    if digest != NIIVUE_SHA256:
        raise CapsmedError(f"{source}: SHA-256 {digest} differs from the pinned {NIIVUE_SHA256} "
                           f"({NIIVUE_SOURCE}); reinstall capsmed")
    target.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        src, dst = _ASSETS / name, target / name
        data = src.read_bytes()
        if dst.is_file() and dst.stat().st_size == len(data) and dst.read_bytes() == data:
            continue
        atomic_write_bytes(dst, data, mode=0o644)
    return target


# ----------------------------------------------------------------------------- volumes


def _canonical(path: Path, frame: int = 0) -> nib.Nifti1Image | None:
    """One 3-D volume in closest-canonical (RAS) orientation; None if unreadable.

    Args:
        path: A NIfTI file.
        frame: The channel of a 4-D file (channels last, as the evidence maps are written).
    """
    try:
        img = nib.load(str(path))
        if len(img.shape) >= 4 and not 0 <= frame < img.shape[3]:
            logger.warning("%s: no channel %d among its %d", path, frame, img.shape[3])
            return None
        data = np.asanyarray(img.dataobj)
        if data.ndim >= 4:
            data = data[:, :, :, frame]
        while data.ndim > 3:
            data = data[..., 0]
        while data.ndim < 3:
            data = data[..., None]
        return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), img.affine))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        logger.warning("%s: cannot read for the viewer (%s)", path, exc)
        return None


def _encode(data: np.ndarray, affine: np.ndarray, kind: str,
            value_range: tuple[float, float] | None = None) -> tuple[str, float, float]:
    """Gzip-compressed NIfTI as base64, and the display range ``(cal_min, cal_max)``.

    ``kind`` ``labels`` stores uint8; ``image`` stores integers as they are (up to 16 bits) and
    floats as int16 with ``scl_slope``/``scl_inter``; ``heat`` stores :data:`HEAT_LEVELS` + 1
    levels from 0 to the top of ``value_range`` (default 0..max), which is also its display
    range, and 0 where a value lies under the bottom of that range (it is not drawn either way;
    the read-out says "under" the bottom there).
    """
    finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data.ravel()
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    slope, inter = 1.0, 0.0
    if kind == "labels":
        stored = np.rint(np.nan_to_num(data)).clip(0, 255).astype(np.uint8)
        cal = (0.0, float(max(1, stored.max())))
    elif kind == "heat":
        bottom, top = value_range if value_range is not None else (0.0, hi if hi > 0 else 1.0)
        slope = top / HEAT_LEVELS
        values = np.nan_to_num(data).clip(0, top)
        stored = np.rint(values / slope).astype(np.uint8)
        stored[values < bottom] = 0
        cal = (float(bottom), float(top))
    else:
        if np.issubdtype(data.dtype, np.integer) and lo >= -32768 and hi <= 32767:
            stored = data.astype(np.int16)
        elif np.issubdtype(data.dtype, np.integer) and lo >= 0 and hi <= 65535:
            stored = data.astype(np.uint16)
        else:
            span = hi - lo if hi > lo else 1.0
            slope, inter = span / 65535.0, lo + span / 2.0
            stored = np.rint((np.nan_to_num(data, nan=lo) - inter) / slope).clip(
                -32767, 32767).astype(np.int16)
        if finite.size:
            p = np.percentile(finite, [0.5, 99.5])
            cal = (float(p[0]), float(p[1]) if p[1] > p[0] else float(p[0]) + 1.0)
        else:
            cal = (0.0, 1.0)
    img = nib.Nifti1Image(stored, affine)
    img.header.set_xyzt_units("mm")
    if slope != 1.0 or inter != 0.0:
        img.header.set_slope_inter(slope, inter)
    raw = gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)
    return base64.b64encode(raw).decode("ascii"), cal[0], cal[1]


@dataclass(frozen=True)
class Layer:
    """One volume for the viewer.

    Attributes:
        name: Shown in the layer controls and the voxel read-out.
        path: The NIfTI file.
        role: ``image`` (grey, window/level), ``labels`` (label colours) or ``heat`` (a map).
        visible: Shown when the page opens.
        opacity: Initial opacity.
        colormap: NiiVue colour map for ``image`` and ``heat`` layers.
        value_range: ``heat`` layers: the values drawn from transparent to full colour (values
            below the first are not drawn); default 0 to the map's maximum.
        frame: The channel shown from a 4-D (channels-last) file, e.g. one class of an evidence
            map.
    """

    name: str
    path: Path
    role: str
    visible: bool = True
    opacity: float = 1.0
    colormap: str = "gray"
    value_range: tuple[float, float] | None = None
    frame: int = 0


def label_rgb(index: int) -> list[int]:
    """The colour of label ``index`` (0-255 RGB), the one the static figures use."""
    colour = label_colour(index).lstrip("#")
    return [int(colour[i:i + 2], 16) for i in (0, 2, 4)]


def viewer_data(layers: Sequence[Layer], label_names: Mapping[int, str]
                ) -> tuple[dict[str, Any] | None, str]:
    """The viewer's data block: encoded volumes and label colours.

    Layers that cannot be read, or whose grid differs from the first layer's, are left out; the
    first layer must be readable and at most :data:`MAX_VIEWER_VOXELS` voxels.

    Args:
        layers: The volumes, background image first.
        label_names: Label index -> name (0 is background: drawn transparent, named in the
            read-out).

    Returns:
        ``(data, note)``: the JSON-ready block (None when nothing can be shown) and a sentence
        about what was left out (empty when nothing was).
    """
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    ref_shape: tuple[int, ...] | None = None
    for layer in layers:
        img = _canonical(layer.path, layer.frame) if layer.path is not None else None
        if img is None:
            notes.append(f"{layer.name} could not be read")
            if not out:
                return None, "; ".join(notes)
            continue
        shape = tuple(int(s) for s in img.shape[:3])
        if ref_shape is None:
            if int(np.prod(shape)) > MAX_VIEWER_VOXELS:
                return None, (f"the image has {int(np.prod(shape)):,} voxels, more than the "
                              f"{MAX_VIEWER_VOXELS:,} the embedded viewer takes")
            ref_shape = shape
        elif shape != ref_shape:
            notes.append(f"{layer.name} has another grid ({'x'.join(map(str, shape))})")
            continue
        data = np.asanyarray(img.dataobj)
        b64, cal_min, cal_max = _encode(data, img.affine, layer.role, layer.value_range)
        out.append({"name": layer.name, "role": layer.role, "base64": b64,
                    "colormap": layer.colormap, "opacity": layer.opacity,
                    "visible": layer.visible, "cal_min": cal_min, "cal_max": cal_max})
    labels = [{"index": int(k), "name": str(v), "rgb": label_rgb(int(k))}
              for k, v in sorted(label_names.items()) if int(k) != 0]
    background = str(dict(label_names).get(0, "background"))
    return {"volumes": out, "labels": labels, "background": background}, "; ".join(notes)


def script_hrefs(page: Path, assets: Path) -> list[str]:
    """Relative links from ``page`` to the two viewer scripts, NiiVue first."""
    rel = Path(os.path.relpath(Path(assets).resolve(), Path(page).parent.resolve())).as_posix()
    return [f"{rel}/niivue.umd.js", f"{rel}/capsmed-viewer.js"]


#: Content-Security-Policy of pages with the viewer: no network, scripts only from the page's own
#: origin (the two viewer files; no inline script runs), images from data/blob URLs that NiiVue
#: makes itself.
CSP = ("default-src 'none'; script-src 'self'; img-src data: blob:; style-src 'unsafe-inline'; "
       "connect-src data: blob:; worker-src blob:")
