"""Every generated page parses, is self-contained, and shows the numbers it was built from."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nibabel as nib
import numpy as np
import pytest
from reporthtml import is_viewer_script, parse

from capsmed.report import study_filename

EXTERNAL = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)


def _all_pages(root: Path) -> list[Path]:
    return sorted(root.rglob("*.html"))


def test_every_page_parses_and_is_self_contained(rendered):
    pages = _all_pages(rendered["root"])
    # 2 datasets x (qc + comparison) + 4 models x 3 stages + studies + index
    n_studies = sum(len(v) for v in rendered["studies"].values())
    assert len(pages) == 4 + 12 + n_studies + 1
    for path in pages:
        page = parse(path)
        assert not page.errors, (path, page.errors)
        assert page.title.strip(), path
        for tag, attrs in page.tags:
            assert tag not in ("link", "iframe", "object", "embed", "base"), (path, tag)
            assert tag != "script" or is_viewer_script(attrs), (path, attrs)
            for name in attrs:
                assert not name.lower().startswith("on"), (path, tag, name)
        for url in page.srcs + page.hrefs:
            assert not EXTERNAL.match(url), (path, url)
            assert not urlsplit(url).scheme or url.startswith("data:image/png;base64,"), (path, url)
        for img in page.images:
            assert (img.get("alt") or "").strip(), (path, "image without alt text")
            assert (img.get("src") or "").startswith("data:image/png;base64,"), path
        html = path.read_text(encoding="utf-8")
        assert "@media print" in html
        assert "Content-Security-Policy" in html
        assert "For research use only" in page.text


def test_relative_links_resolve(rendered):
    for path in _all_pages(rendered["root"]):
        for href in parse(path).hrefs:
            target = (path.parent / unquote(urlsplit(href).path)).resolve()
            assert target.is_file(), f"{path}: broken link {href}"


def test_segmentation_stage_report(rendered, facts):
    page = parse(rendered["stage"][(facts.SEG, "ucaps", "test")])
    text = page.text
    m, ci = facts.SEG_METRICS["ucaps"], facts.SEG_CI["ucaps"]
    assert f"Dice {m['dice']:.3f} (95% CI {ci['dice'][0]:.3f} to {ci['dice'][1]:.3f})" in text
    assert f"[{ci['dice'][0]:.3f}, {ci['dice'][1]:.3f}]" in text
    assert f"[{ci['hd95'][0]:.2f}, {ci['hd95'][1]:.2f}]" in text
    assert "HD95 (mm)" in text and "Dice (anterior)" in text
    assert "812.3 K" in text and "3.20 GFLOPs" in text and "1 h 02 min" in text
    for rank in ("Best case", "Median case", "Worst case"):
        assert rank in text
    alts = " ".join(img["alt"] for img in page.images)
    assert "Learning curves" in alts
    assert "Box plots of Dice and HD95" in alts
    assert "predicted against true volumes" in alts.lower()
    assert "1 HD95 values are infinite" in text
    # every case is listed and linked to its study report
    links = {unquote(h) for h in page.hrefs}
    for cid in ("case_005", "case_006", *facts.HOSTILE_IDS):
        assert f"studies/{study_filename(cid)}" in links


def test_classification_stage_report(rendered, facts):
    page = parse(rendered["stage"][(facts.CLS, "capsnet", "test")])
    text = page.text
    m, ci = facts.CLS_METRICS["capsnet"], facts.CLS_CI["capsnet"]
    assert f"AUC {m['auc']:.3f} (95% CI {ci['auc'][0]:.3f} to {ci['auc'][1]:.3f})" in text
    assert f"{m['ece']:.3f}" in text and "lower is better" in text
    alts = [img["alt"] for img in page.images]
    for expected in ("ROC curves", "Precision-recall curves",
                     "Confusion matrix of true against predicted classes",
                     "Reliability diagram of accuracy against confidence"):
        assert expected in alts
    assert "Wrong predictions first" in text
    assert "161.0 K" in text


@pytest.mark.parametrize("stage", ["train", "val"])
def test_other_stages_render(rendered, facts, stage):
    page = parse(rendered["stage"][(facts.SEG, "unet", stage)])
    assert f"{stage} stage" in page.text
    assert "Dice" in page.text


def test_segmentation_study_report(rendered, facts):
    path = rendered["studies"][(facts.SEG, "ucaps")]["case_005"]
    assert path.name == "case_005.html"
    page = parse(path)
    text = page.text
    assert "Study case_005" in page.title
    assert "16 x 20 x 12" in text and "1.5 x 1 x 2" in text and "RAS" in text
    assert "anterior" in text and "posterior" in text and "mL" in text
    assert "training cases" in text.lower()
    cases = {r["case_id"]: r for r in csv.DictReader(open(
        rendered["root"] / facts.SEG / "eval" / "ucaps" / "test" / "cases.csv"))}
    cal = json.loads((rendered["root"] / facts.SEG / "eval" / "ucaps" / "val" /
                      "metrics.json").read_text())["uncertainty_calibration"]
    row = cases["case_005"]
    mean = float(row["uncertainty_mean"])
    assert f"evenly spread) inside the predicted structures: mean {mean:.3f}" in text
    verdict = ("Flagged: more uncertain than any of the 1 validation studies"
               if mean > cal["study_threshold"] else "Within the range of the validation studies")
    assert f"{verdict}" in text and f"(highest {cal['study_threshold']:.3f})" in text
    # per structure: the TTA spread from cases.csv, the share of uncertain voxels from the map
    unc = np.asarray(nib.load(rendered["root"] / facts.SEG / "eval" / "ucaps" / "test" /
                              "predictions" / "case_005_uncertainty.nii.gz").dataobj)
    pred = np.asarray(nib.load(rendered["root"] / facts.SEG / "eval" / "ucaps" / "test" /
                               "predictions" / "case_005.nii.gz").dataobj)
    for k, name in ((1, "anterior"), (2, "posterior")):
        share = float(np.mean(unc[pred == k] > cal["voxel_threshold"]))
        spread = float(row[f"volume_spread_ml_{name}"])
        assert f"{name} {100 * share:.1f}%" in text
        assert re.search(rf"{name} [0-9.]+ [0-9.]+ .*?{spread:.2f} {100 * share:.1f}%", text)
    assert "Ground truth" in " ".join(img["alt"] for img in page.images) or "ground truth" in \
        " ".join(img["alt"] for img in page.images)
    assert "ab" * 32 in text and "c0ffeeucaps" in text and "2026-01-02 03:04" in text
    assert "torch" in text and "2.13.0" in text
    assert "not a medical device" in text


def test_segmentation_study_without_uncertainty(rendered, facts):
    page = parse(rendered["studies"][(facts.SEG, "unet")]["case_005"])
    assert "test-time augmentation did not run" in page.text
    stage = parse(rendered["stage"][(facts.SEG, "unet", "test")])
    assert "Studies by uncertainty" not in stage.text


def test_stage_report_ranks_studies_by_uncertainty(rendered, facts):
    edir = rendered["root"] / facts.SEG / "eval" / "ucaps"
    rows = list(csv.DictReader(open(edir / "test" / "cases.csv")))
    cal = json.loads((edir / "val" / "metrics.json").read_text())["uncertainty_calibration"]
    html = rendered["stage"][(facts.SEG, "ucaps", "test")].read_text(encoding="utf-8")
    section = html.split('<section id="uncertainty">', 1)[1].split("</section>", 1)[0]
    ranked = sorted(rows, key=lambda r: -float(r["uncertainty_mean"]))
    body = section.split("<tbody>", 1)[1]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S) for tr in body.split("<tr")[1:]]
    assert [c[0] for c in cells] == [str(i) for i in range(1, len(rows) + 1)]
    assert [float(c[2]) for c in cells] == [round(float(r["uncertainty_mean"]), 3)
                                            for r in ranked]
    n_flag = sum(float(r["uncertainty_mean"]) > cal["study_threshold"] for r in rows)
    assert section.count("above validation range") == n_flag
    text = parse(rendered["stage"][(facts.SEG, "ucaps", "test")]).text
    assert f"{n_flag} of {len(rows)} studies are more uncertain than any validation study" in text
    assert "4 passes per case" in text and "Youden" in text


def test_classification_study_reports(rendered, facts):
    caps = parse(rendered["studies"][(facts.CLS, "capsnet")]["img_008"])
    assert "Predicted class:" in caps.text and "Class probabilities" in caps.text
    assert "Capsule evidence" in caps.text and "Class-capsule lengths" in caps.text
    alts = " ".join(img["alt"] for img in caps.images)
    assert "reconstruction" in alts and "28 x 28" in caps.text
    cnn = parse(rendered["studies"][(facts.CLS, "seed_cnn")]["img_008"])
    assert "Capsule evidence" not in cnn.text
    assert "normalised entropy" in cnn.text


def test_comparison_report(rendered, facts):
    page = parse(rendered["comparison"][facts.SEG])
    text = page.text
    assert "Best on the test stage by Dice: unet (CNN baseline)" in text
    assert "0.834 [0.801, 0.866]" in text and "0.812 [0.780, 0.850]" in text
    assert "5.9x fewer parameters" in text
    assert "Do capsule networks need fewer parameters and less computation here?" in text
    assert "ucaps needs fewer parameters and less computation than unet" in text
    assert "intervals overlap" in text
    for col in ("Parameters", "FLOPs", "Training time", "Inference per case",
                "Peak memory (train)"):
        assert col in text
    cls = parse(rendered["comparison"][facts.CLS]).text
    assert "Best on the test stage by AUC: capsnet (capsule network)" in cls
    assert "more FLOPs" in cls  # capsnet: 21 MFLOPs against 15 MFLOPs


def test_qc_report(rendered, facts):
    """The QC page shows what compute_fingerprint wrote (conftest runs the real writer)."""
    import json

    from capsmed.report.render import fmt_num

    root = rendered["root"]
    fp = json.loads((root / facts.SEG / "preprocessed" / "fingerprint.json").read_text())
    text = parse(rendered["qc"][facts.SEG]).text
    assert "records no intensity statistics" not in text
    for key in ("mean", "std", "percentile_00_5", "percentile_99_5"):
        assert fmt_num(fp["intensity"][key], 2) in text
    assert "99.5th percentile" in text
    assert "Median spacing 1.5 x 1 x 2 mm" in text
    voxels = fp["label_voxels"]
    share = 100 * voxels["0"] / sum(voxels.values())
    assert f"background {share:.1f}%" in text
    assert "zscore" in text  # plan.json
    cls_fp = json.loads((root / facts.CLS / "preprocessed" / "fingerprint.json").read_text())
    cls = parse(rendered["qc"][facts.CLS]).text
    assert fmt_num(cls_fp["intensity"]["mean"], 2) in cls
    counts = cls_fp["class_counts"]
    assert f"benign {100 * counts['0'] / sum(counts.values()):.1f}%" in cls


def test_index_links_everything(rendered, facts):
    root = rendered["root"]
    page = parse(rendered["index"])
    hrefs = {unquote(h) for h in page.hrefs}
    for ds_doc in rendered["summary"]["datasets"].values():
        for m_doc in ds_doc["models"].values():
            for stage_doc in m_doc["stages"].values():
                assert stage_doc["report"] in hrefs
            for path in m_doc["studies"].values():
                assert path in hrefs
    for ds in (facts.SEG, facts.CLS):
        assert f"{ds}/reports/comparison.html" in hrefs
        assert f"{ds}/reports/qc.html" in hrefs
    assert "best on test is unet (Dice 0.834)" in page.text
    assert "Dice 0.812 [0.780, 0.850]" in page.text and "11.00 GFLOPs" in page.text
    assert all(not Path(h).is_absolute() for h in hrefs)
    assert (root / "index.html") == rendered["index"]


def test_summary_links_the_study_reports_that_were_written(rendered, facts):
    """capsmed.summary names study pages on its own (from cases.csv); every one it links must be
    a page write_study_reports wrote, hostile ids included."""
    from capsmed.summary import build_summary

    root = rendered["root"]
    cfg = {"results": str(root), "evaluate": {"stages": ["train", "val", "test"]},
           "datasets": {ds: {"task": task, "models": list(models),
                             "split": {"folds": 1, "fold": 0}}
                        for ds, task, models in ((facts.SEG, "segmentation", facts.SEG_MODELS),
                                                 (facts.CLS, "classification",
                                                  facts.CLS_MODELS))}}
    summary = build_summary(cfg)
    for ds, models in ((facts.SEG, facts.SEG_MODELS), (facts.CLS, facts.CLS_MODELS)):
        for model in models:
            linked = summary["datasets"][ds]["models"][model]["studies"]
            written = rendered["studies"][(ds, model)]
            assert set(linked) == set(written) and set(facts.HOSTILE_IDS) <= set(linked)
            for cid, rel in linked.items():
                assert root / rel == written[cid]


def test_capsule_evidence_beside_the_prediction(rendered, facts):
    edir = rendered["root"] / facts.SEG / "eval" / "ucaps" / "test"
    rows = {r["case_id"]: r for r in csv.DictReader(open(edir / "cases.csv"))}
    share = float(rows["case_005"]["evidence_disagreement"])
    assert 0 < share < 1
    html = rendered["studies"][(facts.SEG, "ucaps")]["case_005"].read_text(encoding="utf-8")
    section = html.split('<section id="evidence">', 1)[1].split("</section>", 1)[0]
    assert "What the model saw" in section and "class capsule" in section
    assert f"differs from the final label on {100 * share:.1f}% of the voxels" in section
    assert section.count('<img src="data:image/png;base64,') == 1
    cnn = rendered["studies"][(facts.SEG, "unet")]["case_005"].read_text(encoding="utf-8")
    cnn_section = cnn.split('<section id="evidence">', 1)[1].split("</section>", 1)[0]
    assert "This model is a CNN" in cnn_section and "softmax" in cnn_section
    values = np.array([float(r["evidence_disagreement"]) for r in rows.values()])
    stage = parse(rendered["stage"][(facts.SEG, "ucaps", "test")]).text
    assert (f"differs from the final label on {100 * values.mean():.1f}% of the structure voxels "
            f"on average (median {100 * np.median(values):.1f}%") in stage
    assert f"they disagree somewhere in {int((values > 0).sum())} of {len(values)} studies" in stage
    assert "softmax maps where capsule models show their capsule lengths" in parse(
        rendered["stage"][(facts.SEG, "unet", "test")]).text
