"""The search space of a sweep: Hydra's sweep grammar (choice, range, interval, tag) as Optuna distributions,
the points of a grid, and their order in the queue."""
from __future__ import annotations

import itertools
import json
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


class SweepConfigError(ValueError):
    """A sweep that cannot start as configured (bad space, storage or sampler)."""


def parse_space(config_params: dict[str, Any] | None, arguments: list[str]
                ) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The search space and the fixed overrides of a sweep.

    `config_params` is `hydra.sweeper.params` (key -> `choice(...)`, `range(...)`, `interval(...)`,
    `tag(log, interval(...))` or `a,b,c`); `arguments` are the command line's overrides. A sweep override on
    the command line replaces the config's space for that key; a plain `key=value` there fixes the key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    space_overrides = {}
    for key, expr in (config_params or {}).items():
        (o,) = parser.parse_overrides([f"{key}={expr}"])
        space_overrides[o.get_key_element()] = o
    fixed = []
    for o in parser.parse_overrides(arguments):
        if o.is_sweep_override():
            space_overrides[o.get_key_element()] = o
        else:
            space_overrides.pop(o.get_key_element(), None)
            fixed.append(o.input_line)
    return {k: distribution(k, o) for k, o in space_overrides.items()}, fixed


def distribution(key: str, o) -> BaseDistribution:
    """Hydra's sweep grammar as Optuna distributions. `range(a, b, s)` follows Hydra's (and Python's) rule:
    b is excluded, so `range(2, 5)` is 2, 3, 4 (the hydra-optuna-sweeper plugin includes b). `interval(a, b)`
    is continuous with both ends included; tags `log` and `int` make it log-scaled and/or integer."""
    from hydra.core.override_parser.types import Transformer

    if not o.is_sweep_override():  # a fixed value inside hydra.sweeper.params
        return CategoricalDistribution([o.value()])
    if o.is_choice_sweep() or (o.is_range_sweep() and o.value().shuffle):
        return CategoricalDistribution(list(o.sweep_iterator(transformer=Transformer.encode)))
    if o.is_range_sweep():
        values = list(o.sweep_iterator(transformer=Transformer.identity))
        if not values:
            raise SweepConfigError(f"{key}={o.input_line.split('=', 1)[1]}: an empty range")
        r = o.value()
        if all(isinstance(v, int) for v in (r.start, r.stop, r.step)):
            return IntDistribution(values[0], values[-1], step=r.step) if r.step > 0 else \
                CategoricalDistribution(values)
        return CategoricalDistribution(values)
    if o.is_interval_sweep():  # Hydra parses interval ends as floats; `tag(int, interval(1, 8))` for ints
        v = o.value()
        log = "log" in v.tags
        if "int" in v.tags:
            return IntDistribution(int(v.start), int(v.end), log=log)
        return FloatDistribution(float(v.start), float(v.end), log=log)
    raise SweepConfigError(f"{o.input_line}: only choice, range and interval sweeps are supported")


def grid_points(space: dict[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Every combination, in a fixed order. Continuous intervals cannot be gridded: say so."""
    axes = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            axes[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            axes[key] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise SweepConfigError(
                f"{key}: a grid needs a finite list of values, got {dist}; use choice(...) or range(...), "
                "or a sampler such as TPE (hparams_search=tpe) for intervals")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


# Keys whose larger values make a trial take longer. Workers claim queued points in queue order, so the grid
# is queued longest first (the LPT rule): short points fill in at the end and the workers finish together,
# instead of one worker running the last deep net while the others idle.
COST_KEYS = ("model.depth", "model.width", "trainer.max_epochs", "trainer.max_steps")


def longest_first(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points by decreasing product of their COST_KEYS values (grid order among equals)."""
    def cost(p: dict[str, Any]) -> float:
        c = 1.0
        for k in COST_KEYS:
            v = p.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                c *= v
        return c

    return sorted(points, key=cost, reverse=True)  # sorted() is stable: grid order among equal costs


def point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def as_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in params.items()]
