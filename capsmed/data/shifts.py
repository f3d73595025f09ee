"""Named, graded distribution shifts for the shifted test stages (issue 23, item 1).

Every shift has five severities (1 to 5, as ImageNet-C and MedMNIST-C define them) and severity 0,
the identity. :func:`apply_shift` applies one to a study in its ORIGINAL intensity scale (the raw
file, before the plan's normalisation): the evaluation loads the original image, shifts it (and,
for spatial shifts, its label), then runs the ordinary preprocessing and inference and scores the
prediction against the shifted label in the same grid.

Determinism. The random parts of a shift (the rotation axis, the direction of a zoom or gamma, a
noise field, the spike positions, the motion pattern) come from a generator seeded with
:func:`capsmed.fileio.stable_hash` of ``(seed_key, name)``, never from global state; the severity
sets only the magnitudes. So a result is deterministic per (case, shift, severity), and the five
severities of one case differ only in strength (common random numbers), which makes curves over
severity monotone per case rather than noisy.

Kinds (:data:`KINDS`, chosen from the plan by :func:`shift_kind`): ``mr`` (3D MR and every other
grey-value 3D image), ``ct`` (intensities in HU), ``us`` (2D ultrasound), ``image2d`` (other 2D
grey-value images) and ``mask`` (binary shape masks such as AdrenalMNIST3D, no modality). The kind
picks the default list (:func:`default_shifts`), the noise model and some tables.

Severity tables (one row per shift; each :class:`Shift` also records its ``source``;
``+-`` means the direction is drawn once per case):

============== ================================================== ============================
shift          severities 1..5                                    source
============== ================================================== ============================
rotation       5, 10, 15, 22.5, 30 degrees (random axis in 3D)    own; affNIST tops at 20
scaling        x 1.05, 1.10, 1.20, 1.30, 1.40 (zoom in or out)    own; affNIST tops at 1.2
anisotropy     slices 1.5, 2, 3, 4, 5 voxels thick (random axis)  TorchIO RandomAnisotropy (1.5, 5)
bias_field     coefficients up to 0.1 .. 0.5 (order 3)            TorchIO RandomBiasField 0.5
noise          sigma 0.04, 0.08, 0.12, 0.18, 0.26 of the range    MedMNIST-C gaussian_noise
               (Rician for mr); CT: 10, 20, 35, 50, 75 HU         own (CT noise in water)
gamma          +- 1.1, 1.2, 1.3, 1.4, 1.6 / 0.9 .. 0.4            MedMNIST-C gamma_corr
motion         up to 0.25, 0.5, 1, 1.5, 2.5 degrees and mm        TorchIO RandomMotion, scaled *
ghosting       intensity 0.2 .. 1.0, 4 to 10 ghosts               TorchIO RandomGhosting (.5, 1)
spike          0.1, 0.2, 0.4, 0.7, 1.0 x the spectrum's maximum   TorchIO RandomSpike (1, 3) **
blur           Gaussian sigma 0.5, 0.75, 1, 1.5, 2 voxels         own
hu_offset      +- 5, 10, 20, 35, 50 HU                            own (ACR water 0 +- 7 HU)
hu_scale       x 1 +- 0.02, 0.04, 0.06, 0.08, 0.10 about 0 HU     own
boundary_noise 10, 20, 30, 40, 50 % of boundary voxels flipped    own
2D MedMNIST-C  the BreastMNIST (``us``) or ChestMNIST (``image2d``) rows of MedMNIST-C
============== ================================================== ============================

``*`` TorchIO's defaults (10 degrees, 10 mm, 2 movements) saturate on small fields of view: on
hippocampus crops (about 36 x 50 x 35 mm) the artefact stops growing beyond about 2 degrees and
2 mm, so the severities stay below that. ``**`` TorchIO's range (1, 3) starts with stripes as
strong as the mean signal; the severities end at its lower bound.

The 2D corruptions (``speckle_noise``, ``motion_blur``, ``pixelate``, ``jpeg_compression``,
``brightness_up`` / ``_down``, ``contrast_up`` / ``_down``) are written from the published
definitions of MedMNIST-C (Di Salvo, Doerrich & Ledig 2024, arXiv:2406.17536; the ``medmnistc``
package, ``medmnistc/corruptions/registry.py`` and its ``noise``, ``filter``, ``compression`` and
``enhance`` modules), which itself follows ImageNet-C (Hendrycks & Dietterich 2019). They work on
images in [0, 1]: the image is mapped there by its own minimum and maximum per channel and mapped
back afterwards. MedMNIST-C defines them on 224-pixel images. Per-pixel and per-value parameters
(noise level, intensity factors, JPEG quality on its 8x8 blocks, the pixelation factor, which is
already a fraction of the image size) are used as published; lengths in pixels (the motion blur
radius and sigma) are multiplied by ``n / 224``, ``n`` the mean side of the input, so that a blur
covers the same fraction of the field of view at every resolution.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capsmed.errors import CapsmedError
from capsmed.fileio import stable_hash

logger = logging.getLogger(__name__)

#: Kinds of image a shift can apply to (see :func:`shift_kind`).
KINDS = ("mr", "ct", "us", "image2d", "mask")
#: The severities a shifted stage may ask for (0 is the identity, the clean reference).
SEVERITIES = (1, 2, 3, 4, 5)
#: The image side on which MedMNIST-C defines its severities.
MEDMNISTC_SIZE = 224

_ALL = KINDS
_GREY = ("mr", "ct", "us", "image2d")
_2D = ("us", "image2d")


@dataclass
class _Context:
    """What a shift function knows besides the arrays."""

    kind: str
    spacing: np.ndarray  # (D,) mm per voxel (ones when unknown)
    rng: np.random.Generator


ShiftFn = Callable[[np.ndarray, "np.ndarray | None", Any, _Context],
                   "tuple[np.ndarray, np.ndarray | None]"]


@dataclass(frozen=True)
class Shift:
    """One named shift.

    Attributes:
        name: its name in configs and result paths.
        spatial: it moves anatomy, so the label is resampled with the image (nearest neighbour).
        applies_to: the kinds of image (:data:`KINDS`) it suits.
        dims: the spatial dimensionalities it suits.
        table: severity parameters 1..5 by kind, ``"*"`` for every other kind.
        source: where the table comes from.
        doc: one line on what it does.
        fn: ``fn(image (C, *S) float64, label (*S) | None, parameter, context) -> (image, label)``.
    """

    name: str
    spatial: bool
    applies_to: tuple[str, ...]
    dims: tuple[int, ...]
    table: Mapping[str, tuple[Any, ...]]
    source: str
    doc: str
    fn: ShiftFn = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        for kind, row in self.table.items():
            if len(row) != len(SEVERITIES):
                raise ValueError(f"shift {self.name}: table row {kind!r} needs "
                                 f"{len(SEVERITIES)} severities, got {len(row)}")

    def parameter(self, severity: int, kind: str) -> Any:
        """The table's parameter of ``severity`` (1..5) for ``kind``."""
        row = self.table.get(kind, self.table.get("*"))
        if row is None:
            raise ValueError(f"shift {self.name} has no table for kind {kind!r}")
        return row[severity - 1]


# ---------------------------------------------------------------------------------------------
# helpers


def _rng(seed_key: str, name: str) -> np.random.Generator:
    """A generator seeded by the stable hash of ``(seed_key, name)`` (no global state)."""
    return np.random.default_rng(int(stable_hash({"case": str(seed_key), "shift": name}), 16))


def _seed(ctx: _Context) -> int:
    """An integer seed for a MONAI randomizable transform, drawn from the shift's generator."""
    return int(ctx.rng.integers(0, 2**31 - 1))


def _sign(ctx: _Context) -> int:
    return 1 if ctx.rng.random() < 0.5 else -1


def _binarise(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Threshold each channel at the midpoint of ``reference``'s two values (mask kind)."""
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        lo, hi = float(reference[c].min()), float(reference[c].max())
        out[c] = np.where(image[c] >= (lo + hi) / 2, hi, lo)
    return out


def _resample(image: np.ndarray, label: np.ndarray | None, matrix: np.ndarray,
              ctx: _Context) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample within the same grid with MONAI's ``Affine``; out of field: minimum / label 0.

    ``matrix`` (D, D) maps centred output voxel coordinates to input voxel coordinates. The image
    is interpolated linearly (each channel shifted by its minimum so that MONAI's zero padding
    fills with that minimum), the label by nearest neighbour (zero padding: background).
    """
    import torch
    from monai.transforms import Affine

    dims = matrix.shape[0]
    homog = np.eye(dims + 1)
    homog[:dims, :dims] = matrix
    mins = image.reshape(image.shape[0], -1).min(axis=1).reshape((-1,) + (1,) * dims)
    warp = Affine(affine=torch.as_tensor(homog), padding_mode="zeros", mode="bilinear",
                  image_only=True, dtype=np.float64)
    out = np.asarray(warp(torch.as_tensor(image - mins)), dtype=np.float64) + mins
    if ctx.kind == "mask":
        out = _binarise(out, image)
    if label is not None:
        warp_label = Affine(affine=torch.as_tensor(homog), padding_mode="zeros", mode="nearest",
                            image_only=True, dtype=np.float64)
        moved = np.asarray(warp_label(torch.as_tensor(label[None].astype(np.float64))))[0]
        label = np.rint(moved).astype(label.dtype)
    return out, label


def _physical(matrix: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """A physical-space linear map expressed in voxel coordinates: ``D^-1 M D``."""
    return np.diag(1.0 / spacing) @ matrix @ np.diag(spacing)


def _rotation_matrix(dims: int, degrees: float, ctx: _Context) -> np.ndarray:
    """Rotation by ``degrees``: in 2D with a random sign, in 3D about a random unit axis."""
    theta = math.radians(degrees)
    if dims == 2:
        theta *= _sign(ctx)
        c, s = math.cos(theta), math.sin(theta)
        return np.array([[c, -s], [s, c]])
    axis = ctx.rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)  # Rodrigues


def _value_range(image: np.ndarray) -> np.ndarray:
    """Per channel, the 0.5 to 99.5 percentile range (the max - min where that is 0), (C, 1, ...)."""
    flat = image.reshape(image.shape[0], -1)
    lo, hi = np.percentile(flat, [0.5, 99.5], axis=1)
    span = hi - lo
    full = flat.max(axis=1) - flat.min(axis=1)
    span = np.where(span > 0, span, full)
    return np.where(span > 0, span, 1.0).reshape((-1,) + (1,) * (image.ndim - 1))


def _to_unit(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map each channel to [0, 1] by its own minimum and maximum (MedMNIST-C works on x/255)."""
    flat = image.reshape(image.shape[0], -1)
    shape = (-1,) + (1,) * (image.ndim - 1)
    lo = flat.min(axis=1).reshape(shape)
    span = (flat.max(axis=1) - flat.min(axis=1)).reshape(shape)
    span = np.where(span > 0, span, 1.0)
    return (image - lo) / span, lo, span


def _per_channel_unit(fn: Callable[[np.ndarray, Any, _Context], np.ndarray]) -> ShiftFn:
    """Wrap a [0, 1] single-channel 2D corruption into a shift function."""

    def shift(image: np.ndarray, label: np.ndarray | None, p: Any,
              ctx: _Context) -> tuple[np.ndarray, np.ndarray | None]:
        unit, lo, span = _to_unit(image)
        out = np.stack([fn(unit[c], p, ctx) for c in range(unit.shape[0])])
        return out * span + lo, label

    return shift


# ---------------------------------------------------------------------------------------------
# spatial shifts


def _rotation(image, label, degrees, ctx):  # noqa: ANN001, ANN202 - see ShiftFn
    matrix = _rotation_matrix(image.ndim - 1, float(degrees), ctx)
    return _resample(image, label, _physical(matrix, ctx.spacing), ctx)


def _scaling(image, label, factor, ctx):  # noqa: ANN001, ANN202
    # Anatomy appears `zoom` times larger (zoom in) or smaller; the direction is drawn per case.
    zoom = float(factor) if _sign(ctx) > 0 else 1.0 / float(factor)
    matrix = np.eye(image.ndim - 1) / zoom
    return _resample(image, label, matrix, ctx)


# ---------------------------------------------------------------------------------------------
# resolution, blur, intensity


def _thick_slices(x: np.ndarray, factor: float, binary: bool = False) -> np.ndarray:
    """Resample the last axis of ``x`` to slices ``factor`` times thicker and back.

    Slices of thickness ``t = factor`` voxels, centred on the image's centre, cover the axis; each
    slice is the exact box average of the voxels it covers (fractional at its ends, the edge voxel
    repeated beyond the image), sampled at its centre, and the voxels are interpolated linearly
    between slice centres (constant beyond the outermost centres). ``binary`` (two-valued masks):
    each slice takes the value most of it covers and the voxels the value of the nearest slice.
    """
    n = x.shape[-1]
    t = float(factor)
    half = int(math.ceil((n - 1) / 2 / t))  # slices on each side of the centre one
    m = 2 * half + 1
    pad = int(math.ceil(half * t + t)) + 1
    padded = np.concatenate([np.repeat(x[..., :1], pad, -1), x,
                             np.repeat(x[..., -1:], pad, -1)], axis=-1)
    cum = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(padded, axis=-1)], axis=-1)

    def integral(pos: np.ndarray) -> np.ndarray:  # of the voxel values from -0.5 - pad to pos
        u = pos + 0.5 + pad
        i = np.floor(u).astype(int)
        return cum[..., i] + (u - i) * (cum[..., i + 1] - cum[..., i])

    centres = (n - 1) / 2 + (np.arange(m) - half) * t
    slices = (integral(centres + t / 2) - integral(centres - t / 2)) / t
    q = np.clip((np.arange(n) - centres[0]) / t, 0, m - 1)
    if binary:
        lo_value, hi_value = float(x.min()), float(x.max())
        slices = np.where(slices >= (lo_value + hi_value) / 2, hi_value, lo_value)
        return slices[..., np.floor(q + 0.5).astype(int)]
    lo = np.floor(q).astype(int)
    hi = np.minimum(lo + 1, m - 1)
    return slices[..., lo] * (1 - (q - lo)) + slices[..., hi] * (q - lo)


def _anisotropy(image, label, factor, ctx):  # noqa: ANN001, ANN202
    """Thick slices along one random axis: box slice profile ``factor`` voxels thick, linear back.

    The axis is drawn per case (TorchIO ``RandomAnisotropy`` draws it among all axes too);
    :func:`_thick_slices` does the resampling; masks stay two-valued (majority per slice).
    """
    dims = image.ndim - 1
    axis = 1 + int(ctx.rng.integers(dims))
    binary = ctx.kind == "mask"
    out = np.stack([np.moveaxis(_thick_slices(np.moveaxis(image[c], axis - 1, -1), float(factor),
                                              binary), -1, axis - 1)
                    for c in range(image.shape[0])])
    return out, label


def _blur(image, label, sigma, ctx):  # noqa: ANN001, ANN202
    """Isotropic Gaussian blur (MONAI ``GaussianSmooth``): ``sigma`` in units of the finest voxel."""
    import torch
    from monai.transforms import GaussianSmooth

    sigmas = [float(sigma) * float(ctx.spacing.min()) / float(s) for s in ctx.spacing]
    out = GaussianSmooth(sigma=sigmas)(torch.as_tensor(image))
    return np.asarray(out, dtype=np.float64), label


def _noise(image, label, level, ctx):  # noqa: ANN001, ANN202
    """Rician (mr, MONAI ``RandRicianNoise``) or Gaussian (MONAI ``RandGaussianNoise``) noise.

    mr / us / image2d: sigma = ``level`` x the image's 0.5-99.5 percentile range per channel; mr
    adds it to the real and imaginary parts of the magnitude (measured from the channel's
    minimum), the others add it. ct: Gaussian with sigma = ``level`` HU.
    """
    import torch
    from monai.transforms import RandGaussianNoise, RandRicianNoise

    seed = _seed(ctx)
    sigma = np.full((image.shape[0],) + (1,) * (image.ndim - 1), float(level))
    if ctx.kind != "ct":
        sigma = sigma * _value_range(image)
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        if ctx.kind == "mr":
            t = RandRicianNoise(prob=1.0, std=float(sigma[c].flat[0]), relative=False,
                                sample_std=False, dtype=np.float64)
            t.set_random_state(seed=seed + c)
            base = image[c].min()
            out[c] = np.asarray(t(torch.as_tensor(image[c:c + 1] - base)))[0] + base
        else:
            t = RandGaussianNoise(prob=1.0, std=float(sigma[c].flat[0]), sample_std=False,
                                  dtype=np.float64)
            t.set_random_state(seed=seed + c)
            out[c] = np.asarray(t(torch.as_tensor(image[c:c + 1])))[0]
    return out, label


def _bias_field(image, label, magnitude, ctx):  # noqa: ANN001, ANN202
    """Smooth multiplicative field ``exp(sum c_k P_k)`` (MONAI ``RandBiasField``, degree 3).

    The coefficients are uniform in (-magnitude, magnitude), one draw per case scaled by severity.
    """
    import torch
    from monai.transforms import RandBiasField

    t = RandBiasField(degree=3, coeff_range=(-float(magnitude), float(magnitude)), prob=1.0,
                      dtype=np.float64)
    t.set_random_state(seed=_seed(ctx))
    base = image.reshape(image.shape[0], -1).min(axis=1).reshape(
        (-1,) + (1,) * (image.ndim - 1))
    out = np.asarray(t(torch.as_tensor(image - base)), dtype=np.float64) + base
    return out, label


def _gamma(image, label, pair, ctx):  # noqa: ANN001, ANN202
    """Gamma on each channel's own range (MONAI ``AdjustContrast``), up or down per case."""
    import torch
    from monai.transforms import AdjustContrast

    gamma = float(pair[0] if _sign(ctx) > 0 else pair[1])
    t = AdjustContrast(gamma=gamma)
    out = np.stack([np.asarray(t(torch.as_tensor(image[c:c + 1])), dtype=np.float64)[0]
                    for c in range(image.shape[0])])
    return out, label


def _hu_offset(image, label, hu, ctx):  # noqa: ANN001, ANN202
    """A calibration offset of ``hu`` HU, sign drawn per case (before the CT window)."""
    return image + _sign(ctx) * float(hu), label


def _hu_scale(image, label, delta, ctx):  # noqa: ANN001, ANN202
    """HU scaled about water (0 HU) by ``1 +- delta``, sign drawn per case."""
    return image * (1.0 + _sign(ctx) * float(delta)), label


# ---------------------------------------------------------------------------------------------
# MR artefacts from TorchIO (deterministic transforms with parameters drawn here)


def _tio_image(image: np.ndarray, ctx: _Context) -> Any:
    import torch
    import torchio as tio

    affine = np.diag(list(ctx.spacing) + [1.0])
    return tio.ScalarImage(tensor=torch.as_tensor(image, dtype=torch.float32), affine=affine)


def _motion(image, label, magnitude, ctx):  # noqa: ANN001, ANN202
    """TorchIO ``Motion``: 2 movements of up to ``magnitude`` degrees and mm about / along each axis.

    As TorchIO's ``RandomMotion`` draws them: the movement times split k-space evenly, perturbed by
    up to 30% of a segment; here each rotation and translation is a fixed draw in (-1, 1) per case
    times ``magnitude``.
    """
    import torchio as tio

    n = 2
    degrees = ctx.rng.uniform(-1, 1, (n, 3)) * float(magnitude)
    translation = ctx.rng.uniform(-1, 1, (n, 3)) * float(magnitude)
    step = 1 / (n + 1)
    times = np.arange(1, n + 1) * step + ctx.rng.uniform(-0.3 * step, 0.3 * step, n)
    t = tio.Motion(degrees=degrees, translation=translation, times=times,
                   image_interpolation="linear")
    return np.asarray(t(_tio_image(image, ctx)).data, dtype=np.float64), label


def _ghosting(image, label, intensity, ctx):  # noqa: ANN001, ANN202
    """TorchIO ``Ghosting``: every k-th k-space plane (4 <= k <= 10) attenuated by ``intensity``."""
    import torchio as tio

    num_ghosts = int(ctx.rng.integers(4, 11))
    axis = int(ctx.rng.integers(3))
    t = tio.Ghosting(num_ghosts=num_ghosts, axis=axis, intensity=float(intensity), restore=None)
    return np.asarray(t(_tio_image(image, ctx)).data, dtype=np.float64), label


def _spike(image, label, intensity, ctx):  # noqa: ANN001, ANN202
    """TorchIO ``Spike``: one k-space spike of ``intensity`` x the spectrum's maximum."""
    import torchio as tio

    positions = ctx.rng.random((1, 3))
    t = tio.Spike(spikes_positions=positions, intensity=float(intensity))
    return np.asarray(t(_tio_image(image, ctx)).data, dtype=np.float64), label


# ---------------------------------------------------------------------------------------------
# binary masks


def _boundary_noise(image, label, fraction, ctx):  # noqa: ANN001, ANN202
    """Flip ``fraction`` of the boundary voxels of a two-valued mask (erode or dilate them).

    A boundary voxel has a face neighbour of the other value; each gets one uniform draw per case,
    and those below ``fraction`` flip, so a higher severity flips a superset.
    """
    from scipy import ndimage

    out = image.copy()
    draw = ctx.rng.random(image.shape[1:])
    for c in range(image.shape[0]):
        lo, hi = float(image[c].min()), float(image[c].max())
        fg = image[c] >= (lo + hi) / 2
        boundary = (fg & ~ndimage.binary_erosion(fg)) | (~fg & ndimage.binary_dilation(fg))
        flip = boundary & (draw < float(fraction))
        out[c][flip] = np.where(fg[flip], lo, hi)
    return out, label


# ---------------------------------------------------------------------------------------------
# MedMNIST-C 2D corruptions, on one channel in [0, 1]


def _length_scale(x: np.ndarray) -> float:
    """``n / 224``: how MedMNIST-C's pixel lengths scale to this image (``n`` its mean side)."""
    return float(np.mean(x.shape)) / MEDMNISTC_SIZE


def _speckle(x: np.ndarray, c: float, ctx: _Context) -> np.ndarray:
    """MedMNIST-C ``SpeckleNoise``: ``clip(x + x * N(0, c), 0, 1)``."""
    return np.clip(x + x * ctx.rng.standard_normal(x.shape) * float(c), 0, 1)


def _motion_blur(x: np.ndarray, p: tuple[float, float], ctx: _Context) -> np.ndarray:
    """MedMNIST-C ``MotionBlur`` (ImageMagick ``MotionBlurImage(radius, sigma, angle)``).

    A one-sided line kernel with weights ``exp(-t^2 / (2 sigma^2))`` at ``t = 0 .. 2 radius``
    pixels along a direction drawn in (-45, 45) degrees; radius and sigma scaled by ``n / 224``;
    sub-pixel offsets interpolated linearly, edges replicated.
    """
    from scipy import ndimage

    angle = math.radians(ctx.rng.uniform(-45, 45))
    scale = _length_scale(x)
    radius, sigma = float(p[0]) * scale, max(float(p[1]) * scale, 1e-6)
    steps = np.arange(0, 2 * radius + 1e-9, 0.5)  # half-pixel sampling of the line
    weights = np.exp(-(steps ** 2) / (2 * sigma ** 2))
    weights /= weights.sum()
    out = np.zeros_like(x)
    for t, w in zip(steps, weights, strict=True):
        out += w * ndimage.shift(x, (t * math.sin(angle), t * math.cos(angle)), order=1,
                                 mode="nearest")
    return np.clip(out, 0, 1)


def _pixelate(x: np.ndarray, factor: float, ctx: _Context) -> np.ndarray:
    """MedMNIST-C ``Pixelate``: Pillow BOX resize to ``int(side * factor)`` and BOX back."""
    from PIL import Image

    height, width = x.shape
    small = Image.fromarray(x.astype(np.float32), mode="F").resize(
        (max(1, int(width * float(factor))), max(1, int(height * float(factor)))), Image.BOX)
    return np.asarray(small.resize((width, height), Image.BOX), dtype=np.float64)


def _jpeg(x: np.ndarray, quality: int, ctx: _Context) -> np.ndarray:
    """MedMNIST-C ``JPEGCompression``: Pillow JPEG at ``quality``, on the image as 8-bit grey."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.rint(x * 255).astype(np.uint8), mode="L").save(
        buffer, "JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer), dtype=np.float64) / 255.0


def _brightness(x: np.ndarray, factor: float, ctx: _Context) -> np.ndarray:
    """MedMNIST-C ``Brightness`` (Pillow ``ImageEnhance.Brightness``): ``clip(x * factor)``."""
    return np.clip(x * float(factor), 0, 1)


def _contrast(x: np.ndarray, factor: float, ctx: _Context) -> np.ndarray:
    """MedMNIST-C ``Contrast`` (Pillow ``ImageEnhance.Contrast``): blend with the mean grey."""
    mean = float(x.mean())
    return np.clip(mean + float(factor) * (x - mean), 0, 1)


# ---------------------------------------------------------------------------------------------
# registry

_MEDMNISTC = "MedMNIST-C (Di Salvo et al. 2024), medmnistc/corruptions/registry.py"


def _shift(name: str, fn: ShiftFn, table: Mapping[str, Sequence[Any]], source: str, doc: str,
           spatial: bool = False, applies_to: tuple[str, ...] = _GREY,
           dims: tuple[int, ...] = (2, 3)) -> Shift:
    return Shift(name=name, spatial=spatial, applies_to=applies_to, dims=dims,
                 table={k: tuple(v) for k, v in table.items()}, source=source, doc=doc, fn=fn)


#: Every shift by name.
SHIFTS: dict[str, Shift] = {s.name: s for s in (
    _shift("rotation", _rotation, {"*": (5, 10, 15, 22.5, 30)},
           "own: unseen viewpoints (training turns by 90 degrees only; ultrasound trains up to "
           "10); affNIST's test rotations reach 20 degrees",
           "rotation by the angle in degrees, about a random axis in 3D (sign random in 2D), in "
           "physical space", spatial=True, applies_to=_ALL),
    _shift("scaling", _scaling, {"*": (1.05, 1.10, 1.20, 1.30, 1.40)},
           "own: affNIST's test scalings reach 1.2 (severity 3)",
           "isotropic zoom in or out (drawn per case) by the factor, about the centre",
           spatial=True, applies_to=_ALL),
    _shift("anisotropy", _anisotropy, {"*": (1.5, 2.0, 3.0, 4.0, 5.0)},
           "TorchIO RandomAnisotropy downsampling range (1.5, 5)",
           "thick slices: one random axis averaged down by the factor and interpolated back",
           applies_to=_ALL),
    _shift("bias_field", _bias_field, {"*": (0.1, 0.2, 0.3, 0.4, 0.5)},
           "TorchIO RandomBiasField coefficients 0.5 at severity 5 (MONAI RandBiasField)",
           "multiplicative smooth field exp(polynomial of degree 3), coefficients up to the value",
           applies_to=("mr",)),
    _shift("noise", _noise, {"ct": (10, 20, 35, 50, 75),
                             "*": (0.04, 0.08, 0.12, 0.18, 0.26)},
           "MedMNIST-C gaussian_noise (ChestMNIST) as a fraction of the 0.5-99.5 percentile "
           "range; CT own, in HU",
           "Rician noise (mr) or Gaussian noise (other kinds; ct in HU)"),
    _shift("gamma", _gamma, {"*": ((1.1, 0.9), (1.2, 0.8), (1.3, 0.7), (1.4, 0.6), (1.6, 0.4))},
           "MedMNIST-C gamma_corr_up / gamma_corr_down (ChestMNIST)",
           "gamma on each channel's range, up (first value) or down (second), drawn per case"),
    _shift("motion", _motion, {"*": (0.25, 0.5, 1.0, 1.5, 2.5)},
           "TorchIO RandomMotion (2 movements); its defaults of 10 degrees and 10 mm saturate on "
           "small fields of view, so the magnitudes stay below 2.5",
           "k-space motion artefact (TorchIO Motion): 2 movements of up to the value in degrees "
           "and mm", applies_to=("mr",), dims=(3,)),
    _shift("ghosting", _ghosting, {"*": (0.2, 0.4, 0.6, 0.8, 1.0)},
           "TorchIO RandomGhosting intensity range (0.5, 1), 4 to 10 ghosts",
           "k-space ghosting (TorchIO Ghosting) along a random axis", applies_to=("mr",),
           dims=(3,)),
    _shift("spike", _spike, {"*": (0.1, 0.2, 0.4, 0.7, 1.0)},
           "TorchIO RandomSpike intensity range (1, 3), one spike; severity 5 at its lower bound",
           "k-space spike (herringbone artefact, TorchIO Spike)", applies_to=("mr",), dims=(3,)),
    _shift("blur", _blur, {"*": (0.5, 0.75, 1.0, 1.5, 2.0)},
           "own", "isotropic Gaussian blur (MONAI GaussianSmooth), sigma in finest voxels"),
    _shift("hu_offset", _hu_offset, {"*": (5, 10, 20, 35, 50)},
           "own: the ACR tolerance of water is 0 +- 7 HU; scanners and kV differ by tens of HU",
           "HU offset, sign drawn per case", applies_to=("ct",)),
    _shift("hu_scale", _hu_scale, {"*": (0.02, 0.04, 0.06, 0.08, 0.10)},
           "own", "HU scaled about water (0 HU) by 1 +- the value, sign drawn per case",
           applies_to=("ct",)),
    _shift("boundary_noise", _boundary_noise, {"*": (0.1, 0.2, 0.3, 0.4, 0.5)},
           "own", "flips the share of boundary voxels of a binary mask (erosion / dilation)",
           applies_to=("mask",)),
    _shift("speckle_noise", _per_channel_unit(_speckle),
           {"us": (0.10, 0.15, 0.20, 0.25, 0.30), "*": (0.05, 0.15, 0.2, 0.35, 0.45)},
           _MEDMNISTC + " (us: BreastMNIST; other: ChestMNIST)",
           "multiplicative Gaussian noise x + x N(0, c)", applies_to=_2D, dims=(2,)),
    _shift("motion_blur", _per_channel_unit(_motion_blur),
           {"*": ((5, 5), (9, 7), (9, 10), (13, 10), (17, 12))},
           _MEDMNISTC + " (BreastMNIST); radius and sigma at 224 px, scaled by n/224",
           "linear motion blur (radius, sigma) at an angle in (-45, 45) degrees",
           applies_to=_2D, dims=(2,)),
    _shift("pixelate", _per_channel_unit(_pixelate), {"*": (0.30, 0.25, 0.20, 0.15, 0.10)},
           _MEDMNISTC + " (BreastMNIST, ChestMNIST)",
           "box-averaged down to the fraction of the size and back", applies_to=_2D, dims=(2,)),
    _shift("jpeg_compression", _per_channel_unit(_jpeg), {"*": (50, 30, 15, 10, 7)},
           _MEDMNISTC + " (BreastMNIST, ChestMNIST)", "JPEG at the quality (Pillow)",
           applies_to=_2D, dims=(2,)),
    _shift("brightness_up", _per_channel_unit(_brightness),
           {"us": (1.4, 1.5, 1.6, 1.8, 2.0), "*": (1.1, 1.2, 1.3, 1.4, 1.5)},
           _MEDMNISTC + " (us: BreastMNIST; other: ChestMNIST)", "intensities times the factor",
           applies_to=_2D, dims=(2,)),
    _shift("brightness_down", _per_channel_unit(_brightness),
           {"us": (0.55, 0.5, 0.45, 0.4, 0.3), "*": (0.9, 0.8, 0.7, 0.6, 0.5)},
           _MEDMNISTC + " (us: BreastMNIST; other: ChestMNIST)", "intensities times the factor",
           applies_to=_2D, dims=(2,)),
    _shift("contrast_up", _per_channel_unit(_contrast), {"*": (1.1, 1.2, 1.3, 1.4, 1.6)},
           _MEDMNISTC + " (ChestMNIST)", "contrast about the mean times the factor",
           applies_to=_2D, dims=(2,)),
    _shift("contrast_down", _per_channel_unit(_contrast), {"*": (0.9, 0.8, 0.7, 0.6, 0.4)},
           _MEDMNISTC + " (BreastMNIST, ChestMNIST)", "contrast about the mean times the factor",
           applies_to=_2D, dims=(2,)),
)}

#: Default shift lists per kind (3D and 2D where they differ); see :func:`default_shifts`.
DEFAULT_SHIFTS: dict[str, tuple[str, ...]] = {
    "mr": ("rotation", "scaling", "anisotropy", "bias_field", "noise", "gamma", "motion",
           "ghosting", "spike", "blur"),
    "mr2d": ("rotation", "scaling", "anisotropy", "bias_field", "noise", "gamma", "blur"),
    "ct": ("noise", "blur", "anisotropy", "hu_offset", "hu_scale", "rotation", "scaling"),
    "us": ("speckle_noise", "motion_blur", "pixelate", "jpeg_compression", "brightness_up",
           "brightness_down", "contrast_down", "rotation", "scaling"),
    "image2d": ("noise", "speckle_noise", "pixelate", "jpeg_compression", "blur",
                "brightness_up", "brightness_down", "contrast_up", "contrast_down", "gamma",
                "rotation", "scaling"),
    "mask": ("rotation", "scaling", "anisotropy", "boundary_noise"),
}


# ---------------------------------------------------------------------------------------------
# public API


def is_binary_intensity(stats: Mapping[str, Any], rtol: float = 1e-3) -> bool:
    """Whether intensity statistics describe an image of exactly two values (a shape mask).

    A variable in ``[a, b]`` with mean ``m`` has variance at most ``(m - a)(b - m)``, with equality
    exactly when it takes only the values ``a`` and ``b`` (Bhatia-Davis inequality).

    Args:
        stats: ``{"mean", "std", "min", "max"}`` as the fingerprint records them.
        rtol: relative tolerance of the equality.
    """
    try:
        mean, std = float(stats["mean"]), float(stats["std"])
        lo, hi = float(stats["min"]), float(stats["max"])
    except (KeyError, TypeError, ValueError):
        return False
    bound = (mean - lo) * (hi - mean)
    return hi > lo and bound > 0 and math.isclose(std * std, bound, rel_tol=rtol)


def shift_kind(plan: Mapping[str, Any]) -> str:
    """The kind of image a preprocessing plan describes.

    ``mask`` when the plan's intensity statistics are those of a two-valued image whose lower
    value is 0, background and shape (:func:`is_binary_intensity`; AdrenalMNIST3D records no
    modality; a segmentation's statistics come from its labelled voxels, which hold no
    background, so two-valued structures do not count); else ``ct`` for modality
    CT, ``us`` for ultrasound (:func:`capsmed.data.transforms.is_ultrasound`'s names), ``image2d``
    for other 2D images and ``mr`` for other 3D images (MRI, ``other``, the synthetic demo).

    Args:
        plan: from :func:`capsmed.data.fingerprint.make_plan` (``spatial_dims``, ``modality``,
            ``intensity``).
    """
    modality = str(plan.get("modality") or "").upper()
    stats = plan.get("intensity") or {}
    if is_binary_intensity(stats) and float(stats.get("min", 1.0)) == 0.0:
        return "mask"
    if modality == "CT":
        return "ct"
    if modality in ("US", "ULTRASOUND"):
        return "us"
    return "image2d" if int(plan.get("spatial_dims", 3)) == 2 else "mr"


def default_shifts(plan: Mapping[str, Any]) -> list[str]:
    """The default shift list for a plan's kind (:func:`shift_kind`) and dimensionality.

    - 3D MR and other grey-value 3D images: rotation, scaling, anisotropy, bias_field, noise
      (Rician), gamma, motion, ghosting, spike, blur (2D MR: without the k-space artefacts);
    - CT (2D or 3D): noise (HU), blur, anisotropy (slice thickness), hu_offset, hu_scale,
      rotation, scaling;
    - 2D ultrasound: MedMNIST-C's BreastMNIST list (speckle_noise, motion_blur, pixelate,
      jpeg_compression, brightness_up, brightness_down, contrast_down), rotation, scaling;
    - other 2D images: MedMNIST-C's ChestMNIST list (noise, speckle_noise, pixelate,
      jpeg_compression, blur, brightness_up / _down, contrast_up / _down, gamma), rotation,
      scaling;
    - binary masks: rotation, scaling, anisotropy, boundary_noise.

    Args:
        plan: from :func:`capsmed.data.fingerprint.make_plan`.

    Returns:
        Shift names (keys of :data:`SHIFTS`).
    """
    kind = shift_kind(plan)
    dims = int(plan.get("spatial_dims", 3))
    key = "mr2d" if kind == "mr" and dims == 2 else kind
    return [n for n in DEFAULT_SHIFTS[key] if dims in SHIFTS[n].dims]


def check_shift(name: Any, kind: str | None = None, dims: int | None = None) -> Shift:
    """The registered shift ``name``, checked against a kind and dimensionality.

    Raises:
        CapsmedError: one line: the name is unknown, or the shift does not suit the kind or dims.
    """
    if name not in SHIFTS:
        raise CapsmedError(f"unknown shift {name!r}; known: {', '.join(sorted(SHIFTS))}")
    shift = SHIFTS[name]
    if kind is not None and kind not in shift.applies_to:
        raise CapsmedError(f"shift {name!r} applies to {', '.join(shift.applies_to)} images, "
                           f"not {kind}")
    if dims is not None and dims not in shift.dims:
        raise CapsmedError(f"shift {name!r} applies to "
                           f"{' or '.join(f'{d}D' for d in shift.dims)} images, not {dims}D")
    return shift


def check_severity(severity: Any) -> int:
    """``severity`` as an int in 0..5.

    Raises:
        CapsmedError: one line when it is not an integer from 0 to 5.
    """
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) \
            or not 0 <= int(severity) <= len(SEVERITIES):
        raise CapsmedError(f"shift severity must be an integer from 0 (none) to "
                           f"{len(SEVERITIES)}, got {severity!r}")
    return int(severity)


def apply_shift(name: str, severity: int, image: np.ndarray, label: np.ndarray | None, *,
                seed_key: str, spacing: Sequence[float] | None = None,
                kind: str = "mr") -> tuple[np.ndarray, np.ndarray | None]:
    """Apply one shift at one severity to a study in its original intensity scale.

    Args:
        name: a key of :data:`SHIFTS`.
        severity: 0 (identity: the inputs are returned as they are, the same objects) to 5.
        image: ``(C, *S)`` with 2 or 3 spatial axes, in the original scale (raw HU for CT).
        label: ``(*S)`` integer labels, or None (classification).
        seed_key: the case's stable key (e.g. its case id); with ``name`` it seeds the shift's
            random draws, so the result is deterministic per (case, shift, severity).
        spacing: voxel size per spatial axis in mm (rotation, blur and motion act in physical
            space); None: isotropic 1 mm.
        kind: one of :data:`KINDS` (:func:`shift_kind` of the plan).

    Returns:
        ``(image (C, *S) float32, label (*S) of the label's dtype | None)``, the same shapes as
        the inputs. Spatial shifts resample within the same grid (image linear, label nearest,
        out-of-field voxels filled with the channel's minimum and label 0); other shifts return
        the label unchanged (the same object).

    Raises:
        CapsmedError: unknown name, bad severity, or a shift that does not suit ``kind`` or the
            dimensionality (one line each).
        ValueError: unknown kind, or shapes that do not fit.
    """
    severity = check_severity(severity)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (C, *S) with 2 or 3 spatial axes, got shape "
                         f"{image.shape}")
    dims = image.ndim - 1
    shift = check_shift(name, kind, dims)
    if label is not None and tuple(np.shape(label)) != image.shape[1:]:
        raise ValueError(f"label shape {np.shape(label)} must equal the image's spatial shape "
                         f"{image.shape[1:]}")
    if severity == 0:
        return image, label
    space = np.ones(dims) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if space.shape != (dims,) or not np.all(space > 0):
        raise ValueError(f"spacing must be {dims} positive values, got {spacing!r}")
    ctx = _Context(kind=kind, spacing=space, rng=_rng(seed_key, name))
    out, new_label = shift.fn(image.astype(np.float64), label, shift.parameter(severity, kind),
                              ctx)
    return np.asarray(out, dtype=np.float32), new_label


# ---------------------------------------------------------------------------------------------
# configuration


def _schema_defaults() -> dict[str, Any]:
    from capsmed.config import load_schema

    props = load_schema()["properties"]["shift"]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if "default" in v}


def validate_shift_config(cfg: Mapping[str, Any], source: str = "config") -> list[str]:
    """Shift names in a config that are not registered (the schema cannot know the registry).

    Checks the global ``shift.shifts`` and every ``datasets.NAME.shift.shifts``. Whether a shift
    suits a dataset's images needs its plan: :func:`shift_settings` checks that.

    Args:
        cfg: a configuration (validated or not).
        source: the config file's name, for messages.

    Returns:
        One line per unknown name, naming the key and the known names; empty when none.
    """
    known = ", ".join(sorted(SHIFTS))
    blocks = [("shift", cfg.get("shift"))]
    blocks += [(f"datasets.{name}.shift", (ds or {}).get("shift"))
               for name, ds in (cfg.get("datasets") or {}).items()]
    problems = []
    for where, block in blocks:
        for name in (block or {}).get("shifts") or []:
            if name not in SHIFTS:
                problems.append(f"{source}: {where}.shifts: unknown shift {name!r}; "
                                f"known: {known}")
    return problems


def shift_settings(cfg: Mapping[str, Any], dataset: str, plan: Mapping[str, Any]) -> dict:
    """The shifted stages' settings for one dataset: global ``shift`` < ``datasets.NAME.shift``.

    Args:
        cfg: the configuration (validated or not: missing keys take the schema's defaults).
        dataset: the dataset's name.
        plan: its preprocessing plan (for the default list and the kind check).

    Returns:
        ``{"enabled": bool, "shifts": [names], "severities": [sorted, unique ints in 1..5],
        "tta": bool, "reference": model entry or None}``; ``shifts`` is :func:`default_shifts`
        of the plan when the config's is null, and empty when ``enabled`` is false.

    Raises:
        CapsmedError: one line naming the dataset and the first unknown or unsuitable shift, or a
            bad severity.
    """
    from capsmed.config import deep_merge

    merged = deep_merge(_schema_defaults(), dict(cfg.get("shift") or {}))
    ds = (cfg.get("datasets") or {}).get(dataset) or {}
    merged = deep_merge(merged, dict(ds.get("shift") or {}))
    kind = shift_kind(plan)
    dims = int(plan.get("spatial_dims", 3))
    names = merged.get("shifts")
    names = default_shifts(plan) if names is None else list(names)
    for name in names:
        try:
            check_shift(name, kind, dims)
        except CapsmedError as exc:
            raise CapsmedError(f"datasets.{dataset}.shift.shifts: {exc}") from None
    severities = []
    for severity in merged.get("severities") or []:
        try:
            check_severity(severity)
        except CapsmedError as exc:
            raise CapsmedError(f"datasets.{dataset}.shift.severities: {exc}") from None
        if severity == 0:
            raise CapsmedError(f"datasets.{dataset}.shift.severities: severity 0 is the clean "
                               "reference, always run; list severities from 1 to 5")
        severities.append(int(severity))
    enabled = bool(merged.get("enabled", True))
    return {"enabled": enabled, "shifts": list(dict.fromkeys(names)) if enabled else [],
            "severities": sorted(set(severities)), "tta": bool(merged.get("tta", False)),
            "reference": merged.get("reference")}
