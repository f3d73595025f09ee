"""The study viewer: pinned NiiVue build, one shared copy, volumes embedded losslessly, small pages."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
from html import unescape
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from capsmed.errors import CapsmedError
from capsmed.report import viewer as vw
from capsmed.report import write_study_report

ASSETS = Path(vw.__file__).parent / "assets"


def _data_block(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="cv-data">(.*?)</script>', html, re.S)
    assert match, "no viewer data block"
    return json.loads(match.group(1))


def _decode(volume: dict) -> nib.Nifti1Image:
    raw = gzip.decompress(base64.b64decode(volume["base64"]))
    return nib.Nifti1Image.from_bytes(raw)


def test_vendored_niivue_has_the_pinned_hash_and_licence():
    data = (ASSETS / "niivue.umd.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == vw.NIIVUE_SHA256
    assert re.search(rb"\w\.niivue=\{\}", data[:1000])  # the UMD wrapper: the global `niivue`
    licence = (ASSETS / "LICENSE.niivue").read_text()
    assert "BSD 2-Clause License" in licence and vw.NIIVUE_VERSION in licence
    assert "http" not in (ASSETS / "capsmed-viewer.js").read_text().replace(
        "https://github.com/niivue", "")


def test_install_assets_copies_once_and_refuses_a_changed_build(tmp_path, monkeypatch):
    target = vw.install_assets(vw.assets_dir(tmp_path))
    assert target == tmp_path / "assets" / f"niivue-{vw.NIIVUE_VERSION}"
    assert sorted(p.name for p in target.iterdir()) == sorted(vw._FILES)
    mtime = (target / "niivue.umd.js").stat().st_mtime_ns
    vw.install_assets(target)
    assert (target / "niivue.umd.js").stat().st_mtime_ns == mtime
    monkeypatch.setattr(vw, "NIIVUE_SHA256", "0" * 64)
    with pytest.raises(CapsmedError, match="differs from the pinned"):
        vw.install_assets(tmp_path / "other")


def test_study_reports_share_one_copy_and_embed_the_volumes(rendered, facts):
    root = rendered["root"]
    copies = sorted(root.rglob("niivue.umd.js"))
    assert copies == [vw.assets_dir(root) / "niivue.umd.js"]
    for model in facts.SEG_MODELS:
        page = rendered["studies"][(facts.SEG, model)]["case_005"]
        html = page.read_text(encoding="utf-8")
        csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
        assert unescape(csp) == vw.CSP and "http" not in csp
        for src in re.findall(r'<script src="([^"]+)"', html):
            assert (page.parent / src).resolve().parent == vw.assets_dir(root).resolve()
        data = _data_block(html)
        names = [v["name"] for v in data["volumes"]]
        assert names[:3] == ["Image", "Prediction", "Ground truth"]
        assert ("Uncertainty" in names) == (model == "ucaps")
        pred = _decode(data["volumes"][1])
        stored = nib.as_closest_canonical(nib.load(
            root / facts.SEG / "eval" / model / "test" / "predictions" / "case_005.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(pred.dataobj), np.asanyarray(stored.dataobj))
        np.testing.assert_allclose(pred.affine, stored.affine)
        image = _decode(data["volumes"][0])
        original = np.asarray(nib.as_closest_canonical(nib.load(
            root / facts.SEG / "data" / "images" / "case_005.nii.gz")).dataobj)
        span = original.max() - original.min()
        assert np.abs(image.get_fdata() - original).max() <= span / 65535 + 1e-6
        assert [lab["name"] for lab in data["labels"]] == ["anterior", "posterior"]
        evidence = [v for v in data["volumes"] if ":" in v["name"]]
        prefix = "Capsules" if model == "ucaps" else "Softmax"
        assert [v["name"] for v in evidence] == [f"{prefix}: anterior", f"{prefix}: posterior"]
        assert all(v["role"] == "heat" and not v["visible"] for v in evidence)
        maps = np.asarray(nib.as_closest_canonical(nib.load(
            root / facts.SEG / "eval" / model / "test" / "predictions"
            / "case_005_evidence.nii.gz")).dataobj)
        for k, layer in enumerate(evidence, start=1):  # steps of 1/63, blank under 0.1
            shown, true = _decode(layer).get_fdata(), maps[..., k]
            assert layer["cal_min"] == 0.1 and np.all(shown[true < 0.1] == 0)
            np.testing.assert_allclose(shown[true >= 0.1], true[true >= 0.1],
                                       atol=0.5 / vw.HEAT_LEVELS + 1e-6)


def test_classification_reports_have_no_viewer(rendered, facts):
    html = rendered["studies"][(facts.CLS, "capsnet")]["img_008"].read_text(encoding="utf-8")
    assert "cv-data" not in html and "<script" not in html


def test_a_64_cubed_study_page_with_its_assets_is_at_most_2_mb(tmp_path):
    """The issue's budget, measured: one study page of a 64^3 volume plus the shared viewer
    files it loads (NiiVue, the glue script, the licence) is at most 2 MB on disk.

    The study is a demo case at 64^3 (the demo generator's noisy float image) with every layer
    and figure a capsule segmenter's page has, its maps written by the evaluation's own writer
    and made to compress worse than the demo's (the demo run at 64^3, 2026-11-30: capsunet pages
    1.83 to 1.86 MB with the shared files, unet pages 1.71 to 1.73 MB): soft probabilities with
    voxel noise everywhere, their entropy as the uncertainty with no calibrated threshold (so no
    voxel is left blank), capsule lengths with noise at 1/2 resolution."""
    from scipy.ndimage import gaussian_filter

    from capsmed.data.synthetic import segmentation_case
    from capsmed.fileio import save_nifti
    from capsmed.infer.study_files import save_segmentation_maps
    from capsmed.measures import normalised_entropy

    rng = np.random.default_rng(0)
    image, label = segmentation_case((64, 64, 64), num_classes=3, seed=0, index=0)
    affine = np.diag([1.2, 1.0, 1.5, 1.0])
    onehot = np.stack([label == k for k in range(3)]).astype(np.float32)

    def soft(maps: np.ndarray, noise: float) -> np.ndarray:
        logits = 6 * np.stack([gaussian_filter(m, 1.5) for m in maps])
        logits = logits + rng.normal(0, noise, logits.shape)
        return np.exp(logits) / np.exp(logits).sum(0)

    probs = soft(onehot, 0.7)
    lengths = soft(onehot[:, ::2, ::2, ::2], 1.5).repeat(2, 1).repeat(2, 2).repeat(2, 3)
    paths = {key: tmp_path / f"{key}.nii.gz" for key in (
        "image", "label", "prediction", "uncertainty")}
    save_nifti(image, paths["image"], affine)
    save_nifti(label, paths["label"], affine, dtype=np.uint8)
    save_nifti(probs.argmax(0), paths["prediction"], affine, dtype=np.uint8)
    save_nifti(normalised_entropy(probs), paths["uncertainty"], affine, dtype=np.float32)
    paths.update(save_segmentation_maps(
        {"evidence": lengths, "probs": probs, "affine": affine}, tmp_path, "case"))
    results = tmp_path / "results"
    out = write_study_report(results / "studies" / "case.html",
                             {"case_id": "case", "task": "segmentation",
                              "labels": {0: "background", 1: "inner", 2: "outer"},
                              "evidence_kind": "capsule lengths",
                              **{k: str(v) for k, v in paths.items()}},
                             assets=vw.assets_dir(results))
    html = out.read_text(encoding="utf-8")
    assert [v["name"] for v in _data_block(html)["volumes"]] == [
        "Image", "Prediction", "Ground truth", "Uncertainty", "Capsules: inner", "Capsules: outer"]
    assert html.count("data:image/png;base64,") >= 2  # the static figures, evidence included
    loaded = [(out.parent / src).resolve() for src in re.findall(r'<script src="([^"]+)"', html)]
    assert sorted(p.name for p in loaded) == ["capsmed-viewer.js", "niivue.umd.js"]
    assets = sum(p.stat().st_size for p in vw.assets_dir(results).iterdir())
    total = out.stat().st_size + assets
    assert total <= 2_000_000, f"page {out.stat().st_size:,} B + assets {assets:,} B"


def test_viewer_leaves_out_a_layer_on_another_grid(tmp_path):
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10), np.float32), affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 11), np.uint8), affine), tmp_path / "seg.nii.gz")
    data, note = vw.viewer_data([vw.Layer("Image", tmp_path / "img.nii.gz", "image"),
                                 vw.Layer("Prediction", tmp_path / "seg.nii.gz", "labels")],
                                {0: "background", 1: "x"})
    assert [v["name"] for v in data["volumes"]] == ["Image"]
    assert note == "Prediction has another grid (8x9x11)"
