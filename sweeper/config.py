"""Typed configuration of a sweep: the trainer's TrialConfig plus tracking and sweep settings.

conf/sweeper.yaml composes the trainer's conf/config.yaml first, then `sweep_schema`, whose
trial fields are left MISSING: merging a MISSING value keeps the value already there, so the
trainer's defaults survive while the root takes the type SweepConfig. A typo or a wrong type
in any key then fails at composition, before a run is created or a step trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from trainer.config import TrialConfig, to_trial_config
from trainer.config import register_configs as register_trial_configs

TRIAL_KEYS = tuple(f.name for f in dataclasses.fields(TrialConfig))


@dataclass
class TrackingConfig:
    # None: the embedded SQLite store `mlflow.db` (artifacts in `mlartifacts/` beside it) in
    # the directory the command is run from. Else any MLflow tracking URI, e.g.
    # http://127.0.0.1:5000 or sqlite:////abs/path/mlflow.db.
    uri: Optional[str] = None
    experiment: str = "rotten_tomatoes"
    # Step metrics are sent with one log_batch call per this many steps (and at the end).
    flush_every: int = 25
    # Seconds to wait for a tracking server to answer before the sweep gives up.
    connect_timeout: float = 5.0
    # A store that goes away mid-sweep: each trial's writes wait in its folder (sweeper/outbox.py)
    # and are retried for this many seconds at the trial's end; what is left is sent by the next
    # sweep from the same directory or by `python -m sweeper.sync`.
    retry_window: float = 300.0
    # Runs carry a heartbeat tag refreshed this often; a RUNNING run whose process is gone, or
    # whose heartbeat is older than stale_after, is marked KILLED by the next sweep.
    heartbeat_every: float = 30.0
    stale_after: float = 180.0


@dataclass
class SweepConfig(TrialConfig):
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep_name: Optional[str] = None  # the parent run's name; None: "sweep-<date>-<time>"
    preview: bool = False  # print the expanded trials, train nothing, create no runs
    resume: bool = True  # skip a trial whose exact config already finished in the experiment
    rerun_diverged: bool = False  # with resume: train again a config that diverged before


SWEEPER_KEYS = tuple(f.name for f in dataclasses.fields(SweepConfig) if f.name not in TRIAL_KEYS)


def register_configs() -> None:
    """The trainer's `trial_schema` and the sweeper's `sweep_schema` (trial fields MISSING)."""
    register_trial_configs()
    node = OmegaConf.structured(SweepConfig)
    for key in TRIAL_KEYS:
        node[key] = MISSING
    ConfigStore.instance().store(name="sweep_schema", node=node)


def trial_dict(cfg: DictConfig, *, output_dir: bool = True) -> dict[str, Any]:
    """The trial part of a composed sweep config, resolved, as plain containers.

    output_dir=False leaves `output_dir` out, for use outside a Hydra job (preview), where
    `${hydra:runtime.output_dir}` has no value yet.
    """
    keys = [key for key in TRIAL_KEYS if output_dir or key != "output_dir"]
    container = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    return {key: container[key] for key in keys}


def trial_config(cfg: DictConfig, *, output_dir: Optional[str] = None) -> TrialConfig:
    """The TrialConfig that run_trial gets: every key but the sweeper's.

    output_dir, when given, replaces the config's own (which needs a running Hydra job).
    """
    values = trial_dict(cfg, output_dir=output_dir is None)
    if output_dir is not None:
        values["output_dir"] = output_dir
    return to_trial_config(OmegaConf.create(values))


__all__ = [
    "SWEEPER_KEYS",
    "SweepConfig",
    "TRIAL_KEYS",
    "TrackingConfig",
    "register_configs",
    "trial_config",
    "trial_dict",
]
