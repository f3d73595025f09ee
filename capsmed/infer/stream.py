"""Sliding-window segmentation in bounded memory: MONAI's windows, stitched slab by slab.

MONAI's ``sliding_window_inference`` allocates the whole output (every class, float32) and its
count map, whatever ``buffer_steps`` says (MONAI #6427); with test-time flips and evidence maps
the old path kept one such map per pass side by side. :func:`stream_segment` computes the same
numbers in a band of planes along the first spatial axis:

- the windows are MONAI's (:func:`monai.data.utils.dense_patch_slices` with its scan interval),
  weighted by its importance map (:func:`monai.data.utils.compute_importance_map`) and added in
  MONAI's order, so the unflipped pass is bitwise MONAI's output; a pass flipped along the first
  axis adds the same terms in another order (equal to float rounding);
- every pass (test-time flip) has its own band accumulator and count band; as soon as no later
  window reaches a plane, the planes are divided by their counts, averaged over the passes and
  handed to a ``sink`` that keeps only what the caller needs (a label map, an entropy map, half
  precision maps);
- body crop: a window whose input is entirely the background value (the corner voxel's value,
  e.g. air clipped by the CT window, or the padding) is not run; the network's output for that
  constant input is computed once per pass and added in its place, so the result is the one the
  full sweep gives while the model runs on the body only (nnU-Net crops to the body for the
  same reason).

Memory: ``passes x (classes + 1) x slab x (other axes)`` float32, instead of
``passes x (classes + 1) x volume``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: ``sink(z0, z1, mean, passes, evidence)``: planes ``[z0, z1)`` of the first spatial axis are
#: final: ``mean`` ``(C, z1 - z0, *rest)`` the mean probabilities over the passes, ``passes`` each
#: pass's ``(C, z1 - z0, *rest)`` probabilities (empty with one pass), ``evidence``
#: ``(C_ev, z1 - z0, *rest)`` or None.
Sink = Callable[[int, int, torch.Tensor, list[torch.Tensor], "torch.Tensor | None"], None]


def scan_interval(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's scan interval per axis: ``int(roi * (1 - overlap))``, at least 1; ``roi`` if it fills."""
    return tuple(int(r) if int(r) == int(s) else max(int(r * (1 - overlap)), 1)
                 for s, r in zip(image_size, roi, strict=True))


def window_starts(image_size: Sequence[int], roi: Sequence[int], overlap: float,
                  ) -> list[tuple[int, ...]]:
    """Start corner of every window MONAI's sliding window visits, in its order.

    Args:
        image_size: Spatial size, each axis ``>= roi``.
        roi: Window size.
        overlap: Window overlap in ``[0, 1)``.

    Returns:
        One tuple of starts per window (first axis outermost, as MONAI iterates).
    """
    from monai.data.utils import dense_patch_slices

    slices = dense_patch_slices(list(image_size), list(roi), scan_interval(image_size, roi, overlap))
    return [tuple(int(s.start) for s in sl) for sl in slices]


def band_bytes(image_shape: Sequence[int], roi: Sequence[int], channels: Sequence[int],
               slab: int) -> int:
    """Bytes of the band accumulators: ``sum(channels + 1) x slab x prod(other axes) x 4``.

    Args:
        image_shape: Spatial shape of the preprocessed image.
        roi: Window size (``slab >= roi[0]``).
        channels: Output channels of each pass.
        slab: Planes held along the first axis.
    """
    rest = 1
    for v in image_shape[1:]:
        rest *= int(v)
    return int(sum(int(c) + 1 for c in channels) * slab * rest * 4)


def stream_segment(forwards: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                   image: torch.Tensor, roi: Sequence[int], sink: Sink, *,
                   overlap: float = 0.25, mode: str = "gaussian",
                   flips: Sequence[tuple[int, ...]] = ((),), sw_batch_size: int = 2,
                   slab: int | None = None, evidence_pass: int | None = None,
                   skip_background: bool = True, autocast: Any = None) -> dict[str, Any]:
    """Sliding-window probabilities of every test-time flip, stitched and reduced slab by slab.

    Args:
        forwards: One callable per pass: ``(B, C_in, *roi)`` -> ``(B, K, *roi)`` float32 (its
            probabilities, and for a pass with evidence the evidence channels after them).
        image: ``(1, C_in, *S)`` preprocessed image, each axis ``>= roi``.
        roi: Window size.
        sink: Receives the finished planes (:data:`Sink`).
        overlap: Window overlap.
        mode: MONAI blending, ``gaussian`` or ``constant``.
        flips: The spatial axes (0-based) each pass flips; ``()`` is the image itself.
        sw_batch_size: Windows per forward call (memory and time only).
        slab: Planes of the band along the first axis (at least ``roi[0]``; default
            ``roi[0]`` plus one scan step).
        evidence_pass: The pass whose ``K`` channels are probabilities then as many evidence
            channels (``None``: no evidence).
        skip_background: Do not run windows whose input is the background value throughout.
        autocast: Context manager factory for the forward pass (``None``: float32).

    Returns:
        ``{"seconds": per-pass seconds, "windows": windows per pass, "skipped": windows not run
        (all passes), "slab": planes held}``.

    Raises:
        ValueError: The image is smaller than the window, or the flips and forwards differ.
    """
    from monai.data.utils import compute_importance_map

    if len(forwards) != len(flips):
        raise ValueError(f"one forward per flip: {len(forwards)} forwards, {len(flips)} flips")
    size = [int(v) for v in image.shape[2:]]
    roi = [int(v) for v in roi]
    if any(s < r for s, r in zip(size, roi, strict=True)):
        raise ValueError(f"image {size} must be at least the window {roi} on every axis")
    device = image.device
    starts = window_starts(size, roi, overlap)
    step0 = scan_interval(size, roi, overlap)[0]
    cap = max(int(slab or 0), roi[0] + step0) if slab is None else max(int(slab), roi[0])
    cap = min(cap, size[0])
    weight = compute_importance_map(tuple(roi), mode=mode, sigma_scale=0.125, device=device,
                                    dtype=torch.float32)[None, None]
    background = image[(0, slice(None), *([0] * len(size)))].reshape(1, -1, *([1] * len(size)))
    autocast = autocast or contextlib.nullcontext

    passes = []
    for p, axes in enumerate(flips):
        dims = tuple(2 + a for a in axes)
        passes.append({"dims": dims, "forward": forwards[p], "acc": None,
                       "cnt": torch.zeros((1, cap, *size[1:]), device=device),
                       "w": torch.flip(weight, dims) if dims else weight,
                       "bg": None, "seconds": 0.0})
    events = []
    for p, axes in enumerate(flips):
        for s in starts:
            orig = tuple(size[a] - s[a] - roi[a] if a in axes else s[a] for a in range(len(size)))
            events.append((orig[0], p, orig))
    events.sort(key=lambda e: e[0])  # stable: MONAI's order within a pass that keeps axis 0

    skipped = 0

    def window(orig: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(o, o + r) for o, r in zip(orig, roi, strict=True))

    # passes that share a forward callable share a queue, so that a band's end leaves at most one
    # short batch per callable (flipped windows are flipped one by one)
    queues: dict[int, list[tuple[int, tuple[int, ...], bool]]] = {}

    def flush(key: int, b0: int) -> None:
        nonlocal skipped
        pending = queues.get(key) or []
        if not pending:
            return
        t0 = time.perf_counter()
        run = [(p, o) for p, o, bg in pending if not bg]
        out = None
        with torch.no_grad(), autocast():
            if run:
                xs = []
                for p, o in run:
                    x = image[(slice(None), slice(None), *window(o))]
                    xs.append(torch.flip(x, passes[p]["dims"]) if passes[p]["dims"] else x)
                out = passes[run[0][0]]["forward"](torch.cat(xs)).float()
            for p in sorted({p for p, _, bg in pending if bg}):
                ps = passes[p]
                if ps["bg"] is None:  # a constant input is its own flip
                    const = background.expand(1, -1, *roi).contiguous()
                    ps["bg"] = ps["forward"](const).float()
                    if ps["dims"]:
                        ps["bg"] = torch.flip(ps["bg"], ps["dims"])
        k = 0
        for p, o, bg in pending:
            ps = passes[p]
            if bg:
                pred = ps["bg"]
                skipped += 1
            else:
                pred = out[k:k + 1]
                k += 1
                if ps["dims"]:
                    pred = torch.flip(pred, ps["dims"])
            if ps["acc"] is None:
                ps["acc"] = torch.zeros((pred.shape[1], cap, *size[1:]), device=device)
            sl = (slice(o[0] - b0, o[0] - b0 + roi[0]), *window(o)[1:])
            ps["acc"][(slice(None), *sl)] += (pred * ps["w"])[0]
            ps["cnt"][(slice(None), *sl)] += ps["w"][0]
        queues[key] = []
        share = (time.perf_counter() - t0) / len(pending)
        for p, _, _ in pending:
            passes[p]["seconds"] += share

    def finish(b0: int, b1: int) -> None:
        n = b1 - b0
        probs, ev = [], None
        for k, ps in enumerate(passes):
            p = ps["acc"][:, :n] / ps["cnt"][:, :n]
            if k == evidence_pass:
                p, ev = p[: p.shape[0] // 2], p[p.shape[0] // 2:]
            probs.append(p)
        mean = torch.stack(probs).mean(0) if len(probs) > 1 else probs[0]
        sink(b0, b1, mean, probs if len(probs) > 1 else [], ev)
        m = cap - n
        for ps in passes:
            for key in ("acc", "cnt"):
                buf = ps[key]
                if m > 0:
                    buf[:, :m] = buf[:, n:].clone()
                buf[:, m:] = 0

    b0 = 0
    for z, p, orig in events:
        if z + roi[0] > b0 + cap:
            for key in list(queues):
                flush(key, b0)
            finish(b0, z)
            b0 = z
        key = id(passes[p]["forward"])
        bg = skip_background and bool(
            (image[(0, slice(None), *window(orig))] == background[0]).all())
        queue = queues.setdefault(key, [])
        queue.append((p, orig, bg))
        if sum(not b for _, _, b in queue) >= sw_batch_size:
            flush(key, b0)
    for key in list(queues):
        flush(key, b0)
    finish(b0, size[0])
    if skipped:
        logger.info("%d of %d windows outside the body not run", skipped, len(events))
    return {"seconds": [ps["seconds"] for ps in passes], "windows": len(starts),
            "skipped": skipped, "slab": cap}
