"""onnxruntime against eager torch: latency of the exported models on CPU threads, and export sizes.

Rows (the widths of config/examples/msd_hippocampus.yaml and of the demo's BreastMNIST model):

* ``capsunet`` and ``unet`` (16-256, 2 residual units): one 32^3 window, and one whole
  hippocampus case (``../shared/data/msd_hippocampus_subset``: z-score over non-zero voxels, padded
  to a multiple of 16, MONAI ``sliding_window_inference`` with 32^3 windows, overlap 0.25, gaussian
  blending, 2 windows per batch), with the network run by torch or by onnxruntime;
* ``rescapsnet`` on one 28^2 BreastMNIST image (``medmnist/breastmnist.npz``, test split).

Weights are untrained (seeded): latency does not depend on them. Each export is checked against
the eager model first (largest absolute difference of the probabilities). Timings are medians of
``--repeats`` runs after one warm-up; torch and onnxruntime both get ``--threads`` intra-op threads
(onnxruntime one inter-op thread). Sizes: the ``.onnx`` file (weights inside) and the traced
TorchScript file.

    nice -n 19 .venv/bin/python benchmarks/bench_export.py            # 2 threads
    nice -n 19 .venv/bin/python benchmarks/bench_export.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from capsmed.export import ExportedNetwork, export_onnx, export_torchscript
from capsmed.models import get_model

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
UNET = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _hippocampus_case() -> torch.Tensor:
    import nibabel as nib

    path = sorted((DATA / "msd_hippocampus_subset" / "imagesTr").glob("*.nii.gz"))[0]
    img = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    mask = img != 0
    img[mask] = (img[mask] - img[mask].mean()) / img[mask].std()
    pad = [(0, (-s) % 16) for s in img.shape]
    img = np.pad(img, pad)
    return torch.from_numpy(img)[None, None]


def _breastmnist_image() -> torch.Tensor:
    archive = np.load(DATA / "medmnist" / "breastmnist.npz")
    img = archive["test_images"][0].astype(np.float32) / 255.0
    return torch.from_numpy(img)[None, None]


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench(name: str, kwargs: dict, dims: int, classes: int, window: torch.Tensor,
          case: torch.Tensor | None, threads: int, repeats: int, folder: Path) -> list[str]:
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = ExportedNetwork.wrap(get_model(name, dims, 1, classes, **kwargs))
    onnx_rec = export_onnx(net, [window], folder / f"{name}.onnx", {"model": name})
    ts_rec = export_torchscript(net, [window], folder / f"{name}.ts", torch_export=False)
    session = _session(folder / f"{name}.onnx", threads)

    def ort_run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    def eager_run(x: torch.Tensor) -> torch.Tensor:
        return net(x)

    rows = []
    what = "32^3 window" if dims == 3 else "28^2 image"
    with torch.no_grad():
        t_torch = _median_seconds(lambda: eager_run(window), repeats)
        t_ort = _median_seconds(lambda: ort_run(window), repeats)
        rows.append(f"| {name} | {what} | {t_torch * 1e3:.1f} | {t_ort * 1e3:.1f} | "
                    f"{t_torch / t_ort:.2f} | {onnx_rec['max_abs_diff']:.1e} |")
        if case is not None:
            def whole(run):
                return lambda: sliding_window_inference(case, [32] * 3, 2, run, overlap=0.25,
                                                        mode="gaussian")
            diff = float((whole(eager_run)() - whole(ort_run)()).abs().max())
            c_torch = _median_seconds(whole(eager_run), repeats)
            c_ort = _median_seconds(whole(ort_run), repeats)
            shape = "x".join(str(s) for s in case.shape[2:])
            rows.append(f"| {name} | hippocampus case ({shape}) | {c_torch * 1e3:.1f} | "
                        f"{c_ort * 1e3:.1f} | {c_torch / c_ort:.2f} | {diff:.1e} |")
    sizes = (f"| {name} | {net.model.num_parameters():,} | {onnx_rec['bytes'] / 2**20:.2f} | "
             f"{ts_rec['bytes'] / 2**20:.2f} |")
    return rows + [sizes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = _hippocampus_case()
    window = case[..., :32, :32, :32].contiguous()  # a real 32^3 window (cases are >= 32)
    rows, sizes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs, dims, classes, x, whole in (
                ("capsunet", {}, 3, 3, window, case), ("unet", UNET, 3, 3, window, case),
                ("rescapsnet", {}, 2, 2, _breastmnist_image(), None)):
            *timed, size = bench(name, kwargs, dims, classes, x, whole, args.threads,
                                 args.repeats, Path(tmp))
            rows += timed
            sizes.append(size)
            print(f"{name} done", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| model | input | eager torch ms | onnxruntime ms | speed-up | max abs diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print("\n| model | params | ONNX MiB | TorchScript MiB |")
    print("| --- | ---: | ---: | ---: |")
    print("\n".join(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
