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


def test_classification_reports_have_no_viewer(rendered, facts):
    html = rendered["studies"][(facts.CLS, "capsnet")]["img_008"].read_text(encoding="utf-8")
    assert "cv-data" not in html and "<script" not in html


def test_a_64_cubed_study_page_stays_under_2_mb(tmp_path):
    rng = np.random.default_rng(0)
    grid = np.indices((64, 64, 64)).astype(float)
    label = (((grid - 32) ** 2).sum(0) < 14**2).astype(np.uint8)
    image = (rng.normal(100, 10, label.shape) + 80 * label).astype(np.float32)  # noise: worst case
    affine = np.diag([1.2, 1.0, 1.5, 1.0])
    paths = {}
    for key, arr in (("image", image), ("label", label), ("prediction", np.roll(label, 2, 0)),
                     ("uncertainty", rng.random(label.shape).astype(np.float32))):
        paths[key] = tmp_path / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(arr, affine), paths[key])
    out = write_study_report(tmp_path / "results" / "studies" / "case.html",
                             {"case_id": "case", "task": "segmentation",
                              "labels": {0: "background", 1: "tumour"},
                              **{k: str(v) for k, v in paths.items()}},
                             assets=vw.assets_dir(tmp_path / "results"))
    page_bytes = out.stat().st_size
    shared = sum(p.stat().st_size for p in vw.assets_dir(tmp_path / "results").iterdir())
    assert len(_data_block(out.read_text(encoding="utf-8"))["volumes"]) == 4
    assert page_bytes <= 2_000_000, page_bytes
    assert shared <= 2_400_000, shared  # one copy for all pages of a results folder


def test_viewer_leaves_out_a_layer_on_another_grid(tmp_path):
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10), np.float32), affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 11), np.uint8), affine), tmp_path / "seg.nii.gz")
    data, note = vw.viewer_data([vw.Layer("Image", tmp_path / "img.nii.gz", "image"),
                                 vw.Layer("Prediction", tmp_path / "seg.nii.gz", "labels")],
                                {0: "background", 1: "x"})
    assert [v["name"] for v in data["volumes"]] == ["Image"]
    assert note == "Prediction has another grid (8x9x11)"
