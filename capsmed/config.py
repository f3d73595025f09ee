"""Load and validate the pipeline configuration.

The one schema is ``workflow/schemas/config.schema.yaml``: Snakemake validates ``config`` with it in
``workflow/rules/common.smk`` and :func:`load_config` validates with the same file, filling in defaults
the same way (JSON Schema draft 2020-12).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from capsmed.errors import CapsmedError
from capsmed.fileio import stable_hash

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
#: Dataset sources that read files from ``path`` (every source but the synthetic generator).
FILE_SOURCES = ("msd", "medmnist", "csv", "dicom")


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


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_schema() -> dict[str, Any]:
    """Read the configuration schema.

    Returns:
        The schema as a dict (a copy: the caller may change it).
    """
    return copy.deepcopy(_schema())


def _schema_problems(validator: Any, instance: Any, source: str, prefix: str = "") -> list[str]:
    """One ``source: key.path: message`` line per schema violation, sorted by key path."""
    lines = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path]):
        where = prefix + ".".join(str(p) for p in err.path)
        lines.append(f"{source}: {where.rstrip('.') or '(top level)'}: {err.message}")
    return lines


def dataset_schema_problems(ds: Any, source: str = "dataset config") -> list[str]:
    """Schema violations of the keys one dataset block sets (``$defs.dataset`` of the schema).

    The same rules Snakemake's ``validate()`` and :func:`validate_config` apply to
    ``datasets.NAME``, except that ``source`` and ``task`` may be left out (``capsmed validate
    PATH`` infers them from the data).

    Args:
        ds: A dataset block, as written in a config (defaults need not be filled).
        source: Prefix of each message.

    Returns:
        One line per problem naming the key and the rule, e.g. ``dataset config:
        synthetic.num_cases: 1 is less than the minimum of 4``; empty when none.
    """
    from jsonschema import Draft202012Validator

    schema = _schema()
    sub = {k: v for k, v in schema["$defs"]["dataset"].items() if k != "required"}
    sub["$defs"] = schema["$defs"]
    return _schema_problems(Draft202012Validator(sub), ds, source)


def dataset_defaults(section: str) -> dict[str, Any]:
    """The schema's defaults of one block of a dataset config, e.g. ``"split"``.

    Args:
        section: A key of ``$defs.dataset.properties`` whose value is an object
            (``synthetic``, ``preprocess``, ``split``).

    Returns:
        ``{key: default}`` for every key of that block that has a default.
    """
    props = _schema()["$defs"]["dataset"]["properties"][section]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if "default" in v}


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
    validator = _defaulting_validator()(_schema())
    # Two passes: the first fills defaults (which can create nested objects whose own defaults
    # the second pass fills); errors are read from the final pass.
    list(validator.iter_errors(cfg))
    lines = _schema_problems(validator, cfg, source)
    if lines:
        raise CapsmedError("\n".join(lines))
    _check_semantics(cfg, source)
    return cfg


def dataset_rule_problems(ds: Mapping[str, Any], where: str) -> list[str]:
    """Rules across keys of one dataset block that JSON Schema cannot express.

    Run after the schema check (:func:`dataset_schema_problems` or :func:`validate_config`) by
    both :func:`validate_config` and ``capsmed validate``: sizes matching ``spatial_dims``, file
    sources needing a path, a source's task, ``ct_window`` order, ``split.fold`` below
    ``split.folds``. Keys left out (``None``) are not checked.

    Args:
        ds: A dataset block (defaults filled or not).
        where: Prefix of each message, e.g. ``"config.yaml: datasets.demo"``.

    Returns:
        One line per problem, ``{where}: {key} ...``; empty when none.
    """
    problems = []
    source, task, dims = ds.get("source"), ds.get("task"), ds.get("spatial_dims")
    if source == "msd" and task == "classification":
        problems.append(f"{where}: source msd is a segmentation source but task is "
                        "classification")
    if source == "medmnist" and task == "segmentation":
        problems.append(f"{where}: source medmnist is a classification source but task is "
                        "segmentation")
    if source in FILE_SOURCES and not ds.get("path"):
        problems.append(f"{where}: source {source} needs a path")
    syn = ds.get("synthetic") if isinstance(ds.get("synthetic"), Mapping) else {}
    pre = ds.get("preprocess") if isinstance(ds.get("preprocess"), Mapping) else {}
    split = ds.get("split") if isinstance(ds.get("split"), Mapping) else {}
    sized = [("preprocess.spacing", pre.get("spacing")), ("preprocess.patch_size",
                                                          pre.get("patch_size"))]
    if source == "synthetic":
        sized.insert(0, ("synthetic.size", syn.get("size")))
    for key, val in sized:
        if dims in (2, 3) and isinstance(val, list) and len(val) != dims:
            problems.append(f"{where}: {key} has {len(val)} values but spatial_dims is {dims}")
    win = pre.get("ct_window")
    if isinstance(win, list) and len(win) == 2 and all(
            isinstance(v, int | float) for v in win) and not win[0] < win[1]:
        problems.append(f"{where}: preprocess.ct_window must be [low, high] with low < high, "
                        f"got {win!r}")
    fold, folds = split.get("fold"), split.get("folds")
    if isinstance(fold, int) and isinstance(folds, int) and fold >= folds:
        problems.append(f"{where}: split.fold is {fold} but folds is {folds}")
    return problems


def _check_semantics(cfg: dict[str, Any], source: str) -> None:
    """Checks JSON Schema cannot express (:func:`dataset_rule_problems`; ``{data_root}``)."""
    problems = []
    for name, ds in cfg["datasets"].items():
        problems += dataset_rule_problems(ds, f"{source}: datasets.{name}")
        if ds["source"] in FILE_SOURCES and ds.get("path") and "{data_root}" in ds["path"]:
            if not cfg.get("data_root"):
                problems.append(
                    f"{source}: datasets.{name}.path uses {{data_root}} but data_root is not set "
                    "(pass --config data_root=/path/to/data to snakemake, or --set data_root=... "
                    "to capsmed)"
                )
            else:
                ds["path"] = ds["path"].replace("{data_root}", str(cfg["data_root"]).rstrip("/"))
        if ds["task"] == "segmentation":
            problems += _subset_problems(cfg, name, f"{source}: datasets.{name}")
    if problems:
        raise CapsmedError("\n".join(problems))


def _subset_problems(cfg: dict[str, Any], dataset: str, where: str) -> list[str]:
    """The class-imbalance keys set for a segmentation dataset (merged over its models)."""
    problems = []
    for key in ("minority_fraction", "minority_class"):
        if any(train_config(cfg, dataset, m).get(key) not in (None, [])
               for m in cfg["datasets"][dataset].get("models", [])):
            problems.append(f"{where}: train.{key} is for classification datasets, but the task "
                            "is segmentation")
    return problems


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


#: Inference settings that change only memory and time, never a prediction: they are chosen where
#: inference runs, and changing them reruns no evaluation (:mod:`capsmed.infer.settings`).
INFERENCE_RUNTIME_KEYS = ("sw_batch_size", "memory_mb")


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


#: The one hash of configs and inputs (:func:`capsmed.fileio.stable_hash`).
config_hash = stable_hash


def _dataset_inputs(cfg: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The config that determines a dataset's files: cases, fingerprint, plan and splits.

    Everything in ``datasets.NAME`` but the models, their training, inference and shifted stages,
    and the split keys that only choose which folds are trained and reported (``fold``,
    ``cross_validate``), plus the global seed.
    """
    ds = dataset_config(cfg, dataset)
    data = {k: v for k, v in ds.items() if k not in ("models", "inference", "train", "shift")}
    data["split"] = {k: v for k, v in (ds.get("split") or {}).items()
                     if k not in ("fold", "cross_validate")}
    return {"seed": cfg["seed"], "dataset": data}


def dataset_hash(cfg: dict[str, Any], dataset: str) -> str:
    """Hash of the config behind a dataset's files (the Snakefile's prepare / split params)."""
    return config_hash(_dataset_inputs(cfg, dataset))


#: Training keys that choose which learning-curve models are trained besides a model, not how it
#: trains: left out of its hash (:func:`hashed_train_config`).
SUBSET_KEYS = ("fractions", "minority_fraction", "minority_class")


def hashed_train_config(tcfg: dict[str, Any]) -> dict[str, Any]:
    """The training settings that determine a trained model (its hash and resume identity).

    Leaves out :data:`SUBSET_KEYS`, ``spatial_augment`` while it has its default ``true``,
    ``rotate_augment`` / ``scale_augment`` while 0 and ``processes`` while 1, so that a model's
    hash is the one it had before these keys existed (no model retrains for them); other values
    change it.
    """
    out = {k: v for k, v in tcfg.items() if k not in SUBSET_KEYS}
    if out.get("spatial_augment", True) is True:
        out.pop("spatial_augment", None)
    for key in ("rotate_augment", "scale_augment"):  # off (0): as before the keys existed
        if not out.get(key):
            out.pop(key, None)
    if out.get("processes", 1) == 1:  # one process: as before train.processes existed
        out.pop("processes", None)
    return out


def model_config_hash(cfg: dict[str, Any], dataset: str, model: str,
                      fraction: str | None = None) -> str:
    """Hash of everything that determines a trained model.

    That is the dataset's inputs (:func:`dataset_hash`), the model, its arguments and its merged
    training settings (:func:`hashed_train_config`). ``split.fold`` is not part of it: each fold's
    model lives in its own folder. The Snakefile's train params and the checkpoints'
    ``config_hash`` both use this one definition.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model: Model name.
        fraction: A learning-curve model (:func:`subset_spec`'s label, e.g. ``"0.25"`` or
            ``"minority0.25"``): its subset (kind, share, and the minority class of a minority
            subset) is added. None: the ordinary model.

    Raises:
        CapsmedError: ``fraction`` is not a subset the config asks for (:func:`subset_spec`).
    """
    relevant = {
        **_dataset_inputs(cfg, dataset),
        "model": model,
        **({"class": model_class(cfg, model)} if model_class(cfg, model) != model else {}),
        "args": model_args(cfg, model),
        "train": hashed_train_config(train_config(cfg, dataset, model)),
    }
    if fraction is not None:
        spec = subset_spec(cfg, dataset, model, fraction)
        relevant["subset"] = {k: spec[k] for k in ("kind", "value", "minority_class")}
    return config_hash(relevant)


def evaluation_hash(cfg: dict[str, Any], dataset: str, model: str,
                    fraction: str | None = None) -> str:
    """Hash of what determines a model's evaluation: the trained model, inference, evaluate.

    Inference settings that change only memory and time (:data:`INFERENCE_RUNTIME_KEYS`) are left
    out, so changing them reruns nothing. ``fraction``: a learning-curve model's test stage
    (:func:`model_config_hash`).
    """
    icfg = {k: v for k, v in inference_config(cfg, dataset).items()
            if k not in INFERENCE_RUNTIME_KEYS}
    return config_hash({"model": model_config_hash(cfg, dataset, model, fraction),
                        "inference": icfg,
                        "evaluate": cfg["evaluate"]})


#: Prefix of the label of a class-imbalance subset (``train.minority_fraction``).
MINORITY_PREFIX = "minority"


def fraction_label(value: float, minority: bool = False) -> str:
    """The label of a learning-curve subset, as paths and ``--fraction`` write it.

    ``fraction_label(0.25)`` -> ``"0.25"`` (``models/MODEL/fraction-0.25``);
    ``fraction_label(0.25, minority=True)`` -> ``"minority0.25"``
    (``models/MODEL/fraction-minority0.25``). The number is Python's shortest ``float`` form, the
    way YAML's ``0.25`` reads back (``1`` -> ``"1.0"``).
    """
    return f"{MINORITY_PREFIX if minority else ''}{float(value)!r}"


def parse_fraction(label: str) -> tuple[str, float]:
    """``(kind, share)`` of a subset label.

    ``"0.25"`` -> ``("fraction", 0.25)``, ``"minority0.25"`` -> ``("minority", 0.25)``.

    Raises:
        CapsmedError: the label is not a number (optionally after ``minority``), or the number is
            outside (0, 1].
    """
    text = str(label).strip()
    kind = "minority" if text.startswith(MINORITY_PREFIX) else "fraction"
    number = text[len(MINORITY_PREFIX):] if kind == "minority" else text
    try:
        value = float(number)
    except ValueError:
        raise CapsmedError(f"fraction {label!r}: expected a share such as 0.25, or minority0.25 "
                           "for the class-imbalance subset") from None
    if not 0.0 < value <= 1.0:
        raise CapsmedError(f"fraction {label!r}: the share must lie in (0, 1]")
    return kind, value


def fraction_labels(cfg: dict[str, Any], dataset: str, model: str) -> list[str]:
    """The learning-curve models the config asks for besides the ordinary one, by label.

    ``train.fractions`` (labels ``"0.1"``, ...) then ``train.minority_fraction`` (``"minority0.1"``,
    ...), merged for this dataset and model, in the config's order; 1.0 is left out (that is the
    ordinary model, never trained again). These are the values of the Snakefile's ``{fraction}``
    wildcard and of ``capsmed train/evaluate --fraction``.
    """
    tcfg = train_config(cfg, dataset, model)
    labels = [fraction_label(v) for v in tcfg.get("fractions") or [] if float(v) < 1.0]
    labels += [fraction_label(v, minority=True) for v in tcfg.get("minority_fraction") or []
               if float(v) < 1.0]
    return list(dict.fromkeys(labels))


def subset_spec(cfg: dict[str, Any], dataset: str, model: str, fraction: str) -> dict[str, Any]:
    """The training subset of a learning-curve model, checked against the config.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model: Model name.
        fraction: Its label (:func:`fraction_label`; ``"0.250"`` reads as ``"0.25"``).

    Returns:
        ``{"label", "kind", "value", "minority_class"}``: the canonical label (its folder is
        ``fraction-{label}``), ``"fraction"`` or ``"minority"``, the share, and
        ``train.minority_class`` for a minority subset (None otherwise, and None when the rarer
        class is meant).

    Raises:
        CapsmedError: a malformed label, the share 1.0 (the ordinary model), or a share that the
            dataset's ``train.fractions`` / ``train.minority_fraction`` does not list.
    """
    kind, value = parse_fraction(fraction)
    minority = kind == "minority"
    label = fraction_label(value, minority)
    if value == 1.0:
        raise CapsmedError(f"dataset {dataset}, model {model}: fraction {fraction} is the "
                           "ordinary model, trained and evaluated without --fraction")
    tcfg = train_config(cfg, dataset, model)
    key = "minority_fraction" if minority else "fractions"
    if label not in fraction_labels(cfg, dataset, model):
        raise CapsmedError(f"dataset {dataset}, model {model}: fraction {fraction} is not in "
                           f"train.{key} ({tcfg.get(key) or []})")
    return {"label": label, "kind": kind, "value": value,
            "minority_class": tcfg.get("minority_class") if minority else None}
