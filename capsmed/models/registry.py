"""Model registry: build models by name (``get_model``) and list them (``describe_models``)."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from capsmed.models.base import CapsmedModel

__all__ = ["MODEL_REGISTRY", "describe_models", "get_model", "list_models", "model_arguments",
           "register_model"]

logger = logging.getLogger(__name__)

#: Name -> model class. Filled by :func:`register_model` when ``capsmed.models`` is imported.
MODEL_REGISTRY: dict[str, type[CapsmedModel]] = {}

M = TypeVar("M", bound=type[CapsmedModel])

#: Configuration that :func:`describe_models` counts parameters for.
DESCRIBE_CONFIG: dict[str, dict[str, int]] = {
    "classification": {"in_channels": 1, "out_channels": 10, "image_size": 28},
    "segmentation": {"in_channels": 1, "out_channels": 3},
}


def register_model(name: str) -> Callable[[M], M]:
    """Return a class decorator that registers a :class:`CapsmedModel` under ``name``.

    Args:
        name: registry name (lower case, e.g. ``"segcaps"``).

    Returns:
        The decorator; it returns the class unchanged.

    Raises:
        ValueError: when the name is already taken by another class.

    """

    def decorator(cls: M) -> M:
        if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered")
        MODEL_REGISTRY[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(MODEL_REGISTRY)


def _accepted_kwargs(cls: type[CapsmedModel]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [
        p.name
        for p in params.values()
        if p.name not in ("self", "spatial_dims", "in_channels", "out_channels")
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _plain(value: Any) -> Any:
    """A JSON-plain copy of an option value: tuples become lists, other objects their repr."""
    return json.loads(json.dumps(value, default=repr))


def model_arguments(name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every architecture option a registered model is built with: its defaults, then ``args``.

    What ``train.json`` records as ``model_args``, so that two entries of one model class (an
    ablation such as ``routing_iterations: 1``) can be told apart by the option that differs.

    Args:
        name: a registered model name.
        args: the options given (the config's ``models.<entry>.args``).

    Returns:
        ``{option: value}`` over the options :func:`get_model` accepts, JSON-plain.

    Raises:
        ValueError: for an unknown name.

    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    params = inspect.signature(MODEL_REGISTRY[name].__init__).parameters
    out = {key: _plain(params[key].default) for key in _accepted_kwargs(MODEL_REGISTRY[name])
           if params[key].default is not inspect.Parameter.empty}
    out.update({key: _plain(value) for key, value in (args or {}).items()})
    return out


def get_model(
    name: str, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> CapsmedModel:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` (``capsnet``, ``efficient_capsnet``, ``segcaps``,
            ``ucaps``, ``seed_cnn``, ``unet``, ``densenet``).
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes (segmentation: background included).
        **kwargs: architecture options of that model (see its class docstring).

    Returns:
        The model, a :class:`CapsmedModel`.

    Raises:
        ValueError: for an unknown name (the message lists the known ones), an option the model
            does not take (the message lists the ones it takes), or a bad option value.

    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    cls = MODEL_REGISTRY[name]
    accepted = _accepted_kwargs(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} does not take option(s) {unknown}; it takes: {', '.join(accepted)}"
        )
    model = cls(spatial_dims, in_channels, out_channels, **kwargs)
    logger.debug("built %s (%dD): %d parameters", name, spatial_dims, model.num_parameters())
    return model


def _count_params(name: str, spatial_dims: int) -> int:
    cls = MODEL_REGISTRY[name]
    config = dict(DESCRIBE_CONFIG[cls.task])
    if "image_size" not in _accepted_kwargs(cls):
        config.pop("image_size", None)
    # Build on the meta device: shapes only, no memory or initialisation cost. Fall back to the
    # CPU for layers that cannot be built there.
    try:
        with torch.device("meta"):
            model = get_model(name, spatial_dims, **config)
    except (NotImplementedError, RuntimeError):
        model = get_model(name, spatial_dims, **config)
    return model.num_parameters()


def describe_models() -> list[dict[str, Any]]:
    """Describe every registered model for the ``capsmed models`` listing.

    Parameter counts are for one input channel, with 10 classes and 28^2 / 28^3 inputs for
    classifiers and 3 classes for segmenters, default options otherwise.

    Returns:
        One row per model, sorted by name: ``{"name", "task", "kind", "params_2d", "params_3d",
        "summary"}`` where ``kind`` is the output kind (``"logits"`` / ``"lengths"``) and
        ``summary`` the first line of the class docstring.

    """
    rows = []
    for name in list_models():
        cls = MODEL_REGISTRY[name]
        doc = inspect.getdoc(cls) or ""
        rows.append(
            {
                "name": name,
                "task": cls.task,
                "kind": cls.output_kind,
                "params_2d": _count_params(name, 2),
                "params_3d": _count_params(name, 3),
                "summary": doc.splitlines()[0] if doc else "",
            }
        )
    return rows


def config_problems(cfg: dict[str, Any], source: str = "config") -> list[str]:
    """What the config schema cannot know and a run would find only after jobs ran.

    It lives with the registry it checks against (the config, a floor below, knows no models).

    Checked when Snakemake parses the workflow (``workflow/rules/common.smk``) and by
    ``capsmed validate -c CONFIG``: every model name is in the registry and suits the dataset's
    task, every model option is one its constructor takes, and every file source's ``path``
    exists (relative paths from the working directory).

    Args:
        cfg: A validated configuration (:func:`capsmed.config.validate_config`).
        source: Name of the config file, for messages.

    Returns:
        One line per problem naming the key and the accepted values; empty when none.
    """
    from capsmed.config import FILE_SOURCES, model_class

    known = ", ".join(sorted(MODEL_REGISTRY))
    variants = sorted(m for m in cfg["models"] if model_class(cfg, m) != m)
    problems = []
    for name, ds in cfg["datasets"].items():
        for model in ds["models"]:
            cls = MODEL_REGISTRY.get(model_class(cfg, model))
            if cls is None:
                accepted = known + (f"; variants in models: {', '.join(variants)}"
                                    if variants else "")
                problems.append(f"{source}: datasets.{name}.models: unknown model {model!r}; "
                                f"accepted: {accepted}")
            elif cls.task != ds["task"]:
                fits = ", ".join(sorted(m for m, c in MODEL_REGISTRY.items()
                                        if c.task == ds["task"]))
                problems.append(f"{source}: datasets.{name}.models: {model} is a {cls.task} model "
                                f"but the task is {ds['task']}; accepted: {fits}")
        if ds["source"] in FILE_SOURCES and ds.get("path"):
            path = Path(ds["path"]).expanduser()
            if not path.exists():
                problems.append(f"{source}: datasets.{name}.path: {path} does not exist")
    for model, settings in cfg["models"].items():
        class_name = model_class(cfg, model)
        cls = MODEL_REGISTRY.get(class_name)
        if cls is None:
            key = f"models.{model}.model" if class_name != model else f"models.{model}"
            problems.append(f"{source}: {key}: unknown model {class_name!r}; accepted: {known}")
            continue
        accepted = _accepted_kwargs(cls)
        for option in settings.get("args", {}):
            if option not in accepted:
                problems.append(f"{source}: models.{model}.args: unknown option {option!r} of "
                                f"{class_name}; accepted: {', '.join(accepted)}")
    return problems
