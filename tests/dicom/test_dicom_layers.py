"""The DICOM rooms' arrows: data does not import dicom; dicom imports no report and no private name."""

from __future__ import annotations

import ast
from pathlib import Path

import capsmed

PACKAGE = Path(capsmed.__file__).parent


def _imports(folder: Path) -> list[tuple[str, str]]:
    out = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                out += [(path.name, f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                out += [(path.name, a.name) for a in node.names]
    return out


def test_data_does_not_import_dicom():
    assert [i for i in _imports(PACKAGE / "data") if i[1].startswith("capsmed.dicom")] == []


def test_dicom_imports_neither_report_nor_a_private_name_of_another_package():
    found = [(f, name) for f, name in _imports(PACKAGE / "dicom") if name.startswith("capsmed.")]
    assert found
    assert [i for i in found if i[1].startswith("capsmed.report")] == []
    private = [(f, name) for f, name in found if not name.startswith("capsmed.dicom.")
               and any(part.startswith("_") and not part.endswith("__")
                       for part in name.split(".")[1:])]
    assert private == []
