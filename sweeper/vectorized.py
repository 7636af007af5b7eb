"""The vectorised launcher's work: a sweep's compatible trials trained in groups, each its own run.

    python -m sweeper -m lr=2e-3,1e-3 ratio=0.5,1.0 hydra/launcher=vectorized hydra.launcher.group_size=4

The launcher (hydra_plugins/vectorized_launcher) receives every job of the sweep and calls
`launch_sweep`. Each job first runs as Hydra runs any job (its output folder, its `.hydra/` files,
its HydraConfig), but with a task that only resolves the trial's config. A trial that would be
skipped (resume), that fails validation, or whose config can't be resolved goes through the
sequential app right there, so it is recorded exactly as with the basic launcher. The rest
are grouped by `trainer.vectorized.group_compatible`, split into groups of at most
`group_size` (0 or 1: one by one), and each group trains in one `run_trials` call (a group of
one: `run_trial`); every trial still opens, logs and closes its own child run through
`sweeper.app.TrackedTrial`. Hydra's basic sweeper hands the launcher all jobs at once unless
hydra.sweeper.max_batch_size is set, in which case groups form within each batch.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from sweeper import app, state, tracking
from sweeper.config import trial_dict
from sweeper.progress import TrialBar


@dataclass
class PendingTrial:
    """A trial resolved in its Hydra job, waiting for its group."""

    cfg: DictConfig
    job: app.Job
    sweep: state.SweepState
    values: dict  # the resolved trial config (output_dir included)


def capture(task_function: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """The task each job runs first: a PendingTrial, or the app's own result when it can't be grouped."""
    from trainer.config import to_trial_config, validate

    def task(cfg: DictConfig) -> Any:
        if cfg.preview:
            return task_function(cfg)
        job = app.Job.current()
        try:
            sweep = state.read_state(job.sweep_dir)
            values = trial_dict(cfg)
            validate(to_trial_config(OmegaConf.create(values)))
            if cfg.resume:
                client = tracking.MlflowClient(tracking_uri=sweep.tracking_uri)
                digest = tracking.config_hash(values)
                if tracking.find_finished(client, sweep.experiment_id, digest, diverged=not cfg.rerun_diverged):
                    return task_function(cfg)  # skipped, as the app records it
        except Exception:
            return task_function(cfg)  # the app records the same failure, in a run of its own
        return PendingTrial(cfg=cfg, job=job, sweep=sweep, values=values)

    return task


def chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    size = max(int(size), 1)
    return [list(indices[start : start + size]) for start in range(0, len(indices), size)]


def launch(job_returns: list, group_size: int) -> None:
    """Train the PendingTrials among the jobs' returns in groups; each return becomes its objective."""
    from hydra.core.utils import JobStatus

    from trainer.vectorized import group_compatible

    # A FAILED return is left for Hydra's sweeper to raise, as with the basic launcher.
    completed = [ret for ret in job_returns if ret.status == JobStatus.COMPLETED]
    pending = [(ret, ret.return_value) for ret in completed if isinstance(ret.return_value, PendingTrial)]
    if not pending:
        return
    groups = group_compatible([OmegaConf.create(trial.values) for _, trial in pending])
    sizes = [len(group) for group in groups]
    print(f"vectorised launcher: {len(pending)} trials to train in {len(groups)} compatible set(s) of "
          f"{sizes}, at most {group_size} per group", flush=True)
    for group in groups:
        for chunk in chunks(group, group_size):
            outcomes = train_group([pending[i][1] for i in chunk])
            for i, outcome in zip(chunk, outcomes):
                pending[i][0].return_value = outcome.validation_accuracy


def open_run(trial: PendingTrial) -> tuple[state.Outcome, Optional[app.TrackedTrial]]:
    """(its outcome so far, its child run ready for steps); no run when the trial ends before training."""
    name = app.announce(trial.job, trial.sweep)
    outcome = state.Outcome(trial=trial.job.number, name=name, status="failed", message="interrupted")
    try:
        opened = app.TrackedTrial.open(trial.cfg, trial.job, trial.sweep, name, values=trial.values, bar=False)
    except Exception as error:  # the store failed before the run existed: only this trial
        traceback.print_exc()
        outcome.message = f"{type(error).__name__}: {error}"
        return outcome, None
    if isinstance(opened, state.Outcome):  # finished meanwhile, e.g. an identical trial of this sweep
        return opened, None
    try:
        opened.log_config()
    except Exception as error:
        opened.record_failure(error)
        opened.close()
        return opened.outcome, None
    return opened.outcome, opened


def train_together(training: list[app.TrackedTrial], description: str) -> None:
    """Train the opened trials in one run_trials call (one: run_trial) and record each result or error."""
    from trainer.trial import run_trial
    from trainer.vectorized import run_trials

    # One progress bar for the group, fed by its longest trial.
    longest = max(training, key=lambda t: t.cfg.train.total_steps or math.inf)
    longest.bar = TrialBar(longest.job.number, longest.sweep.num_trials, longest.cfg.train.total_steps)
    longest.bar.description = description
    try:
        cfgs = [OmegaConf.create(t.values) for t in training]
        if len(training) == 1:
            results = [run_trial(cfgs[0], callback=training[0].on_step)]
        else:
            results = run_trials(cfgs, [t.on_step for t in training])
    except Exception as error:  # the group failed as a whole: every trial records the error
        for t in training:
            t.record_failure(error)
        return
    for t, result in zip(training, results):
        try:
            t.record_result(result)
        except Exception as error:
            t.record_failure(error)


def train_group(trials: list[PendingTrial]) -> list[state.Outcome]:
    """Open a child run per trial, train them together, record each outcome; raises only on interrupt."""
    started = time.perf_counter()
    numbers = ",".join(str(t.job.number) for t in trials)
    if len(trials) > 1:
        print(f"vectorised group of {len(trials)}: trials {numbers}", flush=True)
    outcomes: list[state.Outcome] = []
    runs: list[Optional[app.TrackedTrial]] = []
    interrupted = False
    try:
        for trial in trials:
            outcome, run = open_run(trial)
            outcomes.append(outcome)
            runs.append(run)
        training = [run for run in runs if run is not None]
        if training:
            train_together(training, f"trials {numbers}/{trials[0].sweep.num_trials}")
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        # Every trial gets its outcome file; a run still open (interrupted) ends KILLED.
        for k, run in enumerate(runs):
            if run is not None:
                run.close(interrupted=interrupted)
                outcomes[k] = run.outcome
        share = (time.perf_counter() - started) / len(trials)
        for trial, outcome in zip(trials, outcomes):
            app.record_outcome(trial.job, trial.sweep, outcome, share)
    return outcomes


def launch_sweep(hydra_context, config: DictConfig, task_function, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int, group_size: int) -> list:
    """What VectorizedLauncher.launch does: capture every job, then train the groups; the JobReturns."""
    from hydra.core.utils import configure_log, run_job, setup_globals

    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    task = capture(task_function)
    returns = []
    for offset, overrides in enumerate(job_overrides):
        # As Hydra's basic launcher does for each job: its config, number and folder.
        index = initial_job_idx + offset
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = index
            sweep_config.hydra.job.num = index
        returns.append(run_job(
            hydra_context=hydra_context, task_function=task, config=sweep_config,
            job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
        ))
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    launch(returns, group_size)
    return returns
