"""The Hydra app: one job = one trial, run through trainer.trial.run_trial and tracked in MLflow.

`run_job` is the task function every launcher calls, in this process (basic launcher) or in a
worker process (joblib). It returns the validation accuracy, the objective a search sweeper
would maximise; NaN when the trial failed. A failing trial never raises: it is recorded as a
FAILED child run with the error, and the sweep goes on.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sweeper import expand, state, tracking
from sweeper.config import register_configs, trial_dict
from sweeper.progress import TrialBar, sweep_line

register_configs()


@dataclass
class Job:
    """Where this trial sits in its sweep, from Hydra's runtime config."""

    sweep_dir: Path
    output_dir: Path
    number: int  # 1-based
    overrides: list[str]

    @classmethod
    def current(cls) -> "Job":
        hc = HydraConfig.get()
        output_dir = Path(hc.runtime.output_dir)
        if hc.mode == RunMode.MULTIRUN:
            sweep_dir = Path(hc.runtime.cwd) / str(hc.sweep.dir)
            number = int(OmegaConf.select(hc, "job.num", default=0)) + 1
        else:
            sweep_dir, number = output_dir, 1
        return cls(sweep_dir, output_dir, number, list(hc.overrides.task))


def run_job(cfg: DictConfig) -> float:
    """One trial of the sweep; the outcome lands in the sweep folder whatever happens."""
    job = Job.current()
    if cfg.preview:  # reached only without the callback, which previews and exits first
        print(f"trial {job.number}: {' '.join(job.overrides) or 'defaults'} (preview)")
        return math.nan
    sweep = state.read_state(job.sweep_dir)
    name = announce(job, sweep)
    started = time.perf_counter()
    outcome = state.Outcome(trial=job.number, name=name, status="failed", message="interrupted")
    try:
        outcome = run_tracked_trial(cfg, job, sweep, name)
    except Exception as error:  # the store failed before the run existed: still only this trial
        traceback.print_exc()
        outcome = state.Outcome(trial=job.number, name=name, status="failed", message=f"{type(error).__name__}: {error}")
    finally:
        record_outcome(job, sweep, outcome, time.perf_counter() - started)
    return outcome.validation_accuracy


def announce(job: Job, sweep: state.SweepState) -> str:
    """Print the trial's sweep line (number, name, ETA); returns its name."""
    name = expand.trial_name(expand.trial_overrides(job.overrides), sweep.swept_keys)
    done = len(state.read_summary(job.sweep_dir, sweep.num_trials).outcomes)
    print(sweep_line(job.number, sweep.num_trials, name, sweep.started_at, done), flush=True)
    return name


def record_outcome(job: Job, sweep: state.SweepState, outcome: state.Outcome, seconds: float) -> None:
    """Write the trial's outcome file (what the summary and exit status read) and print its line."""
    outcome.seconds = seconds
    state.write_outcome(job.sweep_dir, outcome)
    of = f" of {sweep.num_trials}" if sweep.num_trials else ""
    print(f"trial {job.number}{of}: {outcome.status} in {outcome.seconds:.1f}s"
          + (f" ({outcome.message})" if outcome.message else ""), flush=True)


def finished_before(client, cfg: DictConfig, sweep: state.SweepState, digest: str, job: Job, name: str):
    """A `skipped` outcome when a run with this exact config already finished, else None."""
    if not cfg.resume:
        return None
    previous = tracking.find_finished(client, sweep.experiment_id, digest)
    if previous is None:
        return None
    metrics = previous.data.metrics
    return state.Outcome(
        trial=job.number, name=name, status="skipped", run_id=previous.info.run_id,
        message="the same config finished earlier",
        validation_accuracy=metrics.get("validation_accuracy", math.nan),
        test_accuracy=metrics.get("test_accuracy", math.nan),
    )


def child_tags(job: Job, sweep: state.SweepState, digest: str) -> dict:
    import jax

    return {
        "sweeper.kind": "trial",
        "sweeper.config_hash": digest,
        # The swept overrides, comma-joined like the run name (what sweeper.results parses) ...
        "sweeper.overrides": expand.trial_name(expand.trial_overrides(job.overrides), sweep.swept_keys, empty=""),
        # ... and every override that shaped the trial, as typed.
        "sweeper.all_overrides": " ".join(expand.trial_overrides(job.overrides)),
        "sweeper.trial": job.number,
        "sweeper.status": "running",
        "sweeper.output_dir": str(job.output_dir),
        "sweeper.jax_backend": jax.default_backend(),
        "sweeper.device_count": jax.device_count(),
        **tracking.git_tags(sweep.git_commit, sweep.git_dirty),
    }


class TrackedTrial:
    """A trial's child run: opened before training, fed its steps, ended FINISHED, FAILED or KILLED.

    The run ends KILLED unless `record_result` or `record_failure` says how the trial ended.
    """

    def __init__(self, cfg: DictConfig, job: Job, sweep: state.SweepState, name: str, values: dict,
                 client, run_id: str, bar: Optional[TrialBar]) -> None:
        self.cfg, self.job, self.sweep, self.name, self.values = cfg, job, sweep, name, values
        self.client, self.run_id, self.bar = client, run_id, bar
        self.steps = tracking.StepLogger(client, run_id, cfg.tracking.flush_every)
        self.run_status = "KILLED"
        self.outcome = state.Outcome(trial=job.number, name=name, status="failed", run_id=run_id, message="interrupted")

    @classmethod
    def open(cls, cfg: DictConfig, job: Job, sweep: state.SweepState, name: str, *,
             values: Optional[dict] = None, bar: bool = True) -> "TrackedTrial | state.Outcome":
        """The trial's new child run, or a `skipped` outcome when its exact config finished before.

        `values`: the resolved trial config, when resolved earlier (outside this job's Hydra context).
        """
        client = tracking.MlflowClient(tracking_uri=sweep.tracking_uri)
        values = trial_dict(cfg) if values is None else values
        digest = tracking.config_hash(values)
        skipped = finished_before(client, cfg, sweep, digest, job, name)
        if skipped is not None:
            return skipped
        run_id = tracking.start_child(client, sweep.experiment_id, sweep.parent_run_id, name, child_tags(job, sweep, digest))
        progress = TrialBar(job.number, sweep.num_trials, cfg.train.total_steps) if bar else None
        return cls(cfg, job, sweep, name, values, client, run_id, progress)

    def log_config(self) -> None:
        self.client.log_batch(self.run_id, params=tracking.trial_params(self.values))
        self.client.log_text(self.run_id, OmegaConf.to_yaml(self.values), "config.yaml")

    def on_step(self, record) -> None:
        self.steps(record)
        if self.bar is not None:
            self.bar(record)

    def record_result(self, result) -> state.Outcome:
        """Log a TrialResult's metrics and artifacts; the run will end FINISHED."""
        if self.bar is not None:
            self.bar.close()
        self.steps.flush()
        last_step = result.history[-1].step if result.history else 0
        tracking.log_metrics(self.client, self.run_id, result.metrics, step=last_step)
        tracking.log_trial_artifacts(self.client, self.run_id, result)
        if result.message:
            self.client.set_tag(self.run_id, "sweeper.message", result.message)
        self.outcome = state.Outcome(
            trial=self.job.number, name=self.name, status=result.status, run_id=self.run_id, message=result.message,
            validation_accuracy=result.metrics.get("validation_accuracy", math.nan),
            test_accuracy=result.metrics.get("test_accuracy", math.nan),
            compile_seconds=result.metrics.get("compile_seconds", math.nan),
        )
        # A diverged trial is a measured outcome, not a crash: FINISHED, sweeper.status=diverged.
        self.run_status = "FINISHED"
        return self.outcome

    def record_failure(self, error: Exception) -> state.Outcome:
        """Record `error` (call it from the `except` block that caught it); the run will end FAILED."""
        from trainer.config import ConfigError
        from trainer.data import DataError

        if self.bar is not None:
            self.bar.close()
        message = f"{type(error).__name__}: {error}"
        self.outcome = state.Outcome(trial=self.job.number, name=self.name, status="failed", run_id=self.run_id, message=message)
        self.run_status = "FAILED"
        details = traceback.format_exc()
        if not isinstance(error, (ConfigError, DataError)):
            print(details, file=sys.stderr, flush=True)
        try:
            self.steps.flush()
            tracking.log_error(self.client, self.run_id, message, details)
        except Exception as tracking_error:  # the store failed too; the outcome file still has it
            self.outcome.message += f" (and tracking failed: {tracking_error})"
        return self.outcome

    def close(self) -> None:
        tracking.end_run_quietly(self.client, self.run_id, self.run_status, self.outcome.status)


def run_tracked_trial(cfg: DictConfig, job: Job, sweep: state.SweepState, name: str) -> state.Outcome:
    """Skip, or train in a child run that ends FINISHED (finished, diverged), FAILED or KILLED."""
    from trainer.trial import run_trial

    trial = TrackedTrial.open(cfg, job, sweep, name)
    if isinstance(trial, state.Outcome):
        return trial
    try:
        trial.log_config()
        trial.record_result(run_trial(OmegaConf.create(trial.values), callback=trial.on_step))
    except Exception as error:
        trial.record_failure(error)
    finally:
        trial.close()
    return trial.outcome


# ../conf as an absolute path: Hydra would read a relative config_path of a function defined
# outside __main__ as a Python package path ("pkg://conf"), and conf/ is no package.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sweeper")(run_job)
