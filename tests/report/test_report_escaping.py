"""User text (study ids, names, paths, links) is escaped and never becomes markup or a link."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from reporthtml import foreign_scripts, parse

from capsmed.report import study_filename, write_index, write_study_report
from capsmed.report.render import safe_relative_link

HOSTILE_NAME = "<b onmouseover=alert(2)>tumour</b>"


def test_hostile_ids_are_escaped_everywhere(rendered, facts):
    for path in sorted(rendered["root"].rglob("*.html")):
        html = path.read_text(encoding="utf-8")
        for hostile in facts.HOSTILE_IDS:
            assert hostile not in html, f"{path} contains the raw id {hostile!r}"
        assert foreign_scripts(html) == [] and "<img src=x" not in html


@pytest.mark.parametrize("ds_model", [("demo_seg3d", "ucaps"), ("demo_cls2d", "capsnet")])
def test_hostile_study_reports_show_the_original_id(rendered, facts, ds_model):
    studies = rendered["studies"][ds_model]
    for hostile in facts.HOSTILE_IDS:
        path = studies[hostile]
        name = path.name
        assert name == study_filename(hostile)
        assert not set(name) & set('<>"/\\ =()'), name
        page = parse(path)
        assert page.title == f"Study {hostile}"
        assert f"Study {hostile}" in page.text
        assert "&lt;" in path.read_text(encoding="utf-8")
    # the two hostile ids get different files
    assert len({studies[h].name for h in facts.HOSTILE_IDS}) == 2


def test_stage_report_lists_hostile_ids_as_text(rendered, facts):
    page = parse(rendered["stage"][(facts.SEG, "ucaps", "test")])
    for hostile in facts.HOSTILE_IDS:
        assert hostile in page.text
    assert not [t for t, _ in page.tags if t == "script"]
    img_tags = page.images
    assert all((a.get("src") or "").startswith("data:image/png;base64,") for a in img_tags)


def test_study_filename_is_safe_and_stable():
    assert study_filename("case_017") == "case_017.html"
    assert study_filename("hippocampus.001") == "hippocampus.001.html"
    for bad in ("../../etc/passwd", "..", ".hidden", "a/b", "a b", "ü-ñ", "", "x" * 300):
        name = study_filename(bad)
        assert name.endswith(".html") and "/" not in name and not name.startswith(".")
        assert len(name) < 120
    assert study_filename("a/b") != study_filename("a_b")
    assert study_filename("a b") == study_filename("a b")


@pytest.mark.parametrize("link", ["javascript:alert(1)", "JavaScript:alert(1)", "http://x.org/a",
                                  "https://x.org", "//x.org/a", "/etc/passwd", "data:text/html,x",
                                  "C:\\x\\y.html", "", None, 3])
def test_unsafe_links_are_dropped(link):
    assert safe_relative_link(link) is None


def test_relative_links_are_percent_encoded():
    assert safe_relative_link("ds/reports/m/test.html") == "ds/reports/m/test.html"
    assert safe_relative_link('a b/"x".html') == "a%20b/%22x%22.html"


def test_hostile_summary_and_names(tmp_path, facts):
    summary = {"datasets": {HOSTILE_NAME: {
        "task": "<i>segmentation</i>",
        "models": {'"><svg onload=alert(3)>': {
            "params": "<b>", "stages": {"test": {"metrics": {"dice": 0.5},
                                                 "report": "javascript:alert(1)"}},
            "studies": {facts.HOSTILE_SCRIPT: "https://evil.example/x.html",
                        "ok_case": "ds/reports/m/studies/ok_case.html"}}}}}}
    path = write_index(tmp_path, summary)
    html = path.read_text(encoding="utf-8")
    page = parse(path)
    assert HOSTILE_NAME not in html and "<svg" not in html and "<i>" not in html
    assert HOSTILE_NAME in page.text
    assert page.hrefs == ["ds/reports/m/studies/ok_case.html"]
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)


def test_hostile_study_dict(tmp_path, facts):
    image = facts.save_nifti(tmp_path / "img.nii.gz", np.random.default_rng(0).random(facts.SHAPE,
                                                                                        np.float32))
    pred = np.zeros(facts.SHAPE, np.uint8)
    pred[5:9, 6:10, 4:7] = 1
    pred_path = facts.save_nifti(tmp_path / "pred.nii.gz", pred)
    out = write_study_report(tmp_path / "s.html", {
        "case_id": facts.HOSTILE_IMG, "task": "segmentation", "image": image,
        "prediction": pred_path, "labels": {0: "background", 1: HOSTILE_NAME},
        "provenance": {"model": "<script>x</script>", "versions": {"<p>": "</table><i>zz</i>"}},
        "links": [{"text": "<b>back</b>", "href": "javascript:alert(1)"},
                  {"text": "<b>up</b>", "href": "../test.html"}]})
    html = out.read_text(encoding="utf-8")
    page = parse(out)
    for raw in (facts.HOSTILE_IMG, HOSTILE_NAME, "<script>x</script>", "<i>zz</i>", "<b>", "<p>"):
        assert raw not in html
    assert HOSTILE_NAME in page.text and "<b>up</b>" in page.text
    assert page.hrefs == ["../test.html"]
    assert not page.errors


def test_summary_json_round_trip(rendered):
    summary = json.loads((Path(rendered["root"]) / "summary.json").read_text())
    assert summary == rendered["summary"]
