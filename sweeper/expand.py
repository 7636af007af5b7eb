"""The trials of a sweep, as Hydra's basic sweeper will launch them, known before any starts.

Used for the trial count N (progress, ETA, summary), for `preview=true`, and to compose every
trial's config up front, so that a bad key or type in one grid value fails before a run exists.
"""

from __future__ import annotations

from typing import Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from sweeper.config import SWEEPER_KEYS

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class SweepSpecError(ValueError):
    """A trial of the grid can't be composed; the message names the trial and its overrides."""


def expand_jobs(config: DictConfig) -> Optional[list[list[str]]]:
    """Each trial's overrides, in launch order; None for a sweeper other than the basic one."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    # The same order as BasicSweeper.sweep: the config's params, then the command line.
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    return BasicSweeper.split_arguments(overrides, max_batch_size=None)[0]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def trial_overrides(overrides: list[str]) -> list[str]:
    """The overrides that shape the trial, without the sweeper's own keys (tracking, preview...)."""
    return [o for o in overrides if override_key(o).split(".")[0] not in SWEEPER_KEYS]


def swept_keys(jobs: list[list[str]]) -> list[str]:
    """The keys that take more than one value across the trials, in command-line order."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            values.setdefault(override_key(override), set()).add(override)
    return [key for key, seen in values.items() if len(seen) > 1]


def trial_name(overrides: list[str], keys: list[str], empty: str = "defaults") -> str:
    """`lr=0.0002,ratio=0.9`: the overrides that vary across the sweep (else all of them)."""
    chosen = [o for o in overrides if override_key(o) in keys] or list(overrides)
    return ",".join(chosen) or empty


def compose_jobs(config: DictConfig, jobs: list[list[str]]) -> list[DictConfig]:
    """Every trial's config, composed as the launcher will; raises SweepSpecError on the first bad one."""
    loader = GlobalHydra.instance().config_loader()
    composed = []
    for number, overrides in enumerate(jobs, start=1):
        try:
            composed.append(loader.load_sweep_config(config, list(overrides)))
        except Exception as error:
            cause = f"\n{error.__cause__}" if error.__cause__ else ""  # Hydra puts the why here
            raise SweepSpecError(
                f"trial {number} of {len(jobs)} ({' '.join(overrides) or 'no overrides'}) does not compose: "
                f"{error}{cause}".rstrip()
            ) from None
    return composed


def preview_lines(jobs: list[list[str]], problems: list[Optional[str]],
                  finished: Optional[list[Optional[str]]] = None) -> list[str]:
    """The preview: each trial by number, flagged when it would fail or be skipped (`finished`:
    the run in which its exact config finished before)."""
    keys = swept_keys(jobs)
    finished = finished or [None] * len(jobs)
    skipped = sum(1 for run in finished if run)
    lines = [f"{len(jobs)} trials (preview: nothing is trained and no run is created)"
             + (f"; {skipped} finished before and would be skipped:" if skipped else ":")]
    fixed = [o for o in trial_overrides(jobs[0] if jobs else []) if override_key(o) not in keys]
    if fixed and keys:
        lines.append(f"  each with: {' '.join(fixed)}")
    for number, (overrides, problem, run) in enumerate(zip(jobs, problems, finished), start=1):
        line = f"  trial {number:<3d} {trial_name(overrides, keys)}"
        if problem:
            line += f"  -> would fail: {problem}"
        elif run:
            line += f"  -> finished before (run {run}): would be skipped"
        lines.append(line)
    return lines


__all__ = [
    "SweepSpecError",
    "compose_jobs",
    "expand_jobs",
    "override_key",
    "preview_lines",
    "swept_keys",
    "trial_name",
    "trial_overrides",
]
