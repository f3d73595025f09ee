"""``capsmed export``: a trained model out of the pipeline, as ONNX, TorchScript or a MONAI bundle.

Every format is built from the one inference layer (:class:`capsmed.infer.predictor.Predictor`)
and checked in the command itself on the dataset's first test case, preprocessed by the
predictor's own transforms:

- **ONNX** (:data:`OPSET`): the TorchScript-based exporter traces the network, so routing loops
  are unrolled at their fixed iteration count (:func:`capsmed.layers.routing.dynamic_routing`
  runs its forward as plain tensor operations while a model is exported). Batch and, where the
  model allows (segmenters, classifiers not built for one size), the spatial axes are dynamic.
  onnxruntime runs the file on the case's centre window and, when it is small, the whole
  preprocessed image; the largest absolute difference to the eager model is logged and must be
  under :data:`TOLERANCE`. An all-zero input must give finite outputs (squash and softmax at
  zero length). The plan, label names and settings are the file's metadata properties.
- **TorchScript**, by tracing (routing is a custom ``autograd.Function``, which scripting cannot
  compile), with the same checks. ``torch.export`` is tried too and its outcome recorded.
- **MONAI bundle**: ``configs/metadata.json``, ``configs/inference.json`` (this plan's
  preprocessing as MONAI transforms, a sliding-window inferer with the recorded flips, the
  inversion to the study's grid), ``models/model.ts`` and ``models/model.pt``, ``LICENSE`` and
  ``docs/README.md``. The command runs the bundle on the first test case and compares it with
  :meth:`Predictor.predict` (at most :data:`BUNDLE_VOXEL_TOLERANCE` of voxels may differ).

Outputs go to ``results/{dataset}/export/{model}[/fold{k}]/`` (:meth:`capsmed.paths.Layout.export_dir`),
with ``{format}.json`` recording the check, written last.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from capsmed import __version__
from capsmed.errors import CapsmedError
from capsmed.models.base import CapsmedModel

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "bundle")
#: ONNX opset of the exported graphs (onnxruntime 1.32 runs up to 23; 17 is read by every
#: runtime released since 2022 and has every operator the models use).
OPSET = 17
#: Largest absolute difference of the class probabilities allowed between the export and the
#: eager model.
TOLERANCE = 1e-4
#: Largest fraction of voxels whose label may differ between the bundle and ``capsmed predict``
#: (argmax ties moved by float rounding; 0 in the tests).
BUNDLE_VOXEL_TOLERANCE = 1e-4
#: Check the whole preprocessed image too when it has at most this many windows' voxels.
WHOLE_IMAGE_WINDOWS = 8
INTENDED_USE = "research use, not a medical device"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
#: Training data licences by dataset source (None: the data are the user's own).
DATA_LICENCES: dict[str, str | None] = {
    "msd": "CC BY-SA 4.0 (Medical Segmentation Decathlon, http://medicaldecathlon.com)",
    "medmnist": "CC BY 4.0 (MedMNIST v2, https://medmnist.com)",
    "synthetic": "none: synthetic images from capsmed's built-in generator (MONAI "
                 "create_test_image_2d/3d)",
}


class ExportedNetwork(nn.Module):
    """A capsmed model whose output is its class probabilities: what every export runs.

    ``forward(x)`` is ``model.probabilities(model(x))``, what the sliding window of
    :func:`capsmed.infer.engine.segment` blends and what a classifier's prediction is. Built
    from the checkpoint's model description, so a MONAI bundle's ``network_def`` can name it.

    Args:
        name: Registered model name.
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Classes (background included for segmenters).
        args: The model's options (the checkpoint's ``model.args``).
        model: An already built model (the other arguments then only describe it).

    Shapes:
        ``(B, in_channels, *S) -> (B, out_channels, *S)`` (segmenters) or ``(B, out_channels)``.
    """

    def __init__(self, name: str, spatial_dims: int, in_channels: int, out_channels: int,
                 args: Mapping[str, Any] | None = None, *, model: CapsmedModel | None = None) -> None:
        super().__init__()
        if model is None:
            from capsmed.models import get_model

            model = get_model(name, spatial_dims, in_channels, out_channels, **dict(args or {}))
        self.model = model

    @classmethod
    def wrap(cls, model: CapsmedModel) -> ExportedNetwork:
        """The exported network of a built model, in eval mode."""
        spec = (getattr(model, "registry_name", ""), model.spatial_dims, model.in_channels,
                model.out_channels)
        return cls(*spec, model=model).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, C, *S)`` or ``(B, C)`` of ``x`` ``(B, C_in, *S)``."""
        return self.model.probabilities(self.model(x))


def dynamic_spatial(model: CapsmedModel) -> bool:
    """Whether the model accepts other spatial sizes than the one it is traced with."""
    return model.task == "segmentation" or not getattr(model, "fixed_size", False)


def _dynamic_axes(model: CapsmedModel) -> dict[str, dict[int, str]]:
    spatial = ({2 + a: f"spatial{a}" for a in range(model.spatial_dims)}
               if dynamic_spatial(model) else {})
    out_spatial = spatial if model.task == "segmentation" else {}
    return {INPUT_NAME: {0: "batch", **spatial}, OUTPUT_NAME: {0: "batch", **out_spatial}}


def check_inputs(image: torch.Tensor, plan: Mapping[str, Any], task: str) -> list[torch.Tensor]:
    """The inputs an export is checked on: one real preprocessed case.

    Args:
        image: ``(C, *S)`` preprocessed image.
        plan: Its plan (``patch_size``).
        task: ``segmentation`` or ``classification``.

    Returns:
        ``(1, C, *S')`` inputs: a segmenter's centre window of ``patch_size`` (the first is what
        the export is traced with), then the whole image when it is not the window and has at
        most :data:`WHOLE_IMAGE_WINDOWS` windows' voxels; a classifier's image.
    """
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    image = image.float().unsqueeze(0)
    if task != "segmentation":
        return [image]
    patch = [int(p) for p in plan["patch_size"]]
    size = list(image.shape[2:])
    starts = [(s - p) // 2 for s, p in zip(size, patch, strict=True)]
    window = image[(slice(None), slice(None), *(slice(a, a + p) for a, p in
                                                 zip(starts, patch, strict=True)))]
    out = [window.contiguous()]
    if size != patch and np.prod(size) <= WHOLE_IMAGE_WINDOWS * np.prod(patch):
        out.append(image)
    return out


def _max_difference(run, net: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference between ``run(x)`` (numpy) and the eager network over inputs."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            ref = net(x).numpy()
            got = np.asarray(run(x))
            if got.shape != ref.shape:
                raise CapsmedError(f"exported output shape {got.shape} differs from the model's "
                                   f"{ref.shape} for input {tuple(x.shape)}")
            worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def _zero_input_finite(run, x: torch.Tensor) -> bool:
    """Whether the export gives finite outputs for an all-zero input (capsules of zero length)."""
    return bool(np.isfinite(np.asarray(run(torch.zeros_like(x)))).all())


def _checked(fmt: str, path: Path, diff: float, finite: bool) -> None:
    logger.info("%s: %s largest absolute difference to the eager model %.3g (tolerance %.0e)",
                path, fmt, diff, TOLERANCE)
    if not diff <= TOLERANCE:
        raise CapsmedError(f"{path}: {fmt} export differs from the eager model by {diff:.3g} "
                           f"(tolerance {TOLERANCE:.0e})")
    if not finite:
        raise CapsmedError(f"{path}: {fmt} export gives NaN or infinite outputs for an all-zero "
                           "input")


def _register_symbolics() -> None:
    """ONNX has no ``expm1`` (Efficient-CapsNet's squash): ``Exp(x) - 1``, within 1e-7 of it."""
    from torch.onnx import register_custom_op_symbolic

    def expm1(g: Any, x: Any) -> Any:
        one = g.op("Constant", value_t=torch.tensor(1.0))
        return g.op("Sub", g.op("Exp", x), g.op("CastLike", one, x))

    register_custom_op_symbolic("aten::expm1", expm1, OPSET)


def export_onnx(net: ExportedNetwork, inputs: Sequence[torch.Tensor], path: Path,
                metadata: Mapping[str, str]) -> dict[str, Any]:
    """Write and check an ONNX file.

    Args:
        net: The network (eval mode, CPU).
        inputs: Check inputs (:func:`check_inputs`); the first is traced.
        path: The ``.onnx`` file.
        metadata: Metadata properties (strings).

    Returns:
        ``{"file", "opset", "dynamic_axes", "max_abs_diff", "zero_input_finite", "bytes"}``.

    Raises:
        CapsmedError: onnx or onnxruntime missing, or a failed check.
    """
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise CapsmedError(f"ONNX export needs onnx and onnxruntime ({exc.name} missing): "
                           "pip install 'capsmed[export]'") from None
    _register_symbolics()
    axes = _dynamic_axes(net.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")

    def export(dynamic: dict[str, dict[int, str]]) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes and the legacy exporter
            torch.onnx.export(net, (inputs[0],), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic)

    try:
        export(axes)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        # e.g. the EM capsules' unfold of windows, which torch's ONNX exporter cannot convert
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CapsmedError(f"{path}: {metadata.get('model', 'the model')} cannot be exported to "
                           f"ONNX by torch's exporter: {first[:300]}") from None
    proto = onnx.load(str(tmp))
    proto.doc_string = f"capsmed {metadata.get('model', '')}: {INTENDED_USE}"
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {INPUT_NAME: x.numpy()})[0]

    diff = _max_difference(run, net, inputs)
    finite = _zero_input_finite(run, inputs[0])
    _checked("ONNX", path, diff, finite)
    tmp.replace(path)
    return {"file": path.name, "opset": OPSET,
            "dynamic_axes": {k: list(v.values()) for k, v in axes.items()},
            "max_abs_diff": diff, "zero_input_finite": finite, "bytes": path.stat().st_size}


def trace_torchscript(net: ExportedNetwork, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The network traced (routing unrolled), frozen-free so ``torch.jit.load`` can rebuild it."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.trace(net, (example,), check_trace=False)


def try_torch_export(net: ExportedNetwork, example: torch.Tensor) -> dict[str, Any]:
    """Whether ``torch.export`` captures the network (and gives its values), with the reason if not.

    Returns:
        ``{"works": bool, "max_abs_diff": float | None, "reason": str | None}``.
    """
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(net, (example,))
            got = program.module()(example)
            diff = float((got - net(example)).abs().max())
    except Exception as exc:  # noqa: BLE001 - any failure is the answer recorded
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"works": False, "max_abs_diff": None, "reason": f"{type(exc).__name__}: {first}"}
    return {"works": diff <= TOLERANCE, "max_abs_diff": diff,
            "reason": None if diff <= TOLERANCE else "values differ"}


def export_torchscript(net: ExportedNetwork, inputs: Sequence[torch.Tensor], path: Path, *,
                       metadata: Mapping[str, str] | None = None,
                       torch_export: bool = True) -> dict[str, Any]:
    """Write and check a traced TorchScript file.

    Args:
        net: The network (eval mode, CPU).
        inputs: Check inputs (:func:`check_inputs`); the first is traced.
        path: The ``.ts`` file.
        metadata: Stored as ``extra_files`` (``metadata.json``), as MONAI's ``save_net_with_metadata``.
        torch_export: Also try ``torch.export`` on the first input.

    Returns:
        ``{"file", "max_abs_diff", "zero_input_finite", "bytes", "torch_export"}``.
    """
    traced = trace_torchscript(net, inputs[0])
    buffer = io.BytesIO()
    extra = {"metadata.json": json.dumps(dict(metadata or {}))}
    torch.jit.save(traced, buffer, _extra_files=extra)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return loaded(x).numpy()

    diff = _max_difference(run, net, inputs)
    finite = _zero_input_finite(run, inputs[0])
    _checked("TorchScript", path, diff, finite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    out = {"file": path.name, "max_abs_diff": diff, "zero_input_finite": finite,
           "bytes": path.stat().st_size}
    if torch_export:
        out["torch_export"] = try_torch_export(net, inputs[0])
    return out


# ----------------------------------------------------------------------------------- bundle
def _transform(target: str, **kwargs: Any) -> dict[str, Any]:
    return {"_target_": target, **kwargs}


def _normalise_spec(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's normalisation as a MONAI transform (as :mod:`capsmed.data.transforms`)."""
    norm = plan["normalization"]
    if norm == "zscore":
        return _transform("NormalizeIntensityd", keys="image", nonzero=True, channel_wise=True)
    if norm == "ct":
        lo, hi = plan.get("ct_window") or (-1000.0, 1000.0)
        return _transform("ScaleIntensityRanged", keys="image", a_min=float(lo), a_max=float(hi),
                          b_min=0.0, b_max=1.0, clip=True)
    if norm == "percentile":
        return _transform("ScaleIntensityRangePercentilesd", keys="image", lower=0.5, upper=99.5,
                          b_min=0.0, b_max=1.0, clip=True, channel_wise=True)
    if norm == "minmax":
        return _transform("ScaleIntensityd", keys="image", minv=0.0, maxv=1.0, channel_wise=True)
    raise CapsmedError(f"plan normalization {norm!r} has no bundle transform")


def preprocessing_specs(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """This plan's inference preprocessing as MONAI bundle transform definitions.

    The steps and arguments of :func:`capsmed.data.transforms.build_preprocess_transforms` for
    the image alone (tests apply both to the same studies and compare them).
    """
    seg = plan["task"] == "segmentation"
    dims = int(plan["spatial_dims"])
    t = [_transform("capsmed.data.transforms.LoadPinnedImaged", keys="image", image_only=True),
         _transform("EnsureChannelFirstd", keys="image")]
    if dims == 3:
        t.append(_transform("Orientationd", keys="image", axcodes="RAS",
                            labels=[list(p) for p in (("L", "R"), ("P", "A"), ("I", "S"))]))
    if plan.get("spacing"):
        t.append(_transform("Spacingd", keys="image", pixdim=[float(v) for v in plan["spacing"]],
                            mode="bilinear"))
    if seg and plan.get("crop_foreground", True):
        t.append(_transform("CropForegroundd", keys="image", source_key="image",
                            select_fn="$nonzero", allow_smaller=True))
    t.append(_normalise_spec(plan))
    if seg:
        t.append(_transform("SpatialPadd", keys="image",
                            spatial_size=[int(v) for v in plan["patch_size"]]))
        t.append(_transform("DivisiblePadd", keys="image", k=int(plan.get("size_divisible", 1))))
    else:
        size = int(plan.get("image_size") or plan["patch_size"][0])
        t.append(_transform("Resized", keys="image", spatial_size=[size] * dims, mode="area"))
    return t


class FlipAveragingInferer:
    """MONAI sliding-window inference averaged over test-time flips, as capsmed predicts.

    What :func:`capsmed.infer.engine.segment` does without evidence maps: for each flip (a tuple
    of 0-based spatial axes; ``()`` the plain pass) the image is flipped, segmented by
    ``monai.inferers.SlidingWindowInferer`` and flipped back; the passes' probabilities are
    averaged. A bundle's ``inferer`` names this class.

    Args:
        roi_size: Window size.
        overlap: Window overlap.
        mode: Blending, ``gaussian`` or ``constant``.
        sw_batch_size: Windows per forward pass.
        flips: The flips; ``None`` or ``[[]]``: one pass.
    """

    def __init__(self, roi_size: Sequence[int], overlap: float = 0.25, mode: str = "gaussian",
                 sw_batch_size: int = 2, flips: Sequence[Sequence[int]] | None = None) -> None:
        from monai.inferers import SlidingWindowInferer

        self.flips = [tuple(int(a) for a in f) for f in (flips or [[]])]
        self.window = SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=sw_batch_size,
                                           overlap=overlap, mode=mode)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mean probabilities ``(B, C, *S)`` of ``inputs`` ``(B, C_in, *S)``."""

        def predictor(x: torch.Tensor) -> torch.Tensor:
            return network(x).float()

        runs = []
        with torch.no_grad():
            for axes in self.flips:
                dims = tuple(2 + a for a in axes)
                x = torch.flip(inputs, dims) if dims else inputs
                p = self.window(x, predictor)
                runs.append((torch.flip(p, dims) if dims else p).float())
        return torch.stack(runs).mean(0)


def _data_licence(dataset_cfg: Mapping[str, Any]) -> str:
    source = str(dataset_cfg.get("source", ""))
    if source in DATA_LICENCES:
        return DATA_LICENCES[source] or "none"
    return (f"unknown to capsmed: the training data came from a {source!r} source; its licence "
            "is the data owner's and binds these weights as it binds the data")


def _bundle_inference(plan: Mapping[str, Any], task: str, names: Mapping[str, str] | Sequence[str],
                      settings: Mapping[str, Any], flips: Sequence[Sequence[int]]) -> dict[str, Any]:
    """``configs/inference.json`` of a bundle."""
    doc: dict[str, Any] = {
        "imports": ["$import glob", "$import os", "$import torch",
                    "$from capsmed.data.transforms import nonzero"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/input'",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, "
                    "'*.nii*')))]",
        "device": "cpu",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_specs(plan)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
    }
    if task == "segmentation":
        n = len(names)
        post = [
            _transform("Invertd", keys="pred", transform="@preprocessing", orig_keys="image",
                       nearest_interp=False, to_tensor=True),
            _transform("AsDiscreted", keys="pred", argmax=True),
        ]
        if settings.get("largest_component") and n > 1:
            post.append(_transform("KeepLargestConnectedComponentd", keys="pred",
                                   applied_labels=list(range(1, n)), is_onehot=False,
                                   independent=True))
        post.append(_transform("SaveImaged", keys="pred", output_dir="@output_dir",
                               output_postfix="seg", output_dtype="$numpy.uint8",
                               separate_folder=False, resample=False, print_log=False))
        doc["imports"].append("$import numpy")
        doc["inferer"] = {"_target_": "capsmed.export.FlipAveragingInferer",
                          "roi_size": [int(v) for v in plan["patch_size"]],
                          "overlap": float(settings["overlap"]), "mode": settings["mode"],
                          "sw_batch_size": int(settings["sw_batch_size"]),
                          "flips": [list(f) for f in flips]}
    else:
        post = [_transform("SaveClassificationd", keys="pred", saver=None, meta_keys=None,
                           output_dir="@output_dir", filename="predictions.csv",
                           overwrite=True)]
        doc["inferer"] = {"_target_": "SimpleInferer"}
    doc["postprocessing"] = {"_target_": "Compose", "transforms": post}
    # one study at a time, as capsmed predict: preprocess, infer, post-process (invert, save);
    # a plain loop, so the bundle needs neither a DataLoader nor pytorch-ignite's evaluator
    meta = ", 'pred_meta_dict': d['image'].meta" if task != "segmentation" else ""
    doc["initialize"] = ["$monai.utils.set_determinism(seed=0)", "$torch.set_grad_enabled(False)"]
    doc["run"] = ["$[@postprocessing({**d, 'pred': @inferer(d['image'][None].to(@device), "
                  f"@network)[0].cpu(){meta}}}) for d in @dataset]"]
    return doc


def _bundle_metadata(ckpt: Mapping[str, Any], net: ExportedNetwork, example: torch.Tensor,
                     settings: Mapping[str, Any], licence: str) -> dict[str, Any]:
    """``configs/metadata.json`` of a bundle (MONAI's bundle metadata schema fields)."""
    import monai

    spec, plan, task = ckpt["model"], ckpt["plan"], ckpt["task"]
    names = ckpt["names"]
    labels = ({str(k): v for k, v in names.items()} if isinstance(names, Mapping)
              else {str(i): v for i, v in enumerate(names)})
    dims = int(spec["spatial_dims"])
    spatial = ([int(v) for v in plan["patch_size"]] if task == "segmentation"
               else list(example.shape[2:]))
    if task == "segmentation" or dynamic_spatial(net.model):
        div = int(getattr(net.model, "size_divisible", 1))
        spatial = [f"{div}*n"] * dims if div > 1 else spatial
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20240725.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by capsmed {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"capsmed": __version__, "nibabel": _version("nibabel")},
        "name": f"capsmed {spec['name']} ({ckpt.get('dataset', 'dataset')})",
        "task": f"{task} ({dims}D)",
        "description": f"capsmed model {spec['name']} trained on {ckpt.get('dataset')}; "
                       f"{INTENDED_USE}. Needs capsmed installed for its transforms and inferer.",
        "authors": "capsmed",
        "copyright": "see LICENSE",
        "data_source": str(ckpt.get("dataset")),
        "data_type": "nibabel",
        "intended_use": INTENDED_USE,
        "image_classes": f"{spec['in_channels']} channel(s), preprocessed by the plan "
                         f"(normalisation {plan.get('normalization')})",
        "label_classes": labels if task == "segmentation" else {},
        "pred_classes": labels,
        "eval_metrics": {},
        "references": ["capsmed README", "Sabour et al. 2017, Dynamic Routing Between Capsules"],
        "inference_settings": dict(settings),
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": str(plan.get("modality") or
                                                                       "unknown"),
                "num_channels": int(spec["in_channels"]), "spatial_shape": spatial,
                "dtype": "float32", "value_range": [], "is_patch_data": task == "segmentation",
                "channel_def": {str(i): f"channel {i}" for i in range(int(spec["in_channels"]))}}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "segmentation" if task == "segmentation"
                else "classification",
                "num_channels": int(spec["out_channels"]),
                "spatial_shape": spatial if task == "segmentation" else [],
                "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": task == "segmentation", "channel_def": labels}},
        },
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def model_card(ckpt: Mapping[str, Any], licence: str, checks: Mapping[str, Any]) -> str:
    """A short model card (Markdown): what the model is, its data, its checks, its intended use."""
    spec = ckpt["model"]
    lines = [f"# capsmed {spec['name']}: {ckpt['task']} ({spec['spatial_dims']}D)", "",
             f"**Intended use: {INTENDED_USE}.** It has not been validated for clinical use "
             "and must not inform the diagnosis or treatment of anyone.", "",
             f"- Trained on: {ckpt.get('dataset')} (seed {ckpt.get('seed')}, config hash "
             f"{ckpt.get('config_hash')})",
             f"- Training data licence: {licence}",
             f"- Labels: {json.dumps(ckpt['names'])}",
             f"- Input: {spec['in_channels']} channel(s), preprocessed as the plan in the "
             "metadata says; output: class probabilities",
             f"- Best validation {ckpt.get('metric_name')}: {ckpt.get('best_metric')}",
             "- Limitations: trained on one dataset; performance on other scanners, protocols "
             "or populations is unknown.", ""]
    for fmt, rec in checks.items():
        lines.append(f"- {fmt}: largest absolute difference to the eager model "
                     f"{rec.get('max_abs_diff')}")
    return "\n".join(lines) + "\n"


def export_bundle(predictor: Any, net: ExportedNetwork, inputs: Sequence[torch.Tensor],
                  item: Mapping[str, Any], folder: Path, licence: str) -> dict[str, Any]:
    """Write a MONAI bundle and check it against :meth:`Predictor.predict` on ``item``.

    Args:
        predictor: The :class:`~capsmed.infer.predictor.Predictor` of the model.
        net: Its :class:`ExportedNetwork`.
        inputs: Check inputs (:func:`check_inputs`).
        item: ``{"image": path}`` of the case the bundle is run on.
        folder: The bundle folder (replaced).
        licence: The training data's licence line.

    Returns:
        The check record: TorchScript check, bundle run (voxels or probabilities compared).
    """
    from monai.bundle import run as bundle_run

    from capsmed.infer.engine import classification_flips, segmentation_flips

    ckpt, plan, task = predictor.ckpt, predictor.plan, predictor.task
    settings = predictor.settings
    flips = (segmentation_flips(int(plan["spatial_dims"]), settings) if task == "segmentation"
             else classification_flips(plan, settings))
    if task != "segmentation" and len(flips) > 1:
        logger.warning("%s: the bundle classifies without test-time flips", folder)
    if settings.get("precision") != "float32":
        logger.warning("%s: the bundle runs in float32 (recorded precision %s)", folder,
                       settings.get("precision"))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "configs").mkdir(parents=True)
    (tmp / "models").mkdir()
    (tmp / "docs").mkdir()
    metadata = _bundle_metadata(ckpt, net, inputs[0], settings, licence)
    ts = export_torchscript(net, inputs, tmp / "models" / "model.ts",
                            metadata={"metadata": json.dumps(metadata)}, torch_export=False)
    torch.save(net.state_dict(), tmp / "models" / "model.pt")
    inference = _bundle_inference(plan, task, ckpt["names"], settings, flips)
    inference["network_def"] = {"_target_": "capsmed.export.ExportedNetwork",
                                "name": ckpt["model"]["name"],
                                "spatial_dims": int(ckpt["model"]["spatial_dims"]),
                                "in_channels": int(ckpt["model"]["in_channels"]),
                                "out_channels": int(ckpt["model"]["out_channels"]),
                                "args": dict(ckpt["model"]["args"])}
    (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (tmp / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    (tmp / "LICENSE").write_text(
        "capsmed code and these exported weights: Apache License 2.0.\n\n"
        f"Training data licence: {licence}.\n"
        "Weights trained on data under a share-alike licence (CC BY-SA) are, in the view of many, "
        "an adaptation of that data: share them under the same licence and credit the source.\n\n"
        f"Intended use: {INTENDED_USE}.\n")
    (tmp / "docs" / "README.md").write_text(_bundle_readme(ckpt, licence, task))
    record = {"model_ts": ts, "model_pt": "models/model.pt"}
    record.update(_run_bundle(bundle_run, predictor, item, tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    record["folder"] = folder.name
    record["bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return record


def _bundle_readme(ckpt: Mapping[str, Any], licence: str, task: str) -> str:
    spec = ckpt["model"]
    return (f"# capsmed {spec['name']} bundle\n\n**{INTENDED_USE}.**\n\n"
            f"A {task} model exported by capsmed {__version__} from {ckpt.get('dataset')}. "
            "It needs capsmed installed (`pip install capsmed`): its transforms and inferer are "
            "capsmed's classes, as model-zoo bundles need MONAI.\n\n"
            "Run it on every NIfTI file of a folder:\n\n"
            "```\npython -m monai.bundle run --config_file configs/inference.json "
            "--bundle_root . --dataset_dir INPUT_FOLDER --output_dir OUTPUT_FOLDER\n```\n\n"
            "Segmentations are written as `NAME_seg.nii.gz` on each study's own grid; "
            "classifications as `predictions.csv` (class probabilities).\n\n"
            f"Training data licence: {licence}. See LICENSE.\n")


def _run_bundle(bundle_run, predictor: Any, item: Mapping[str, Any], bundle: Path) -> dict[str, Any]:
    """Run the bundle's inference.json on ``item`` and compare with ``predictor.predict``."""
    with tempfile.TemporaryDirectory(prefix="capsmed-bundle-") as work:
        work_dir = Path(work)
        (work_dir / "in").mkdir()
        image = Path(item["image"])
        if not image.is_file() or not image.name.endswith((".nii", ".nii.gz")):
            return {"bundle_run": f"not run: {image.name} is not a NIfTI file"}
        link = work_dir / "in" / image.name
        shutil.copyfile(image, link)
        t0 = time.perf_counter()
        grad = torch.is_grad_enabled()
        try:  # the bundle's initialize switches gradients off for the whole process: restore
            bundle_run(config_file=str(bundle / "configs" / "inference.json"),
                       bundle_root=str(bundle), dataset_dir=str(work_dir / "in"),
                       output_dir=str(work_dir / "out"))
        finally:
            torch.set_grad_enabled(grad)
        seconds = time.perf_counter() - t0
        expected = predictor.predict({"image": str(image)}, evidence=False)
        if predictor.task == "segmentation":
            import nibabel as nib

            stem = image.name.split(".nii")[0]
            got = np.asarray(nib.load(str(work_dir / "out" / f"{stem}_seg.nii.gz")).dataobj)
            got = got.reshape(expected["pred"].shape)
            differ = int((got != expected["pred"]).sum())
            fraction = differ / max(got.size, 1)
            logger.info("%s: bundle run on %s: %d of %d voxels differ from capsmed predict",
                        bundle, image.name, differ, got.size)
            if fraction > BUNDLE_VOXEL_TOLERANCE:
                raise CapsmedError(f"{bundle}: the bundle's segmentation of {image.name} differs "
                                   f"from capsmed predict in {differ} voxels ({fraction:.2%}; "
                                   f"tolerance {BUNDLE_VOXEL_TOLERANCE:.2%})")
            return {"bundle_run": {"case": image.name, "voxels_differ": differ,
                                   "voxels": int(got.size), "seconds": seconds,
                                   "tolerance_fraction": BUNDLE_VOXEL_TOLERANCE}}
        import csv

        from capsmed.infer.engine import predict_classification_case

        rows = list(csv.reader((work_dir / "out" / "predictions.csv").open()))
        got = np.asarray([float(v) for v in rows[0][1:]])
        ref = predict_classification_case(predictor.model, {"image": str(image)},
                                          predictor.preprocess, predictor.device)["probs"]
        diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
        logger.info("%s: bundle run on %s: class probabilities differ from capsmed's by %.3g",
                    bundle, image.name, diff)
        if not diff <= TOLERANCE:
            raise CapsmedError(f"{bundle}: the bundle's class probabilities of {image.name} differ "
                               f"from capsmed's by {diff:.3g} (tolerance {TOLERANCE:.0e})")
        return {"bundle_run": {"case": image.name, "max_abs_diff": diff, "seconds": seconds,
                               "compared_with": "capsmed's classification without test-time "
                                                "flips"}}


# ----------------------------------------------------------------------------------- command
def export_model(cfg: dict[str, Any], dataset: str, model_name: str, fmt: str, *,
                 fold: int | None = None) -> dict[str, Any]:
    """``capsmed export``: export one trained model in one format and check it.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model_name: Model entry of the dataset.
        fmt: ``onnx``, ``torchscript`` or ``bundle``.
        fold: Fold (default: the config's ``split.fold``).

    Returns:
        The record written to ``export/{model}[/fold{k}]/{fmt}.json``.

    Raises:
        CapsmedError: Unknown format, no trained model, no test case, or a failed check.
    """
    from capsmed.config import dataset_config, resolve_fold
    from capsmed.data.splits import stage_cases
    from capsmed.infer.predictor import Predictor
    from capsmed.infer.runtime import atomic_write_json, package_versions
    from capsmed.paths import Layout, read_json

    if fmt not in FORMATS:
        raise CapsmedError(f"export format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    layout = Layout(Path(cfg["results"]))
    fold_index, path_fold = resolve_fold(cfg, dataset, fold)
    ckpt_path = layout.model_dir(dataset, model_name, path_fold) / "best.pt"
    predictor = Predictor.from_checkpoint(ckpt_path, device="cpu")
    cases = stage_cases(read_json(layout.cases(dataset), "case list"),
                        read_json(layout.splits(dataset), "splits"), "test", fold_index)
    if not cases:
        raise CapsmedError(f"dataset {dataset}: no test case to check the export on")
    item = {"image": cases[0]["image"]}
    image = predictor.preprocess(dict(item))["image"]
    inputs = check_inputs(image, predictor.plan, predictor.task)
    net = ExportedNetwork.wrap(predictor.model)
    out_dir = layout.export_dir(dataset, model_name, path_fold)
    licence = _data_licence(dataset_config(cfg, dataset))
    metadata = {
        "model": model_name, "model_class": predictor.ckpt["model"]["name"],
        "task": predictor.task, "plan": json.dumps(predictor.plan, sort_keys=True),
        "labels": json.dumps(predictor.names), "output": f"{OUTPUT_NAME}: class probabilities",
        "inference": json.dumps(predictor.result_settings, sort_keys=True),
        "intended_use": INTENDED_USE, "training_data_licence": licence,
        "checkpoint_sha256": predictor.checkpoint_sha256, "capsmed_version": __version__,
    }
    t0 = time.perf_counter()
    if fmt == "onnx":
        result = export_onnx(net, inputs, out_dir / "model.onnx", metadata)
    elif fmt == "torchscript":
        result = export_torchscript(net, inputs, out_dir / "model.ts", metadata=metadata)
        te = result["torch_export"]
        logger.info("%s: torch.export %s", out_dir, "works" if te["works"] else
                    f"does not work ({te['reason']})")
    else:
        result = export_bundle(predictor, net, inputs, item, out_dir / "bundle", licence)
    card = out_dir / "MODEL_CARD.md"
    card.write_text(model_card(predictor.ckpt, licence, {fmt: result.get("model_ts", result)}))
    record = {"format": fmt, "dataset": dataset, "model": model_name, "fold": path_fold,
              "checkpoint": str(ckpt_path), "checkpoint_sha256": predictor.checkpoint_sha256,
              "check_case": cases[0]["case_id"],
              "check_inputs": [list(x.shape) for x in inputs], "tolerance": TOLERANCE,
              "intended_use": INTENDED_USE, "training_data_licence": licence,
              "seconds": time.perf_counter() - t0, "versions": package_versions(),
              **result}
    atomic_write_json(layout.export_record(dataset, model_name, fmt, path_fold), record)
    return record
