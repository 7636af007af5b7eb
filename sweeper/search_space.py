"""A search space from Hydra's override syntax, as Optuna distributions.

    lr=tag(log,interval(1e-5,1e-2))     a float, sampled on a log scale
    warmup=range(0,400,50)              an int from 0, 50, ..., 350 (the stop is excluded, as in Python)
    ratio=choice(0.5,0.7,0.9,1.0)       one of the listed values (also written ratio=0.5,0.7,0.9,1.0)
    train.epochs=tag(int,interval(1,4)) an int in [1, 4]

Overrides that are not sweeps (train.total_steps=4) are fixed: every trial gets them as written.
Only Optuna's distribution classes are imported here, when a space is built.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from sweeper.expand import SweepSpecError

EXAMPLE = "lr=tag(log,interval(1e-5,1e-2)) warmup=range(0,400,50) ratio=choice(0.5,0.7,0.9,1.0)"
KNOWN_TAGS = {"log", "int"}


class SearchSpaceError(SweepSpecError):
    """A search-space value that can't be searched; the message names it and shows the fix."""


@dataclass
class SearchSpace:
    distributions: dict[str, Any] = field(default_factory=dict)  # key -> optuna distribution
    grid: dict[str, Optional[list]] = field(default_factory=dict)  # key -> its values; None: continuous
    fixed: list[str] = field(default_factory=list)  # overrides every trial gets as written

    def grid_values(self) -> dict[str, list]:
        """Every key's finite values, for the grid sampler; raises when a key is continuous."""
        continuous = [key for key, values in self.grid.items() if values is None]
        if continuous:
            raise SearchSpaceError(
                f"hydra.sweeper.sampler=grid needs finite values, but {', '.join(continuous)} "
                "is a continuous interval; write e.g. lr=choice(1e-4,1e-3,1e-2) or warmup=range(0,400,100), "
                "or use hydra.sweeper.sampler=tpe"
            )
        return {key: list(values) for key, values in self.grid.items()}  # type: ignore[arg-type]

    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.grid_values().values())

    def describe(self) -> str:
        """A canonical text of the space: part of the default study name's digest."""
        return ";".join(f"{key}:{self.distributions[key]!r}" for key in sorted(self.distributions))


def _line(override: Override) -> str:
    return override.input_line or f"{override.key_or_group}=..."


def _tags(override: Override, allowed: set[str]) -> set[str]:
    tags = set(override.value().tags)
    unknown = tags - KNOWN_TAGS
    if unknown:
        raise SearchSpaceError(
            f"{_line(override)}: unknown tag {', '.join(sorted(unknown))}; the search understands "
            "tag(log,...) (a log scale) and tag(int,...) (integers), e.g. lr=tag(log,interval(1e-5,1e-2))"
        )
    misplaced = tags - allowed
    if misplaced:
        raise SearchSpaceError(f"{_line(override)}: tag {', '.join(sorted(misplaced))} does not apply here; drop it")
    return tags


def _range_values(sweep: RangeSweep) -> list:
    start, stop, step = sweep.start, sweep.stop, sweep.step
    count = max(0, math.ceil((stop - start) / step)) if step else 0
    floats = any(isinstance(v, float) for v in (start, stop, step))
    return [round(start + i * step, 12) if floats else start + i * step for i in range(count)]


def distribution(override: Override) -> tuple[Any, Optional[list]]:
    """(optuna distribution, its finite values or None) of one sweep override."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep, line = override.value(), _line(override)
    if isinstance(sweep, ChoiceSweep):
        _tags(override, set())
        values = list(sweep.list)
        if not values or any(isinstance(v, (list, dict)) for v in values):
            raise SearchSpaceError(f"{line}: choice() needs plain values (numbers, words, true/false); e.g. ratio=choice(0.5,1.0)")
        if any(isinstance(v, float) and math.isnan(v) for v in values):
            raise SearchSpaceError(f"{line}: nan can't be a choice; list numbers, e.g. lr=choice(1e-4,1e-3)")
        return CategoricalDistribution(values), values
    if isinstance(sweep, RangeSweep):
        tags = _tags(override, {"log"})
        values = _range_values(sweep)
        if not values or sweep.step <= 0:
            raise SearchSpaceError(
                f"{line} is empty or runs backwards; write range(start,stop,step) with start < stop and "
                "step > 0, e.g. warmup=range(0,400,50)"
            )
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            if "log" in tags and (sweep.step != 1 or sweep.start < 1):
                raise SearchSpaceError(f"{line}: a log-scale range needs step 1 and start >= 1, e.g. tag(log,range(1,512))")
            return IntDistribution(values[0], values[-1], log="log" in tags, step=sweep.step), values
        if "log" in tags:
            raise SearchSpaceError(f"{line}: a log scale needs an interval, e.g. lr=tag(log,interval(1e-5,1e-2))")
        return FloatDistribution(values[0], values[-1], step=sweep.step), values
    if isinstance(sweep, IntervalSweep):
        tags = _tags(override, {"log", "int"})
        low, high = sweep.start, sweep.end
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise SearchSpaceError(f"{line}: interval(low,high) needs finite low < high, e.g. lr=tag(log,interval(1e-5,1e-2))")
        if "log" in tags and low <= 0:
            raise SearchSpaceError(f"{line}: a log scale needs low > 0, e.g. lr=tag(log,interval(1e-5,1e-2))")
        if "int" in tags:
            if low != int(low) or high != int(high):
                raise SearchSpaceError(f"{line}: tag(int,...) needs whole bounds, e.g. train.epochs=tag(int,interval(1,4))")
            low_int, high_int = int(low), int(high)
            return IntDistribution(low_int, high_int, log="log" in tags), list(range(low_int, high_int + 1))
        return FloatDistribution(low, high, log="log" in tags), None
    raise SearchSpaceError(f"{line}: {type(sweep).__name__} can't be searched; use choice(), range() or interval()")


def describe(distribution: Any) -> str:
    """`log-uniform in [0.0001, 0.01]`, `one of 0, 50, ..., 350`: a distribution in words."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return "one of " + ", ".join(map(str, distribution.choices))
    scale = "log-uniform" if distribution.log else "uniform"
    kind = "int" if isinstance(distribution.low, int) else "float"
    step = f" in steps of {distribution.step}" if distribution.step not in (None, 1) else ""
    return f"{kind}, {scale} in [{distribution.low}, {distribution.high}]{step}"


def parse(params: dict[str, Any], arguments: Iterable[str]) -> SearchSpace:
    """The space of hydra.sweeper.params, then the command line's overrides (a later key wins)."""
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    parser = OverridesParser.create()
    overrides: dict[str, Override] = {}
    for line in lines:
        try:
            override = parser.parse_override(line)
        except Exception as error:
            raise SearchSpaceError(
                f"{line!r} is not a valid search space: {error}. Write e.g. {EXAMPLE}"
            ) from None
        overrides[override.get_key_element()] = override
    space = SearchSpace()
    for key, override in overrides.items():
        if override.is_sweep_override():
            space.distributions[key], space.grid[key] = distribution(override)
        else:
            space.fixed.append(override.input_line)
    return space


_PLAIN = re.compile(r"^[A-Za-z_][\w\-./]*$")


def override_value(value: Any) -> str:
    """A sampled value as Hydra reads it back: exactly the number, word or flag."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in ("true", "false", "null", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def overrides_for(space: SearchSpace, params: dict[str, Any]) -> list[str]:
    """A trial's overrides: the fixed ones, then its sampled values in the space's order."""
    return [*space.fixed, *(f"{key}={override_value(params[key])}" for key in space.distributions)]


__all__ = ["SearchSpace", "SearchSpaceError", "describe", "distribution", "override_value", "overrides_for", "parse"]
