"""capsmed export: ONNX, TorchScript and MONAI bundles of trained models, checked as the command checks.

CI exports one capsule segmenter (capsunet), one capsule classifier (rescapsnet) and one CNN (unet),
tiny and trained for one epoch, in every format; a slow test exports every registered model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from capsmed.config import validate_config
from capsmed.errors import CapsmedError
from capsmed.export import (
    FORMATS,
    INTENDED_USE,
    OPSET,
    TOLERANCE,
    ExportedNetwork,
    export_model,
    export_onnx,
    export_torchscript,
    preprocessing_specs,
)
from capsmed.models import MODEL_REGISTRY, get_model
from capsmed.models.base import CapsmedModel
from capsmed.paths import Layout
from capsmed.train.loop import train_model
from tests.pipeline_helpers import prepare_all, run_cli, tiny_config, write_config

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TINY_ARGS = {
    "capsunet": {"encoder_channels": [4, 8], "primary_capsules": 2, "primary_dim": 4,
                 "capsules": 2, "capsule_dim": 4, "class_dim": 4, "decoder_channels": [8, 4, 4]},
    "unet": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "rescapsnet": {},
}


def _trained(root: Path, task: str, models: list[str]) -> dict:
    cfg = tiny_config(root / "results", task=task, models=models,
                      train={"epochs": 1, "batch_size": 2, "samples_per_case": 1}
                      if task == "segmentation" else {"epochs": 1, "batch_size": 8})
    cfg["models"] = {m: {"args": TINY_ARGS[m]} for m in models}
    cfg = validate_config(cfg)
    config_path = write_config(cfg, root / "c.yaml")
    prepare_all(config_path)
    for model in models:
        train_model(cfg, "ds", model)
    cfg["_path"] = str(config_path)
    return cfg


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("seg"), "segmentation", ["capsunet", "unet"])


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("cls"), "classification", ["rescapsnet"])


@pytest.fixture(scope="module")
def exported(seg, cls):
    """Every format of capsunet, unet and rescapsnet, exported once: {(model, fmt): record}."""
    out = {}
    for cfg, models in ((seg, ["capsunet", "unet"]), (cls, ["rescapsnet"])):
        clean = {k: v for k, v in cfg.items() if k != "_path"}
        for model in models:
            for fmt in FORMATS:
                out[model, fmt] = export_model(clean, "ds", model, fmt)
    return out


def _export_dir(cfg, model):
    return Layout(Path(cfg["results"])).export_dir("ds", model)


@pytest.mark.parametrize("model", ["capsunet", "unet", "rescapsnet"])
def test_every_format_passes_its_check_and_records_it(exported, seg, cls, model):
    cfg = cls if model == "rescapsnet" else seg
    folder = _export_dir(cfg, model)
    for fmt in FORMATS:
        record = exported[model, fmt]
        assert json.loads((folder / f"{fmt}.json").read_text())["format"] == fmt
        check = record["model_ts"] if fmt == "bundle" else record
        assert check["max_abs_diff"] <= TOLERANCE and check["zero_input_finite"]
    assert exported[model, "onnx"]["opset"] == OPSET
    assert (folder / "model.onnx").is_file() and (folder / "model.ts").is_file()
    assert exported[model, "torchscript"]["torch_export"]["works"] is True
    bundle = folder / "bundle"
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.ts",
                 "models/model.pt", "LICENSE", "docs/README.md"):
        assert (bundle / name).is_file(), name
    run = exported[model, "bundle"]["bundle_run"]
    assert run.get("voxels_differ", 0) == 0 and run.get("max_abs_diff", 0.0) <= TOLERANCE
    assert INTENDED_USE in (folder / "MODEL_CARD.md").read_text()


def test_segmenter_checks_a_window_and_the_whole_real_case(exported):
    shapes = exported["capsunet", "onnx"]["check_inputs"]
    assert shapes[0] == [1, 1, 16, 16, 16] and len(shapes) == 2 and shapes[1] != shapes[0]


@pytest.mark.parametrize("model", ["capsunet", "unet"])
def test_onnx_spatial_axes_are_dynamic_and_zero_input_is_finite(exported, seg, model):
    session = ort.InferenceSession(str(_export_dir(seg, model) / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape[2:] if isinstance(d, int)] == []
    ckpt = torch.load(Path(seg["results"]) / f"ds/models/{model}/best.pt", weights_only=True)
    spec = ckpt["model"]
    net = ExportedNetwork(spec["name"], spec["spatial_dims"], spec["in_channels"],
                          spec["out_channels"], spec["args"])
    net.model.load_state_dict(ckpt["state_dict"])
    net.eval()
    x = torch.randn(1, 1, 24, 16, 32, generator=torch.Generator().manual_seed(0))
    got = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - net(x).numpy()).max() <= TOLERANCE
    zero = session.run(None, {"image": np.zeros((2, 1, 16, 16, 16), np.float32)})[0]
    assert zero.shape == (2, 3, 16, 16, 16) and np.isfinite(zero).all()


def test_onnx_metadata_carries_plan_labels_and_intended_use(exported, seg):
    proto = onnx.load(str(_export_dir(seg, "capsunet") / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    plan = json.loads((Path(seg["results"]) / "ds/preprocessed/plan.json").read_text())
    assert json.loads(meta["plan"]) == plan
    assert json.loads(meta["labels"]) == {"0": "background", "1": "a", "2": "b"}
    assert meta["intended_use"] == "research use, not a medical device"
    assert meta["training_data_licence"].startswith("none")
    assert proto.opset_import[0].version == OPSET


def test_bundle_metadata_and_licence(exported, seg):
    # running the bundle in the export command left this process's gradients on
    assert torch.is_grad_enabled()
    bundle = _export_dir(seg, "capsunet") / "bundle"
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    for key in ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                "name", "task", "description", "authors", "copyright", "intended_use",
                "network_data_format", "required_packages_version"):
        assert key in meta, key
    assert "capsmed" in meta["required_packages_version"]
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 1
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "a", "2": "b"}
    assert "none: synthetic" in (bundle / "LICENSE").read_text()


def test_monai_bundle_run_command_reproduces_capsmed_predict(exported, seg, tmp_path):
    bundle = _export_dir(seg, "capsunet") / "bundle"
    results = Path(seg["results"])
    case = json.loads((results / "ds/splits.json").read_text())["test"][0]
    image = next(c["image"] for c in json.loads((results / "ds/data/cases.json").read_text())
                 ["cases"] if c["case_id"] == case)
    (tmp_path / "in").mkdir()
    os.symlink(Path(image).resolve(), tmp_path / "in" / Path(image).name)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--bundle_root", ".", "--dataset_dir", str(tmp_path / "in"),
           "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert run_cli("-q", "predict", "--model", results / "ds/models/capsunet/best.pt", image,
                   "--out", tmp_path / "pred") == 0
    stem = Path(image).name.split(".nii")[0]
    ours = nib.load(str(tmp_path / "out" / f"{stem}_seg.nii.gz"))
    theirs = nib.load(str(tmp_path / "pred" / f"{stem}_seg.nii.gz"))
    assert np.array_equal(np.asarray(ours.dataobj).squeeze(), np.asarray(theirs.dataobj))  # Dice 1
    assert np.allclose(ours.affine, theirs.affine)


def test_cli_export_prints_the_difference(seg, capsys):
    assert run_cli("-q", "export", "-c", seg["_path"], "-d", "ds", "-m", "unet", "--format",
                   "onnx") == 0
    assert "largest absolute difference" in capsys.readouterr().out


# --------------------------------------------------------------- the bundle's preprocessing
@pytest.mark.parametrize("plan", [
    {"task": "segmentation", "spatial_dims": 3, "patch_size": [16, 16, 16], "size_divisible": 8,
     "normalization": "zscore", "spacing": [1.5, 1.0, 1.0]},
    {"task": "segmentation", "spatial_dims": 3, "patch_size": [16, 16, 16], "size_divisible": 1,
     "normalization": "ct", "ct_window": [-100, 200], "crop_foreground": False},
    {"task": "segmentation", "spatial_dims": 3, "patch_size": [16, 16, 16],
     "normalization": "percentile"},
    {"task": "classification", "spatial_dims": 2, "patch_size": [28, 28], "image_size": 28,
     "normalization": "minmax"},
])
def test_bundle_preprocessing_equals_capsmed_preprocessing(plan, tmp_path):
    from monai.bundle import ConfigParser

    from capsmed.data.transforms import build_preprocess_transforms

    rng = np.random.default_rng(0)
    shape = (20, 18, 22) if plan["spatial_dims"] == 3 else (30, 26)
    data = np.zeros(shape, np.float32)
    data[(slice(2, -3),) * len(shape)] = rng.normal(50, 20, tuple(s - 5 for s in shape))
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 0.9, 2.0, 1.0])), str(path))
    parser = ConfigParser({"imports": ["$from capsmed.data.transforms import nonzero"],
                           "pre": {"_target_": "Compose", "transforms": preprocessing_specs(plan)}})
    ours = parser.get_parsed_content("pre")({"image": str(path)})["image"]
    theirs = build_preprocess_transforms(plan)({"image": str(path)})["image"]
    assert ours.shape == theirs.shape
    assert torch.equal(ours.as_tensor(), theirs.as_tensor())


# --------------------------------------------------------------------------- error messages
class _NanAtZero(CapsmedModel):
    task = "classification"

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__(2, 1, 2)
        self.w = torch.nn.Parameter(torch.ones(2))
        self.bias = bias

    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True)
        return (s / s.abs() + self.bias) * self.w  # NaN at zero, as a bare x / |x| squash


def test_nan_at_zero_length_fails_the_check(tmp_path):
    net = ExportedNetwork.wrap(_NanAtZero())
    x = torch.ones(1, 1, 4, 4)
    with pytest.raises(CapsmedError, match="NaN or infinite outputs for an all-zero input"):
        export_onnx(net, [x], tmp_path / "m.onnx", {})
    with pytest.raises(CapsmedError, match="NaN or infinite outputs for an all-zero input"):
        export_torchscript(net, [x], tmp_path / "m.ts", torch_export=False)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.ts").exists()


def test_a_difference_over_the_tolerance_fails_the_check(tmp_path, monkeypatch):
    import capsmed.export as export

    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    net = ExportedNetwork.wrap(get_model("seed_cnn", 2, 1, 2, image_size=28))
    with pytest.raises(CapsmedError, match="ONNX export differs from the eager model by"):
        export_onnx(net, [torch.randn(1, 1, 28, 28)], tmp_path / "m.onnx", {})


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    net = ExportedNetwork.wrap(get_model("seed_cnn", 2, 1, 2, image_size=28))
    with pytest.raises(CapsmedError, match=r"pip install 'capsmed\[export\]'"):
        export_onnx(net, [torch.randn(1, 1, 28, 28)], tmp_path / "m.onnx", {})


def test_unknown_format_is_refused(cls):
    clean = {k: v for k, v in cls.items() if k != "_path"}
    with pytest.raises(CapsmedError, match="export format must be one of onnx, torchscript, bundle"):
        export_model(clean, "ds", "rescapsnet", "tflite")


# --------------------------------------------------------------------- every registered model
def _example(name: str) -> tuple[CapsmedModel, torch.Tensor]:
    cls = MODEL_REGISTRY[name]
    if cls.task == "segmentation":
        model = get_model(name, 3, 1, 3)
        size = max(16, 2 * int(model.size_divisible))  # instance norm needs > 1 voxel at the bottom
        return model, torch.randn(1, 1, size, size, size)
    kwargs = {"image_size": 28} if cls.fixed_size else {}
    size = 28 if cls.fixed_size else 32
    return get_model(name, 2, 1, 2, **kwargs), torch.randn(1, 1, size, size)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_every_registered_model_exports(name, tmp_path):
    torch.manual_seed(0)
    model, x = _example(name)
    net = ExportedNetwork.wrap(model.eval())
    ts_rec = export_torchscript(net, [x], tmp_path / "m.ts")
    assert ts_rec["max_abs_diff"] <= TOLERANCE
    if name.startswith("emcaps"):  # EM capsules unfold windows: torch's ONNX exporter cannot
        with pytest.raises(CapsmedError, match=f"{name} cannot be exported to ONNX by torch's "
                                               "exporter: Unsupported: ONNX export of operator "
                                               "Unfold"):
            export_onnx(net, [x], tmp_path / "m.onnx", {"model": name})
    else:
        onnx_rec = export_onnx(net, [x], tmp_path / "m.onnx", {"model": name})
        assert onnx_rec["max_abs_diff"] <= TOLERANCE
    assert ts_rec["torch_export"]["works"], ts_rec["torch_export"]["reason"]
