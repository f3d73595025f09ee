"""Label names and SNOMED CT codes: a config's rich ``labels`` entries, read as plain names."""

from __future__ import annotations

import json

import pytest

from capsmed.config import validate_config
from capsmed.data.labels import code_problems, label_codes, name_map
from capsmed.data.sources import prepare_dataset
from capsmed.data.validate import scan_config

CATEGORY = {"value": "91723000", "meaning": "Anatomical Structure"}
PAROTID = {"value": "45289007", "meaning": "Parotid gland"}
LEFT = {"value": "7771000", "meaning": "Left", "scheme": "SCT"}
LABELS = {"0": "background",
          "1": {"name": "parotid_left",
                "snomed": {"category": CATEGORY, "type": PAROTID, "modifier": LEFT}},
          "2": "tumour"}


def test_readers_get_plain_names_and_the_seg_gets_the_codes():
    assert name_map({"labels": LABELS}, "labels") == {0: "background", 1: "parotid_left",
                                                      2: "tumour"}
    assert label_codes(LABELS) == {1: {
        "category": {"scheme": "SCT", **CATEGORY}, "type": {"scheme": "SCT", **PAROTID},
        "modifier": LEFT}}


@pytest.mark.parametrize(("entry", "message"), [
    ({"snomed": {"category": CATEGORY, "type": PAROTID}}, "needs a 'name'"),
    ({"name": "x", "colour": "red"}, "unknown key(s) colour; allowed: name, snomed"),
    ({"name": "x", "snomed": "45289007"}, "'snomed' must map category, type (and modifier)"),
    ({"name": "x", "snomed": {"category": CATEGORY}}, "'snomed' needs 'type'"),
    ({"name": "x", "snomed": {"category": CATEGORY, "type": PAROTID, "site": LEFT}},
     "'snomed' has unknown part 'site'"),
    ({"name": "x", "snomed": {"category": CATEGORY, "type": {"value": "45289007"}}},
     "snomed type must be {value, meaning} (scheme optional, default SCT)"),
])
def test_each_malformed_entry_is_one_line(entry, message):
    problems = code_problems(entry, "dataset config: 'labels' '1'")
    assert len(problems) == 1 and problems[0].startswith("dataset config: 'labels' '1': ")
    assert message in problems[0]


def test_config_loading_validation_and_cases_json_accept_the_rich_form(tmp_path):
    ds = {"source": "synthetic", "task": "segmentation", "spatial_dims": 3, "labels": LABELS,
          "synthetic": {"num_cases": 4, "size": [16, 16, 16], "num_classes": 3}}
    cfg = validate_config({"datasets": {"ct": ds}})
    problems, scan = scan_config(cfg["datasets"]["ct"])
    assert problems == [] and scan.labels == {"0": "background", "1": "parotid_left",
                                              "2": "tumour"}
    doc = prepare_dataset(cfg["datasets"]["ct"], tmp_path / "data", 0)
    written = json.loads((tmp_path / "data" / "cases.json").read_text())
    assert doc["labels"] == written["labels"] == scan.labels
    assert written["label_codes"] == {"1": label_codes(LABELS)[1]}
    bad = dict(ds, labels={"0": "background", "1": {"name": "x", "snomed": {}}, "2": "y"})
    problems, _ = scan_config(validate_config({"datasets": {"ct": bad}})["datasets"]["ct"])
    assert problems == ["dataset config: 'labels' '1': 'snomed' needs 'category'",
                        "dataset config: 'labels' '1': 'snomed' needs 'type'"]
