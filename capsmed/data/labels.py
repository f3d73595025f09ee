"""Label and class names, and the coded concepts a config may give a label; torch-free.

A config's ``labels`` maps a value to a name, or to a name with SNOMED CT codes::

    labels:
      "0": background
      "1": {name: parotid_left,
            snomed: {category: {value: "91723000", meaning: "Anatomical Structure"},
                     type: {value: "45289007", meaning: "Parotid gland"},
                     modifier: {value: "7771000", meaning: "Left"}}}

Each code is ``{value, meaning}`` with an optional ``scheme`` (default ``SCT``, SNOMED CT);
``modifier`` (laterality) is optional. Every reader of names (:func:`name_map`, the report, metric
keys) gets the plain name; the DICOM SEG takes the codes from :func:`label_codes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The parts of a label's ``snomed`` entry: category and type are needed, modifier optional.
CODE_PARTS = ("category", "type", "modifier")
DEFAULT_SCHEME = "SCT"


def label_name(value: Any) -> str:
    """The plain name of one ``labels`` entry (a name, or a mapping with ``name``)."""
    if isinstance(value, Mapping):
        return str(value.get("name", ""))
    return str(value)


def name_map(doc: Mapping[str, Any], key: str) -> dict[int, str]:
    """``{"0": "background", ...}`` (or a list of names) under ``key`` as ``{0: "background"}``.

    Entries given as ``{name, snomed}`` become their name; keys that are not integers are left out.
    """
    raw = doc.get(key)
    out: dict[int, str] = {}
    if isinstance(raw, Mapping):
        for k, v in raw.items():
            try:
                out[int(k)] = label_name(v)
            except (TypeError, ValueError):
                continue
    elif isinstance(raw, list):
        out = {i: label_name(v) for i, v in enumerate(raw)}
    return dict(sorted(out.items()))


def code_problems(value: Any, where: str) -> list[str]:
    """Problems of one rich ``labels`` entry (``{name, snomed}``); empty when it is well formed.

    Args:
        value: The entry (a plain name has no problems here).
        where: What the messages name (e.g. ``dataset config: labels '1'``).

    Returns:
        One line per problem.
    """
    if not isinstance(value, Mapping):
        return []
    problems = []
    extra = sorted(set(value) - {"name", "snomed"})
    if extra:
        problems.append(f"{where}: unknown key(s) {', '.join(map(str, extra))}; allowed: name, "
                        "snomed")
    if not str(value.get("name") or "").strip():
        problems.append(f"{where}: needs a 'name'")
    snomed = value.get("snomed")
    if snomed is None:
        return problems
    if not isinstance(snomed, Mapping):
        return [*problems, f"{where}: 'snomed' must map category, type (and modifier) to codes"]
    for part in sorted(set(snomed) - set(CODE_PARTS)):
        problems.append(f"{where}: 'snomed' has unknown part '{part}'; allowed: "
                        f"{', '.join(CODE_PARTS)}")
    for part in CODE_PARTS:
        code = snomed.get(part)
        if code is None:
            if part != "modifier":
                problems.append(f"{where}: 'snomed' needs '{part}'")
            continue
        if not isinstance(code, Mapping) or not str(code.get("value") or "").strip() or \
                not str(code.get("meaning") or "").strip():
            problems.append(f"{where}: snomed {part} must be {{value, meaning}} (scheme optional, "
                            f"default {DEFAULT_SCHEME})")
    return problems


def label_codes(raw: Mapping[Any, Any] | None) -> dict[int, dict[str, dict[str, str]]]:
    """The codes of every label that has them: ``{1: {"category": {...}, "type": {...}}}``.

    Args:
        raw: A ``labels`` mapping as the config gives it.

    Returns:
        Label value -> part (``category``, ``type``, ``modifier``) -> ``{scheme, value, meaning}``;
        labels without codes are absent.
    """
    out: dict[int, dict[str, dict[str, str]]] = {}
    for k, v in (raw or {}).items():
        if not isinstance(v, Mapping) or not isinstance(v.get("snomed"), Mapping):
            continue
        try:
            key = int(k)
        except (TypeError, ValueError):
            continue
        out[key] = {part: {"scheme": str(code.get("scheme") or DEFAULT_SCHEME),
                           "value": str(code["value"]), "meaning": str(code["meaning"])}
                    for part, code in v["snomed"].items()
                    if part in CODE_PARTS and isinstance(code, Mapping)}
    return dict(sorted(out.items()))
