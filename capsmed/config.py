"""Load and validate the pipeline configuration.

The one schema is ``workflow/schemas/config.schema.yaml``: Snakemake validates ``config`` with it in
``workflow/rules/common.smk`` and :func:`load_config` validates with the same file, filling in defaults
the same way (JSON Schema draft 2020-12).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from capsmed.errors import CapsmedError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


def _defaulting_validator():  # noqa: ANN202 - jsonschema validator class
    """Return a Draft 2020-12 validator class that also fills in ``default`` values."""
    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001, ANN202
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})


def load_schema() -> dict[str, Any]:
    """Read the configuration schema.

    Returns:
        The schema as a dict.
    """
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def validate_config(cfg: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate a configuration and fill in defaults.

    Args:
        cfg: The configuration (not modified).
        source: Name of the file it came from, for messages.

    Returns:
        A validated deep copy with every default filled in.

    Raises:
        CapsmedError: Listing every schema violation with its key path.
    """
    cfg = copy.deepcopy(cfg)
    schema = load_schema()
    validator_cls = _defaulting_validator()
    # Two passes: the first fills defaults (which can create nested objects whose own defaults
    # the second pass fills); errors are read from the final pass.
    for _ in range(2):
        errors = sorted(validator_cls(schema).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        lines = []
        for err in errors:
            where = ".".join(str(p) for p in err.path) or "(top level)"
            lines.append(f"{source}: {where}: {err.message}")
        raise CapsmedError("\n".join(lines))
    _check_semantics(cfg, source)
    return cfg


def _check_semantics(cfg: dict[str, Any], source: str) -> None:
    """Checks JSON Schema cannot express (sizes matching spatial_dims, sources needing a path)."""
    problems = []
    for name, ds in cfg["datasets"].items():
        dims = ds["spatial_dims"]
        if ds["source"] == "synthetic":
            size = ds["synthetic"]["size"]
            if len(size) != dims:
                problems.append(
                    f"{source}: datasets.{name}.synthetic.size has {len(size)} values but "
                    f"spatial_dims is {dims}"
                )
        elif not ds.get("path"):
            problems.append(f"{source}: datasets.{name}: source {ds['source']} needs a path")
        elif "{data_root}" in ds["path"]:
            if not cfg.get("data_root"):
                problems.append(
                    f"{source}: datasets.{name}.path uses {{data_root}} but data_root is not set "
                    "(pass --config data_root=/path/to/data to snakemake, or --set data_root=... "
                    "to capsmed)"
                )
            else:
                ds["path"] = ds["path"].replace("{data_root}", str(cfg["data_root"]).rstrip("/"))
        for key in ("spacing", "patch_size"):
            val = ds["preprocess"].get(key)
            if val is not None and len(val) != dims:
                problems.append(
                    f"{source}: datasets.{name}.preprocess.{key} has {len(val)} values but "
                    f"spatial_dims is {dims}"
                )
        if ds["split"]["fold"] >= ds["split"]["folds"]:
            problems.append(
                f"{source}: datasets.{name}.split.fold is {ds['split']['fold']} but folds is "
                f"{ds['split']['folds']}"
            )
    if problems:
        raise CapsmedError("\n".join(problems))


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML configuration, apply ``key.sub=value`` overrides and validate it.

    Args:
        path: YAML file.
        overrides: Items like ``"train.epochs=2"``; values are parsed as YAML.

    Returns:
        The validated configuration with defaults.

    Raises:
        CapsmedError: If the file is missing, is not YAML, or breaks the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise CapsmedError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise CapsmedError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise CapsmedError(f"{path}: top level must be a mapping of keys, got {type(cfg).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise CapsmedError(f"override {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        _set_dotted(cfg, key, yaml.safe_load(value))
    return validate_config(cfg, source=str(path))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base`` recursively (override wins)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dataset_config(cfg: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Return one dataset's block.

    Raises:
        CapsmedError: When the dataset is not in the configuration.
    """
    if dataset not in cfg["datasets"]:
        known = ", ".join(sorted(cfg["datasets"]))
        raise CapsmedError(f"dataset {dataset!r} is not in the config (known: {known})")
    return cfg["datasets"][dataset]


def train_config(cfg: dict[str, Any], dataset: str, model: str) -> dict[str, Any]:
    """Training settings for one model on one dataset: global < dataset < model."""
    ds = dataset_config(cfg, dataset)
    merged = deep_merge(cfg["train"], ds.get("train", {}))
    return deep_merge(merged, cfg["models"].get(model, {}).get("train", {}))


def inference_config(cfg: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Inference settings for a dataset: global < dataset."""
    return deep_merge(cfg["inference"], dataset_config(cfg, dataset).get("inference", {}))


def path_fold(cfg: dict[str, Any], dataset: str) -> int | None:
    """The fold that names paths by default: ``split.fold`` with several folds, else ``None``.

    With ``split.folds == 1`` models and evaluations live at ``models/{model}`` and
    ``eval/{model}/{stage}``; with several folds at ``models/{model}/fold{k}`` and
    ``eval/{model}/fold{k}/{stage}``, and ``split.fold`` is the fold whose model is evaluated on
    every stage and reported.
    """
    return resolve_fold(cfg, dataset)[1]


def resolve_fold(cfg: dict[str, Any], dataset: str, fold: int | None = None) -> tuple[int, int | None]:
    """The fold a command works on.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        fold: The fold asked for (``--fold``), or ``None`` for the config's ``split.fold``.

    Returns:
        ``(index, path_fold)``: the index into ``splits.json``'s ``folds`` and the fold used in
        paths (``None`` when the dataset has one fold).

    Raises:
        CapsmedError: When ``fold`` is not one of the dataset's folds.
    """
    split = dataset_config(cfg, dataset)["split"]
    folds = int(split["folds"])
    index = int(split["fold"]) if fold is None else int(fold)
    if not 0 <= index < folds:
        raise CapsmedError(f"dataset {dataset}: fold {index} does not exist (split.folds is "
                           f"{folds}, so folds are 0 to {folds - 1})")
    return index, (index if folds > 1 else None)


def trained_folds(cfg: dict[str, Any], dataset: str) -> list[int]:
    """The folds the pipeline trains: all of them with ``split.cross_validate``, else ``split.fold``."""
    split = dataset_config(cfg, dataset)["split"]
    if int(split["folds"]) > 1 and split.get("cross_validate", True):
        return list(range(int(split["folds"])))
    return [int(split["fold"])]


def model_class(cfg: dict[str, Any], model: str) -> str:
    """The registered model (``capsmed models``) that the config's model entry ``model`` builds.

    ``models.NAME.model`` names it for variants (e.g. an ablation of ``capsunet``); otherwise it
    is the entry's own name.
    """
    return str(cfg.get("models", {}).get(model, {}).get("model") or model)


def model_args(cfg: dict[str, Any], model: str) -> dict[str, Any]:
    """Constructor keyword arguments configured for a model."""
    return copy.deepcopy(cfg["models"].get(model, {}).get("args", {}))


def config_hash(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_config_hash(cfg: dict[str, Any], dataset: str, model: str) -> str:
    """Hash of everything that determines a trained model (data, split, preprocessing, training)."""
    ds = dataset_config(cfg, dataset)
    relevant = {
        "seed": cfg["seed"],
        "dataset": {k: v for k, v in ds.items() if k not in ("models", "inference")},
        "model": model,
        **({"class": model_class(cfg, model)} if model_class(cfg, model) != model else {}),
        "args": model_args(cfg, model),
        "train": train_config(cfg, dataset, model),
    }
    return config_hash(relevant)
