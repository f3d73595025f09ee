"""Large-volume inference: peak memory and time of the bounded path against the plain MONAI path.

One command::

    nice -n 19 python benchmarks/bench_bigvolume.py --sizes 128x128x75,256x256x150,512x512x300

For each size it writes a CT-like study (``--out``/``ct_XxYxZ.nii.gz``, int16 HU at 0.8 x 0.8 x
1.5 mm: air -1000 inside the field of view and -1024 outside it, an elliptic body of soft
tissue, and three organs: a liver-like one (60 HU), a spleen-like one (45 HU) and two
kidney-like ones (150 HU)), then runs each stage in a fresh Python process, so that the
process's peak resident memory (``ru_maxrss``) is the stage's own:

- ``preprocess``: the plan's deterministic MONAI transforms (load, RAS, crop, CT window, pad);
- ``bounded``: :func:`capsmed.infer.engine.predict_segmentation_case` (what ``capsmed evaluate``
  and ``capsmed predict`` run): slab-by-slab stitching, windows outside the body not run;
- ``plain``: :func:`capsmed.infer.engine.predict_segmentation_case_plain`: MONAI
  ``sliding_window_inference`` over the whole image for every TTA pass at the same window,
  overlap, blending and flips, then ``Invertd`` of the mean probabilities and the argmax.

Both inference stages return what evaluate and predict ask for (TTA on: the uncertainty and
each pass's label map; evidence and probability maps). The model is the demo's ``capsunet``
(``get_model("capsunet", 3, 1, 4)``, 32^3 windows) **untrained, built with seed 0**: memory and
time do not depend on the weights, and the label maps of the two paths are compared voxel by
voxel (Dice per class between them, and the voxels that differ). ``--model unet`` uses the
demo's UNet baseline instead (faster on a CPU). Output: a Markdown table on stdout and
``--out``/``bench_bigvolume.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's capsmed

ZOOMS = (0.8, 0.8, 1.5)


def make_ct(shape: tuple[int, int, int], path: Path, seed: int = 0) -> None:
    """Write a CT-like int16 NIfTI study of ``shape`` voxels at :data:`ZOOMS` mm."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    fov = x ** 2 + y ** 2 <= 1.0
    body2d = (x / 0.75) ** 2 + (y / 0.55) ** 2 <= 1.0
    vol = np.empty(shape, np.int16)
    organs = [((-0.3, 0.1, 0.0), (0.35, 0.3, 0.6), 60),   # liver-like
              ((0.4, 0.15, 0.1), (0.15, 0.15, 0.3), 45),  # spleen-like
              ((-0.25, -0.3, -0.1), (0.1, 0.1, 0.25), 150),  # kidney-like
              ((0.25, -0.3, -0.1), (0.1, 0.1, 0.25), 150)]
    for k in range(shape[2]):
        z = -1 + 2 * k / max(shape[2] - 1, 1)
        plane = np.where(fov, -1000.0, -1024.0)
        plane[body2d] = 30.0
        for (cx, cy, cz), (rx, ry, rz), hu in organs:
            inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
            plane[inside & body2d] = hu
        plane[fov] += rng.normal(0, 15, int(fov.sum()))
        vol[:, :, k] = np.round(plane).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([*ZOOMS, 1.0])), str(path))


def plan(spacing: list[float] | None) -> dict:
    """The benchmark's plan: the demo's 32^3 window, CT window -160..240 HU, 4 classes."""
    return {"task": "segmentation", "spatial_dims": 3, "patch_size": [32, 32, 32],
            "normalization": "ct", "ct_window": [-160.0, 240.0], "spacing": spacing,
            "crop_foreground": True, "size_divisible": 8, "num_classes": 4, "in_channels": 1}


def child(stage: str, image: str, out: str, model_name: str, spacing: list[float] | None,
          tta: bool, threads: int, budget: float | None) -> None:
    """Run one stage in this (fresh) process and print its JSON record."""
    import torch

    from capsmed.data.transforms import build_preprocess_transforms
    from capsmed.infer.engine import predict_segmentation_case, predict_segmentation_case_plain
    from capsmed.models import get_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kwargs = ({"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}
              if model_name == "unet" else {})
    model = get_model(model_name, spatial_dims=3, in_channels=1, out_channels=4, **kwargs).eval()
    p = plan(spacing)
    pre = build_preprocess_transforms(p)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    use = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = use.ru_utime + use.ru_stime
    rec: dict = {"stage": stage}
    if stage == "preprocess":
        data = pre({"image": image})
        rec["preprocessed_shape"] = list(data["image"].shape[1:])
    else:
        icfg = {"overlap": 0.25, "mode": "gaussian", "tta": tta, "tta_flips": "axes",
                "largest_component": False, "precision": "float32", "sw_batch_size": 2,
                "evidence": True}
        if stage == "bounded":
            res = predict_segmentation_case(model, {"image": image}, p, pre,
                                            torch.device("cpu"), {**icfg, "memory_mb": budget})
            rec["memory"] = res["memory"]
        else:
            res = predict_segmentation_case_plain(model, {"image": image}, p, pre,
                                                  torch.device("cpu"), icfg)
        np.save(out, res["pred"])
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    use = resource.getrusage(resource.RUSAGE_SELF)
    rec["cpu_seconds"] = round(use.ru_utime + use.ru_stime - cpu0, 1)  # steadier on a shared box
    rec["base_mb"] = round(base)
    rec["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(rec))


def run_stage(stage: str, image: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--image", str(image), "--pred", str(out),
           "--model", args.model, "--threads", str(args.threads)]
    if args.spacing:
        cmd += ["--spacing", args.spacing]
    if not args.tta:
        cmd += ["--no-tta"]
    if args.budget:
        cmd += ["--budget", str(args.budget)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"stage": stage, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(line[0][len("RESULT "):])


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Dice per foreground class between two label maps, and the voxels that differ."""
    dice = {}
    for c in range(1, 4):
        x, y = a == c, b == c
        s = int(x.sum() + y.sum())
        dice[str(c)] = 1.0 if s == 0 else round(2 * int((x & y).sum()) / s, 6)
    return {"dice": dice, "voxels_differing": int((a != b).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128x128x75,256x256x150,512x512x300")
    ap.add_argument("--out", default="benchmarks/_bigvolume")
    ap.add_argument("--model", default="capsunet", choices=["capsunet", "unet"])
    ap.add_argument("--spacing", default="", help="plan spacing, e.g. 1.6,1.6,3 (resamples)")
    ap.add_argument("--stages", default="preprocess,bounded,plain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=None, help="inference.memory_mb (bounded)")
    ap.add_argument("--no-tta", dest="tta", action="store_false")
    ap.add_argument("--child", default=None)
    ap.add_argument("--image", default=None)
    ap.add_argument("--pred", default=None)
    args = ap.parse_args()
    spacing = [float(v) for v in args.spacing.split(",")] if args.spacing else None
    if args.child:
        child(args.child, args.image, args.pred, args.model, spacing, args.tta, args.threads,
              args.budget)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        shape = tuple(int(v) for v in size.split("x"))
        image = out / f"ct_{size}.nii.gz"
        if not image.is_file():
            make_ct(shape, image)
        rec = {"size": size, "voxels": int(np.prod(shape))}
        for stage in args.stages.split(","):
            rec[stage] = run_stage(stage, image, out / f"pred_{size}_{stage}.npy", args)
            print(json.dumps({"size": size, **rec[stage]}), file=sys.stderr, flush=True)
        preds = [out / f"pred_{size}_{s}.npy" for s in ("bounded", "plain")]
        if all("error" not in rec.get(s, {"error": 1}) for s in ("bounded", "plain")):
            rec["agreement"] = compare(np.load(preds[0]), np.load(preds[1]))
        rows.append(rec)
        doc = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {args.threads} threads",
               "command": " ".join(sys.argv), "model": f"{args.model} (untrained, seed 0)",
               "tta": args.tta, "spacing": spacing, "rows": rows}
        (out / "bench_bigvolume.json").write_text(json.dumps(doc, indent=1))
    print("| size | stage | peak RSS MB | s | CPU s | notes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for s in args.stages.split(","):
            x = r[s]
            note = x.get("error") or x.get("memory", "")
            if s == "bounded" and "agreement" in r:
                note = f"{note} agreement with plain: {r['agreement']}"
            print(f"| {r['size']} | {s} | {x.get('peak_mb', '-')} | {x.get('seconds', '-')} "
                  f"| {x.get('cpu_seconds', '-')} | {note} |")


if __name__ == "__main__":
    main()
