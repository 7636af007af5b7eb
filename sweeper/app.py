"""The Hydra app: one job = one trial, run through trainer.trial.run_trial and tracked in MLflow.

`run_job` is the task function every launcher calls, in this process (basic launcher) or in a
worker process (joblib). It returns the validation accuracy, the objective a search sweeper
would maximise; NaN when the trial failed. A failing trial never raises: it is recorded as a
FAILED child run with the error, and the sweep goes on.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sweeper import expand, state
from sweeper.config import register_configs
from sweeper.progress import format_seconds, sweep_line
from sweeper.tracked import TrackedTrial, run_tracked_trial  # noqa: F401  (TrackedTrial: the launchers')

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
    outcome = state.Outcome(trial=job.number, name=name, status="interrupted", message="stopped before it ended",
                            output_dir=str(job.output_dir))
    opened: list = []
    try:
        outcome = run_tracked_trial(cfg, job, sweep, name, opened)
    except Exception as error:  # the store failed before the run existed: still only this trial
        traceback.print_exc()
        outcome = state.Outcome(trial=job.number, name=name, status="failed", message=f"{type(error).__name__}: {error}")
    except KeyboardInterrupt:  # a signal: the trial's own record of it, run id included
        if opened:
            outcome = opened[0].outcome
        raise
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
    accuracy = "" if math.isnan(outcome.validation_accuracy) else (
        f", validation {outcome.validation_accuracy:.2%}, test {outcome.test_accuracy:.2%}")
    print(f"trial {job.number}{of}: {outcome.status} in {format_seconds(outcome.seconds)}{accuracy}"
          + (f" ({outcome.message})" if outcome.message else "")
          + (f"\n  time: {outcome.phases}" if outcome.phases else ""), flush=True)
    from sweeper.mlflow_model import after_trial

    after_trial(job.sweep_dir, sweep, outcome)  # its saved model: logged, or pruned unless the best (never raises)
    from sweeper.ui import refresh_parent_note

    refresh_parent_note(job.sweep_dir, sweep)  # the parent's comparison table, with this trial (never raises)


# ../conf as an absolute path: Hydra would read a relative config_path of a function defined
# outside __main__ as a Python package path ("pkg://conf"), and conf/ is no package.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sweeper")(run_job)
