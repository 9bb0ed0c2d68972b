"""Option checks as data: each config field names its check in ``metadata``, and the
config validates (and normalizes) every field where it enters, raising a ``ConfigError``
that names the option, the value given and the values allowed.

One rule for names: a name-valued option (``recipe``, ``bits``, ``weights``, ``hessian``,
``rotation``, ``activations``, ``order``, ``cbc``, ``skip_roles``, ...) is case-insensitive,
normalized to lower case by ``canonical`` where it enters; the names allowed are lower
case."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from clq_compile.errors import ConfigError

Check = Callable[[str, Any], Any]


def option(default: Any, check: Check) -> Any:
    """A dataclass field whose value ``check(name, value)`` validates."""
    return dataclasses.field(default=default, metadata={"check": check})


def validate_fields(obj: Any) -> None:
    """Run every field's check on a (frozen) dataclass instance, storing normalized values."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is not None:
            object.__setattr__(obj, f.name, check(f.name, getattr(obj, f.name)))


def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"option {name}={value!r} is not allowed: expected {allowed}")


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")
    return value


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or \
                (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise _fail(name, value, f"an integer {bounds}")
        return value
    return check


def real(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(name: str, value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and \
            (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            raise _fail(name, value, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")
        return float(value)
    return check


ratio = real(0.0, 1.0, lo_open=True)  # clip ratios, quantiles: (0, 1]


def canonical(value: Any) -> Any:
    """A name as options compare it (lower case); anything else as given."""
    return value.lower() if isinstance(value, str) else value


def choice(*allowed: Any) -> Check:
    def check(name: str, value: Any) -> Any:
        given, value = value, canonical(value)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise _fail(name, given, f"one of {list(allowed)}")
        return value
    return check


def optional(inner: Check) -> Check:
    def check(name: str, value: Any) -> Any:
        return None if value is None else inner(name, value)
    return check


def power_of_two(lo: int = 2) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or \
                value & (value - 1):
            raise _fail(name, value, f"a power of two >= {lo}")
        return value
    return check


def group_size(name: str, value: Any) -> int | None:
    """None: as ``bits`` says; 0: per channel/token; else an even group size along K."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % 2:
        raise _fail(name, value, "None, 0 (per channel / per token) or a positive even size")
    return value


def grid(name: str, value: Any) -> tuple[float, ...]:
    """A non-empty sequence of clip ratios in (0, 1]."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise _fail(name, value, "a non-empty sequence of clip ratios in (0, 1]")
    values = tuple(value)
    ok = bool(values) and all(isinstance(v, int | float) and not isinstance(v, bool)
                              and 0 < v <= 1 for v in values)
    if not ok:
        raise _fail(name, value, "a non-empty sequence of clip ratios in (0, 1]")
    return tuple(float(v) for v in values)


def names(allowed: Iterable[str]) -> Check:
    """A tuple of names from ``allowed``; one string is one name, not its characters."""
    allowed = tuple(allowed)

    def check(name: str, value: Any) -> tuple[str, ...]:
        values = (value,) if isinstance(value, str) else value
        if not isinstance(values, Iterable):
            raise _fail(name, value, f"a name or a sequence of names from {list(allowed)}")
        values = tuple(canonical(v) for v in values)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise _fail(name, value, f"names from {list(allowed)} (unknown: {bad})")
        return values
    return check
