"""`hydra/sweeper=optuna`: trials chosen by an Optuna 5 study (ask/tell), each a tracked trial of the sweep.

    python -m sweeper -m sweep=search_cpu
    python -m sweeper -m hydra/sweeper=optuna hydra.sweeper.n_trials=12 'lr=tag(log,interval(1e-5,1e-2))'

Hydra imports this module at every start-up to discover plugins, so it imports nothing heavy;
the work is in sweeper/search.py. (No `from __future__ import annotations`: Hydra executes this
module outside sys.modules, where a dataclass with string annotations fails to build.)
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # The number of trials the study grows to; a re-run of the same command asks only the rest.
    n_trials: int = 20
    # Trials asked together and handed to the launcher as one batch (joblib runs them in parallel).
    n_jobs: int = 1
    # tpe (with constant liar, so a batch spreads out) | random | grid (every choice/range value)
    sampler: str = "tpe"
    seed: Optional[int] = 0  # the sampler's; null: fresh randomness each run
    tpe_startup_trials: int = 10  # tpe: random trials before it models the results
    direction: str = "maximize"
    # A metric of the trial runs; validation_accuracy by default, never a test metric.
    objective: str = "validation_accuracy"
    # none | median | successive_halving | hyperband: stops trials whose validation accuracy while
    # training (eval.every_steps) falls behind; a stopped trial is a child run with status pruned.
    pruner: str = "none"
    pruner_startup_trials: int = 3  # median: completed trials before any is pruned
    pruner_warmup_steps: int = 0  # median: training steps before a trial may be pruned
    pruner_min_resource: Optional[int] = None  # successive_halving / hyperband: steps of the first rung
    pruner_reduction_factor: int = 3  # successive_halving / hyperband
    # null: the journal file optuna.journal beside the tracking store; else a journal file path,
    # or a database URL (sqlite:///optuna.db, postgresql://...).
    storage: Optional[str] = None
    # null: <sweep_name or "search">-<digest of the config and space>: the same command continues it.
    study_name: Optional[str] = None
    # The search space, in Hydra's override syntax: {lr: "tag(log,interval(1e-5,1e-2))", ...}
    params: Dict[str, str] = field(default_factory=dict)
    # Params of trials to run first, e.g. [{lr: 0.002, warmup: 0, ratio: 1.0}] (a known-good start).
    enqueue: List[Dict[str, Any]] = field(default_factory=list)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="llm-sweeper")


class OptunaSweeper(Sweeper):
    """Asks the study for trials, launches them in batches, tells it each outcome (sweeper/search.py)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings  # checked by sweeper.search from the composed config
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        from sweeper.search import run_search

        return run_search(self.config, self.hydra_context, self.task_function)
