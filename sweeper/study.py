"""An Optuna study for a search sweep: its settings, where it is stored, how it opens and continues.

The study lives in `optuna.journal` beside the tracking store (or `hydra.sweeper.storage`: a
journal file or a database URL), named from the sweep and a digest of its config and space, so
the same command run again finds it and continues: `n_trials` is the size the study grows to.
Only this module and sweeper/search.py import Optuna, and only when a search runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from sweeper import tracking
from sweeper.expand import SweepSpecError, trial_overrides
from sweeper.search_space import SearchSpace, describe, parse

PLUGIN_TARGET = "hydra_plugins.optuna_sweeper.optuna_sweeper.OptunaSweeper"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
DIRECTIONS = ("maximize", "minimize")


class SearchConfigError(SweepSpecError):
    """A search setting that can't run; the message names the value and the fix."""


@dataclass
class Settings:
    """hydra.sweeper's keys, checked (see hydra_plugins/optuna_sweeper for what each means)."""

    n_trials: int = 20
    n_jobs: int = 1
    sampler: str = "tpe"
    seed: Optional[int] = 0
    tpe_startup_trials: int = 10
    direction: str = "maximize"
    objective: str = "validation_accuracy"
    pruner: str = "none"
    pruner_startup_trials: int = 3
    pruner_warmup_steps: int = 0
    pruner_min_resource: Optional[int] = None
    pruner_reduction_factor: int = 3
    storage: Optional[str] = None
    study_name: Optional[str] = None
    params: dict = field(default_factory=dict)
    enqueue: list = field(default_factory=list)

    @classmethod
    def from_config(cls, config: DictConfig) -> "Settings":
        node = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
        assert isinstance(node, dict)
        node.pop("_target_", None)
        settings = cls(**node)
        settings.check(config)
        return settings

    def check(self, config: DictConfig) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise SearchConfigError(message)

        need(self.sampler in SAMPLERS, f"hydra.sweeper.sampler={self.sampler!r} is not a sampler: expected "
             f"{', '.join(SAMPLERS)}; e.g. hydra.sweeper.sampler=tpe")
        need(self.pruner in PRUNERS, f"hydra.sweeper.pruner={self.pruner!r} is not a pruner: expected "
             f"{', '.join(PRUNERS)}; e.g. hydra.sweeper.pruner=median")
        need(self.direction in DIRECTIONS, f"hydra.sweeper.direction={self.direction!r}: expected maximize or minimize")
        need(self.n_trials > 0, f"hydra.sweeper.n_trials={self.n_trials} must be > 0; e.g. hydra.sweeper.n_trials=12")
        need(self.n_jobs > 0, f"hydra.sweeper.n_jobs={self.n_jobs} must be > 0 (trials asked and launched together)")
        need("test" not in self.objective, f"hydra.sweeper.objective={self.objective}: a search never optimises on "
             "the test split, which must stay unseen until the end; use hydra.sweeper.objective=validation_accuracy")
        if self.pruner == "none":
            return
        need(self.objective == "validation_accuracy" and self.direction == "maximize",
             f"hydra.sweeper.pruner={self.pruner} compares the validation accuracy trials report while training, so "
             f"it needs objective=validation_accuracy and direction=maximize (got {self.objective}, {self.direction})")
        need(int(OmegaConf.select(config, "eval.every_steps", default=0) or 0) > 0,
             f"hydra.sweeper.pruner={self.pruner} needs trials that report while training: set eval.every_steps, "
             "e.g. eval.every_steps=20")
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        need("vectorized" not in launcher, f"hydra.sweeper.pruner={self.pruner} stops trials one at a time; the "
             "vectorized launcher trains them as one program. Use hydra/launcher=basic or joblib, or pruner=none")

    def make_sampler(self, space: SearchSpace, already: int):
        import optuna

        if self.sampler == "grid":  # the grid itself knows which points the study has run
            return optuna.samplers.GridSampler(space.grid_values(), seed=self.seed)
        # Seeded from the trials the study already has, so a continued study does not replay its start.
        seed = None if self.seed is None else self.seed + already
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.tpe_startup_trials, constant_liar=True)

    def make_pruner(self):
        import optuna

        if self.pruner == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=self.pruner_startup_trials, n_warmup_steps=self.pruner_warmup_steps)
        if self.pruner == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=self.pruner_min_resource or "auto", reduction_factor=self.pruner_reduction_factor)
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=self.pruner_min_resource or 1, reduction_factor=self.pruner_reduction_factor)
        return optuna.pruners.NopPruner()


def is_search(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.sweeper._target_", default=None) == PLUGIN_TARGET


def study_location(config: DictConfig, settings: Settings, space: SearchSpace) -> tuple[str, str]:
    """(storage: a journal file path or an RDB URL, study name).

    The default name is the sweep's name and a digest of everything that shapes a trial (the
    composed config, the space, the objective), so the same command finds the same study and a
    changed one starts another.
    """
    from sweeper.config import trial_dict

    launch_dir = Path(config.hydra.runtime.cwd)
    tracking_uri = tracking.resolve_uri(config.tracking.uri, launch_dir)
    storage = settings.storage
    if not storage:
        folder = Path(tracking_uri[len("sqlite:///"):]).parent if tracking_uri.startswith("sqlite:///") else launch_dir
        storage = str(folder / "optuna.journal")
    elif "://" not in storage:
        storage = str((launch_dir / storage).resolve())
    elif storage == tracking_uri:
        raise SearchConfigError(
            f"hydra.sweeper.storage={storage} is the MLflow store itself; Optuna and MLflow both keep an "
            "alembic_version table there. Use another database (e.g. sqlite:///optuna.db) or drop the key "
            "for the journal file beside the store"
        )
    if settings.study_name:
        return storage, settings.study_name
    shape = json.dumps([tracking.config_hash(trial_dict(config, output_dir=False)), space.describe(),
                        settings.objective, settings.direction], sort_keys=True)
    digest = hashlib.sha256(shape.encode()).hexdigest()[:8]
    return storage, f"{config.sweep_name or 'search'}-{digest}"


def open_storage(storage: str):
    """An RDB URL as Optuna takes it, or a JournalStorage over the file."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if "://" in storage:
        return storage
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(storage))


def counted(study) -> int:
    """Trials that ended (complete, pruned, failed); trials cut short by an interrupted sweep don't count."""
    from optuna.trial import TrialState

    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=ended) if not t.user_attrs.get("interrupted"))


def open_study(config: DictConfig, settings: Settings, space: SearchSpace, *, create: bool = True):
    """The study (created, or loaded to continue it); None when it doesn't exist and create=False."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    storage, name = study_location(config, settings, space)
    if not create and "://" not in storage and not Path(storage).is_file():
        return None  # no journal yet: nothing to load, and nothing created just to look
    try:
        handle = open_storage(storage)
        if not create and name not in optuna.study.get_all_study_names(handle):
            return None
        study = optuna.create_study(storage=handle, study_name=name, direction=settings.direction, load_if_exists=True)
    except Exception as error:  # a database error names its own cause; ours names the key to change
        raise SearchConfigError(f"cannot open the study {name!r} in storage {storage}: {type(error).__name__}: "
                                f"{str(error).splitlines()[0]}; pass "
                                "hydra.sweeper.storage=<a writable journal file or a database URL>") from None
    existing = study.direction.name.lower()
    if existing != settings.direction:
        raise SearchConfigError(f"study {name!r} in {storage} was created to {existing[:-1]}; pass "
                                f"hydra.sweeper.direction={existing} or hydra.sweeper.study_name=<a new name>")
    study.sampler = settings.make_sampler(space, len(study.trials))
    study.pruner = settings.make_pruner()
    return study


def trials_to_run(study, settings: Settings, space: SearchSpace) -> int:
    """How many trials this run asks for: up to n_trials in the study (a grid: at most its size)."""
    done = 0 if study is None else counted(study)
    limit = min(settings.n_trials, space.grid_size()) if settings.sampler == "grid" else settings.n_trials
    return max(limit - done, 0)


def plan(config: DictConfig) -> tuple[int, list[str]]:
    """(trials this run will launch, the searched keys), for the callback that opens the sweep.

    Another sweeper than ours: its n_trials and params keys, as it configures them.
    """
    if not is_search(config):
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
        return int(OmegaConf.select(config, "hydra.sweeper.n_trials", default=0) or 0), [str(k) for k in params]
    settings, space = checked(config)
    return trials_to_run(open_study(config, settings, space, create=False), settings, space), list(space.distributions)


def checked(config: DictConfig) -> tuple[Settings, SearchSpace]:
    """The search's settings and space, every value checked before anything runs."""
    settings = Settings.from_config(config)
    space = parse(settings.params, list(config.hydra.overrides.task))
    if not space.distributions:
        raise SearchConfigError("hydra/sweeper=optuna has nothing to search; give it a space, e.g. "
                                "'lr=tag(log,interval(1e-5,1e-2))' or hydra.sweeper.params in a conf/sweep/ file")
    if settings.sampler == "grid":
        space.grid_values()  # a continuous key fails here, before the sweep opens
    return settings, space


def preview(config: DictConfig) -> None:
    """preview=true for a search: its space, study and settings; exits 0 (nothing trained or created)."""
    if not is_search(config):
        raise SearchConfigError("preview=true lists the grid of Hydra's basic sweeper; this sweep uses another")
    settings, space = checked(config)
    storage, name = study_location(config, settings, space)
    study = open_study(config, settings, space, create=False)
    todo = trials_to_run(study, settings, space)
    lines = [
        f"search of {settings.n_trials} trials (preview: nothing is trained and no run is created):",
        f"  study {name!r} in {storage}: {0 if study is None else counted(study)} trial(s) so far, {todo} to ask",
        f"  {settings.sampler} sampler (seed {settings.seed}), pruner {settings.pruner}, "
        f"{settings.direction} {settings.objective}, {settings.n_jobs} at a time",
    ]
    fixed = trial_overrides(space.fixed)
    if fixed:
        lines.append(f"  each with: {' '.join(fixed)}")
    lines += [f"  {key}: {describe(space.distributions[key])}" for key in space.distributions]
    print("\n".join(lines), flush=True)
    raise SystemExit(0)


def tell(study, trial, value: Optional[float] = None, state=None) -> None:
    """study.tell, for ask/tell use: the grid sampler calls study.stop() once its grid is done,
    which raises outside study.optimize, after the trial's result is stored."""
    try:
        study.tell(trial, value, state=state, skip_if_finished=True)
    except RuntimeError as error:
        if "Study.stop" not in str(error):
            raise


def running(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def retire(study, trial, why: str) -> None:
    """A trial cut short by an interrupted sweep: failed, marked, and its params queued to run again.

    A finished trial has no public way to get a user attribute, so it is set through the storage.
    """
    from optuna.trial import TrialState

    study._storage.set_trial_user_attr(trial._trial_id, "interrupted", why)
    tell(study, trial.number, state=TrialState.FAIL)
    study.enqueue_trial(dict(trial.params))


__all__ = [
    "SearchConfigError", "Settings", "checked", "counted", "is_search", "open_storage", "open_study", "plan", "preview", "retire",
    "running", "study_location", "tell", "trials_to_run",
]
