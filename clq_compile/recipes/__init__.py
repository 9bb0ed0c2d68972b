"""Recipe registry: a frozen config dataclass per recipe, mapped to the function that
turns an analyzed graph and its calibration into a Plan (torchao's config → transform)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from clq_compile.errors import ConfigError
from clq_compile.options import canonical
from clq_compile.recipes.base import RecipeConfig
from clq_compile.runner import PlanContext

PlanFn = Callable[[PlanContext, RecipeConfig], Any]
C = TypeVar("C", bound=type)

_BY_NAME: dict[str, type[RecipeConfig]] = {}
_HANDLERS: dict[type[RecipeConfig], PlanFn] = {}


def register_recipe(config_cls: type[RecipeConfig]) -> Callable[[PlanFn], PlanFn]:
    """Decorator: ``@register_recipe(RTNConfig)`` on the function that builds its Plan.
    Recipe names are lower case (``resolve_recipe`` takes them in any case)."""
    if canonical(config_cls.name) != config_cls.name:
        raise ConfigError(f"recipe name {config_cls.name!r} is not allowed: recipe names are "
                          f"lower case (names are case-insensitive, clq_compile.options)")

    def deco(fn: PlanFn) -> PlanFn:
        _BY_NAME[config_cls.name] = config_cls
        _HANDLERS[config_cls] = fn
        return fn

    return deco


def available_recipes() -> list[str]:
    return sorted(_BY_NAME)


def resolve_recipe(recipe: str | RecipeConfig, **options: Any) -> RecipeConfig:
    """A config object from a registered name plus options, or the config itself."""
    if isinstance(recipe, RecipeConfig):
        fields = {f.name for f in dataclasses.fields(recipe)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ConfigError(f"recipe {recipe.name!r} has no option(s) {unknown}; "
                              f"options: {sorted(fields)}")
        return dataclasses.replace(recipe, **options) if options else recipe
    if not isinstance(recipe, str) or canonical(recipe) not in _BY_NAME:
        raise ConfigError(f"unknown recipe {recipe!r}; registered: {available_recipes()}")
    cls = _BY_NAME[canonical(recipe)]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"recipe {recipe!r} has no option(s) {unknown}; options: {sorted(fields)}"
        )
    return cls(**options)


def handler(config: RecipeConfig) -> PlanFn:
    """The plan builder registered for ``config``'s class (or the nearest base class),
    run after the config's checks on the analyzed graph's layers."""
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _checked(_HANDLERS[cls])
    raise ConfigError(f"no plan builder registered for {type(config).__name__}")


def _checked(fn: PlanFn) -> PlanFn:
    def plan(ctx: PlanContext, config: RecipeConfig) -> Any:
        config.check_layers(ctx)
        return fn(ctx, config)

    return plan


# Built-in recipes register themselves on import.
from clq_compile.recipes import baselines as _baselines  # noqa: E402,F401
from clq_compile.recipes import clq as _clq  # noqa: E402,F401
from clq_compile.recipes import rtn as _rtn  # noqa: E402,F401
