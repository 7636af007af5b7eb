"""The Hydra callback that opens a sweep before any trial and closes it after the last.

Registered as hydra.callbacks.tracking in conf/sweeper.yaml. It runs in the launching process
only, so the experiment, the store's tables and the one parent run are created once, before
parallel trials could race to create them. Hydra turns an exception raised in a callback into
a warning and goes on, so a sweep that can't start ends here with SystemExit instead.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sweeper import expand, liveness, outbox, state, tracking, ui
from sweeper.summary import format_summary

EXIT_BAD_SWEEP = 2

_exit_status = 0
_open_sweep: Optional[tuple[Path, state.SweepState]] = None  # opened, not yet closed
_sweep_lock = None  # the open sweep folder's lock file, held while the sweep runs


def exit_status() -> int:
    """1 if a trial of the last sweep failed or the sweep was cut short, else 0."""
    return _exit_status


def close_open_sweep(error: Optional[BaseException] = None) -> None:
    """Close a sweep whose end Hydra never reached (interrupted, or the launcher raised).

    `error`: what stopped it; a signal (trainer.interrupt) sets the exit status to 128 + signum.
    """
    global _exit_status
    if _open_sweep is not None:
        _close(*_open_sweep, interrupted=True)
    if isinstance(error, KeyboardInterrupt):
        from trainer.interrupt import exit_code

        _exit_status = exit_code(error)


def _lock_sweep_dir(sweep_dir: Path) -> None:
    """Hold `sweeper.lock` in the sweep folder; another running sweep holding it is an error."""
    global _sweep_lock
    sweep_dir.mkdir(parents=True, exist_ok=True)
    handle = open(sweep_dir / "sweeper.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise expand.SweepSpecError(
            f"the sweep folder {sweep_dir} is in use by another sweep that is still running; give this one "
            "its own folder (drop hydra.sweep.dir to get a new one, or pass hydra.sweep.dir=<another folder>)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _sweep_lock = handle


def _send_pending(launch_dir: Path, sweep_dir: Path, window: float) -> None:
    """Send what earlier sweeps from this directory could not (their outboxes), before starting."""
    # Hydra's default folders, and this sweep's own (a fixed hydra.sweep.dir used again); never a
    # fixed folder's parent, which could be any large tree.
    folders = [launch_dir / "multirun", launch_dir / "outputs", sweep_dir]
    pending = outbox.pending_outboxes(list(dict.fromkeys(folders)))
    if not pending:
        return
    print(f"sending the tracking writes of {len(pending)} earlier trial(s) that the store did not get", flush=True)
    for folder in pending:
        left = outbox.open_existing(folder, window).send(block=True)
        if left:
            print(f"warning: {left} write(s) in {folder} still not sent", file=sys.stderr, flush=True)


def git_commit(folder: Path) -> tuple[Optional[str], Optional[bool]]:
    """(HEAD commit, whether tracked files have changes), or (None, None) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def _abort(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_SWEEP)


def _preview(config: DictConfig, jobs: list[list[str]]) -> None:
    """Print the trials, each flagged if its values would fail validation; exit 0."""
    from trainer.config import ConfigError, validate

    from sweeper.config import trial_config

    problems: list[Optional[str]] = []
    composed_jobs = expand.compose_jobs(config, jobs)
    for composed in composed_jobs:
        try:
            validate(trial_config(composed, output_dir="preview"))
            problems.append(None)
        except ConfigError as error:
            problems.append(str(error))
    finished = _finished_earlier(config, composed_jobs)
    print("\n".join(expand.preview_lines(jobs, problems, finished)), flush=True)
    raise SystemExit(0)


def _finished_earlier(config: DictConfig, composed_jobs: list[DictConfig]) -> list[Optional[str]]:
    """For each trial, the run in which its exact config already finished (it would be skipped), or None.

    Reads the store only if it exists (a preview creates nothing); any error reads as "unknown".
    """
    from sweeper.config import trial_dict

    uri = tracking.resolve_uri(config.tracking.uri, Path(config.hydra.runtime.cwd))
    none: list[Optional[str]] = [None] * len(composed_jobs)
    if not config.resume or (uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file()):
        return none
    try:
        client = tracking.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        if experiment is None:
            return none
        found = []
        for composed in composed_jobs:
            digest = tracking.config_hash(trial_dict(composed, output_dir=False))
            run = tracking.find_finished(client, experiment.experiment_id, digest, diverged=not config.rerun_diverged)
            found.append(run.info.run_id if run is not None else None)
        return found
    except Exception as error:  # a preview never fails on the store
        print(f"note: could not check the store for finished trials ({type(error).__name__}: {error})", flush=True)
        return none


def _open(config: DictConfig, sweep_dir: Path, num_trials: int, swept_keys: list[str]) -> None:
    """Store, experiment and parent run, then the state file the jobs read."""
    global _exit_status, _open_sweep
    _exit_status = 0
    launch_dir = Path(config.hydra.runtime.cwd)
    uri = tracking.resolve_uri(config.tracking.uri, launch_dir)
    from sweeper.ray_launch import check_launch

    check_launch(config, uri)  # hydra/launcher=ray: its settings, and a store its workers reach
    tracking.check_reachable(uri, config.tracking.connect_timeout)
    _lock_sweep_dir(sweep_dir)
    commit, dirty = git_commit(launch_dir)
    name = config.sweep_name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    parent_tags = {
        "sweeper.kind": "sweep",  # what sweeper.results looks for
        "sweeper.num_trials": num_trials or None,
        "sweeper.swept_keys": ",".join(swept_keys),
        "sweeper.overrides": " ".join(config.hydra.overrides.task),
        "sweeper.sweep_dir": str(sweep_dir),
        "sweeper.launcher": OmegaConf.select(config, "hydra.launcher._target_"),
        **tracking.git_tags(commit, dirty),
    }
    try:
        client, experiment_id = tracking.open_experiment(uri, config.tracking.experiment)
        ui.describe_experiment(client, experiment_id)  # its description and saved view (never raises)
        liveness.reap_stale(client, experiment_id, config.tracking.stale_after)
        _send_pending(launch_dir, sweep_dir, config.tracking.retry_window)
        parent_run_id = tracking.start_parent(client, experiment_id, name, parent_tags)
    except tracking.MlflowException as error:
        raise tracking.TrackingError(
            f"the tracking store at tracking.uri={uri} could not open the sweep: {error}. "
            "Check that the URI points at an MLflow tracking server or database."
        ) from None
    sweep = state.SweepState(
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        num_trials=num_trials,
        swept_keys=swept_keys,
        started_at=time.time(),
        git_commit=commit,
        git_dirty=dirty,
        name=name,
    )
    state.write_state(sweep_dir, sweep)
    _open_sweep = (sweep_dir, sweep)
    liveness.heartbeat(uri, config.tracking.heartbeat_every).add(parent_run_id)
    _retry_window[0] = config.tracking.retry_window
    print(
        f"sweep {name}: {num_trials or 'an unknown number of'} trials, parent run {parent_run_id} "
        f"in experiment {config.tracking.experiment!r} at {uri}",
        flush=True,
    )


_retry_window = [300.0]  # tracking.retry_window of the open sweep


def _close(sweep_dir: Path, sweep: state.SweepState, interrupted: bool = False) -> None:
    global _exit_status, _open_sweep, _sweep_lock
    _open_sweep = None
    summary = state.read_summary(sweep_dir, sweep.num_trials, interrupted=interrupted)
    print(format_summary(summary, sweep), flush=True)
    if interrupted:
        print("the sweep stopped before its end; run the same command again to resume it", file=sys.stderr, flush=True)
    _exit_status = 1 if summary.failed or interrupted else 0
    if not interrupted:  # the best trial's saved model into its run (train.save_model; never raises)
        from sweeper.mlflow_model import finish_sweep

        finish_sweep(sweep_dir, sweep)
    liveness.heartbeat(sweep.tracking_uri, 30).discard(sweep.parent_run_id)
    ui.refresh_parent_note(sweep_dir, sweep, final=True, interrupted=interrupted)  # never raises
    box = outbox.Outbox(sweep_dir / ui.PARENT_OUTBOX, sweep.tracking_uri, _retry_window[0])
    tracking.finish_parent(box, sweep.parent_run_id, summary, status="KILLED" if interrupted else None)
    left = box.send(block=not interrupted)
    if left:
        print(f"warning: the parent run's last {left} write(s) wait in {box.folder}; "
              f"`python -m sweeper.sync {sweep_dir}` sends them", file=sys.stderr, flush=True)
    box.release()
    if _sweep_lock is not None:
        _sweep_lock.close()
        _sweep_lock = None


class TrackingCallback(Callback):
    """Opens the sweep (store, experiment, parent run) first; prints the summary last."""

    def _start(self, config: DictConfig, jobs: Optional[list[list[str]]], sweep_dir: Path) -> None:
        try:
            if jobs is None:  # another sweeper (a search): trials are chosen as it goes
                from sweeper.study import plan, preview

                if config.preview:
                    preview(config)  # a search prints its space and study, then exits
                num_trials, keys = plan(config)  # a search (hydra/sweeper=optuna) is checked here
                _open(config, sweep_dir, num_trials, keys)
                return
            if config.preview:
                _preview(config, jobs)
            expand.compose_jobs(config, jobs)
            keys = expand.swept_keys(jobs)
            _open(config, sweep_dir, len(jobs), keys)
            if len(jobs) > 1:  # the numbers the console, the run tags, the summary and the export use
                for number, job in enumerate(jobs, start=1):
                    print(f"  trial {number}: {expand.trial_name(expand.trial_overrides(job), keys)}", flush=True)
        except (expand.SweepSpecError, tracking.TrackingError) as error:
            _abort(str(error))
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as error:
            _abort(f"could not open the sweep: {type(error).__name__}: {error}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.runtime.cwd) / str(config.hydra.sweep.dir)
        self._start(config, expand.expand_jobs(config), sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _open_sweep is not None:
            _close(*_open_sweep)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A single run is a sweep of one trial, tracked the same way.
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
        if params:
            print(f"warning: this config defines a sweep over {', '.join(map(str, params))}, but without -m "
                  "Hydra runs one trial of the defaults; add -m to run the sweep, e.g. "
                  "`python -m sweeper -m sweep=quick_cpu`", file=sys.stderr, flush=True)
        sweep_dir = Path(config.hydra.runtime.cwd) / str(config.hydra.run.dir)
        self._start(config, [list(config.hydra.overrides.task)], sweep_dir)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _open_sweep is not None:
            _close(*_open_sweep)
