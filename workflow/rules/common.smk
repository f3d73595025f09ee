# Config validation (the one schema, shared with capsmed.config), input functions, wildcard
# constraints and the resolved config file that every `capsmed` call reads.
import hashlib
import json
import os
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate


validate(config, "../schemas/config.schema.yaml")

RESULTS = config["results"].rstrip("/")
DATASETS = list(config["datasets"])
STAGES = list(config["evaluate"]["stages"])
# `python -m capsmed` with the interpreter running Snakemake (the project's .venv), so rules work
# without an activated environment, locally and on SLURM nodes sharing the filesystem.
# Set CAPSMED_COMMAND=capsmed to use the command on PATH instead (e.g. with --sdm conda).
CAPSMED = os.environ.get("CAPSMED_COMMAND", f"{sys.executable} -m capsmed")


def _write_resolved_config() -> str:
    """The validated config (defaults filled) in one file that every capsmed call reads.

    Written only when its content changes, atomically, so re-parsing on cluster nodes is harmless.
    """
    path = Path(RESULTS) / ".capsmed" / "config.yaml"
    text = yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


CONFIG_FILE = _write_resolved_config()


def digest(*keys) -> str:
    """Hash of part of the config: a rule's params change (and it reruns) when that part does."""
    node = config
    for key in keys:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return hashlib.sha256(json.dumps(node, sort_keys=True).encode()).hexdigest()[:12]


def dataset_digest(wildcards) -> str:
    ds = {k: v for k, v in config["datasets"][wildcards.dataset].items()
          if k not in ("models", "inference", "train")}
    return hashlib.sha256(json.dumps([ds, config["seed"]], sort_keys=True).encode()).hexdigest()[:12]


def train_digest(wildcards) -> str:
    ds = config["datasets"][wildcards.dataset]
    parts = [dataset_digest(wildcards), config["train"], ds.get("train", {}),
             config["models"].get(wildcards.model, {})]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def eval_digest(wildcards) -> str:
    ds = config["datasets"][wildcards.dataset]
    parts = [train_digest(wildcards), config["inference"], ds.get("inference", {}),
             config["evaluate"]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def models_of(wildcards) -> list:
    return config["datasets"][wildcards.dataset]["models"]


def all_targets() -> list:
    out = [f"{RESULTS}/summary.json", f"{RESULTS}/index.html"]
    for ds in DATASETS:
        for model in config["datasets"][ds]["models"]:
            out += [f"{RESULTS}/{ds}/reports/{model}/{stage}.html" for stage in STAGES]
    return out


wildcard_constraints:
    dataset="|".join(DATASETS),
    model="[A-Za-z][A-Za-z0-9_]*",
    stage="train|val|test",
