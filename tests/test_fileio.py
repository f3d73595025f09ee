"""capsmed.fileio: the one home of the pipeline's writers, readers and hash."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest

from capsmed.errors import CapsmedError
from capsmed.fileio import (
    atomic_write_bytes,
    read_json,
    save_nifti,
    stable_hash,
    write_text_if_changed,
)


def test_save_nifti_keeps_geometry_and_writes_the_same_bytes_twice(tmp_path):
    affine = np.diag([1.5, 0.8, 2.0, 1.0])
    affine[:3, 3] = [10, -5, 3]
    path = tmp_path / "sub" / "x.nii.gz"
    data = np.arange(24).reshape(2, 3, 4)
    save_nifti(data, path, affine, dtype=np.uint8)
    first = path.read_bytes()
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine)
    assert img.get_data_dtype() == np.uint8 and img.header.get_xyzt_units()[0] == "mm"
    save_nifti(data, path, affine, dtype=np.uint8)
    assert path.read_bytes() == first  # no timestamp in the gzip stream
    assert [p.name for p in path.parent.iterdir()] == ["x.nii.gz"]  # no temporary file left


def test_read_json_names_the_file_and_what_it_is(tmp_path):
    with pytest.raises(CapsmedError, match=r"x\.json: case list not found"):
        read_json(tmp_path / "x.json", "case list")
    assert read_json(tmp_path / "x.json", required=False, default={}) == {}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CapsmedError, match=r"bad\.json: not readable as JSON"):
        read_json(tmp_path / "bad.json")


def test_write_text_if_changed_and_stable_hash(tmp_path):
    path = tmp_path / "a.txt"
    assert write_text_if_changed(path, "one") and not write_text_if_changed(path, "one")
    assert write_text_if_changed(path, "two") and path.read_text() == "two"
    assert stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
    assert len(stable_hash({})) == 16


def test_one_definition_each(repo_root):
    """The writers, readers and hashes of the issue "one source of truth" are defined once."""
    defs: dict[str, list[str]] = {}
    sources = list((repo_root / "capsmed").rglob("*.py")) + list(
        (repo_root / "workflow").rglob("*.smk"))
    for path in sources:
        for name in re.findall(r"^\s*def (\w+)\(", path.read_text(), re.M):
            defs.setdefault(name, []).append(str(path.relative_to(repo_root)))
    for name in ("save_nifti", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
                 "write_text_if_changed", "stable_hash", "config_hash", "digest", "stage_cases",
                 "fold_cases", "trained_folds", "reliability_table", "confidence_bins"):
        assert len(defs.get(name, [])) <= 1, (name, defs[name])


def test_atomic_write_bytes_sets_the_mode_asked_for(tmp_path):
    private, shared = tmp_path / "a" / "private.bin", tmp_path / "shared.js"
    atomic_write_bytes(private, b"x")
    atomic_write_bytes(shared, b"y", mode=0o644)
    assert private.read_bytes() == b"x" and shared.read_bytes() == b"y"
    assert private.stat().st_mode & 0o777 == 0o600
    assert shared.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "private.bin", "shared.js"]
