"""pyproject.toml and environment.yml pin the same packages at the same versions."""

import re
import tomllib

import yaml


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def _pins(lines):
    out = {}
    for line in lines:
        line = line.strip()
        if line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        assert version, f"{line!r} is not pinned with =="
        out[_norm(name)] = version
    return out


def test_environment_yml_mirrors_pyproject(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    py = _pins(project["dependencies"] + extras["dev"] + extras["export"])
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1
    conda = _pins(pip_lists[0])
    assert conda == py
    assert "python=3.11" in env["dependencies"]


def test_no_forbidden_dependencies(repo_root):
    text = (repo_root / "pyproject.toml").read_text().lower()
    for name in ("torchvision", "medmnist", "nilearn"):
        assert name not in text


def test_make_installs_the_export_extra_for_the_tests(repo_root):
    text = (repo_root / "Makefile").read_text()
    assert '-e ".[dev,export]"' in text
