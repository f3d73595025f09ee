"""The package's floors (DESIGN.md section 1): no import runs up a floor, none reaches a private name.

Every import counts, lazy ones inside functions too, read from the source with ``ast``.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "capsmed"

#: Floor of each top-level module or package of capsmed, bottom first. A module may import its
#: own floor and the floors below. dicom sits below evaluate, as DESIGN.md's arrows have it
#: (``evaluate -> dicom``): the evaluation writes DICOM SEG and SR through it.
FLOORS = [
    {"__init__", "errors", "fileio", "paths", "config", "measures"},
    {"layers"},
    {"models"},
    {"losses"},
    {"data"},
    {"infer"},
    {"train"},
    {"dicom"},
    {"evaluate"},
    {"report", "summary"},
    {"predict", "export"},
    {"cli", "__main__"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _unit(module: str) -> str:
    """``capsmed.infer.engine`` -> ``infer``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path):
    """``(line, imported module, names)`` of every capsmed import in a file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("capsmed"):
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("capsmed"):
                yield node.lineno, target, [a.name for a in node.names]


def _all_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, target, names in _imports(path):
            yield path, line, target, names


def upward_imports() -> list[str]:
    """One line per import of a higher floor."""
    problems = []
    for path, line, target, _ in _all_imports():
        src, dst = _unit(_module_name(path)), _unit(target)
        if src not in FLOOR or dst not in FLOOR:
            problems.append(f"{path.name}:{line}: {src} or {dst} has no floor in FLOORS")
        elif FLOOR[dst] > FLOOR[src]:
            problems.append(f"{path.relative_to(PACKAGE)}:{line}: {src} imports {target} "
                            f"(floor {FLOOR[dst]} above {FLOOR[src]})")
    return problems


def private_imports() -> list[str]:
    """One line per import of another package's private module or name."""
    problems = []
    for path, line, target, names in _all_imports():
        src = _unit(_module_name(path))
        if _unit(target) == src:
            continue
        private = [p for p in target.split(".")[1:] + names
                   if p.startswith("_") and not p.endswith("__")]
        if private:
            problems.append(f"{path.relative_to(PACKAGE)}:{line}: {src} imports private "
                            f"{', '.join(private)} of {target}")
    return problems


def test_every_unit_of_the_package_has_a_floor():
    units = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0]
             for p in PACKAGE.rglob("*.py")}
    assert units - set(FLOOR) == set()


def test_no_import_runs_up_a_floor():
    assert upward_imports() == []


def test_no_import_reaches_a_private_name_of_another_unit():
    assert private_imports() == []


@pytest.mark.parametrize("source, target, expected", [
    ("train/x.py", "from capsmed.evaluate.metrics import roc_auc", "train imports"),
    ("data/x.py", "from capsmed.dicom import web", "data imports"),
    ("config.py", "import capsmed.models", "config imports"),
])
def test_the_check_catches_a_climb(tmp_path, monkeypatch, source, target, expected):
    fake = tmp_path / "capsmed"
    (fake / source).parent.mkdir(parents=True, exist_ok=True)
    (fake / source).write_text(f"def f():\n    {target}\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert any(expected in p for p in upward_imports())


def test_the_check_catches_a_private_name(tmp_path, monkeypatch):
    fake = tmp_path / "capsmed"
    (fake / "dicom").mkdir(parents=True)
    (fake / "dicom" / "x.py").write_text("from capsmed.data._io import dicom_files\n"
                                         "from capsmed.models.registry import _accepted\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert len(private_imports()) == 2
