"""Argument checks shared by the capsule layer constructors (ValueError naming the broken rule)."""

from __future__ import annotations

from collections.abc import Sequence

SPATIAL_DIMS = (1, 2, 3)


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise ``ValueError`` naming the rule."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_spatial_dims(value: object) -> int:
    """``spatial_dims`` must be 1, 2 or 3 (the MONAI layer factories' range)."""
    if isinstance(value, bool) or value not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_size(name: str, value: object, spatial_dims: int, minimum: int) -> tuple[int, ...]:
    """An int or a sequence of ``spatial_dims`` ints, each ``>= minimum``; returned as a tuple."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != spatial_dims:
            raise ValueError(
                f"{name} must be an int or a sequence of spatial_dims={spatial_dims} ints, "
                f"got {value!r}"
            )
        return tuple(check_int(name, v, minimum) for v in value)
    return (check_int(name, value, minimum),) * spatial_dims


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_bool(name: str, value: object) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value
