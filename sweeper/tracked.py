"""A trial's child run, from its claim to its end: what `sweeper.app` and the launchers train in.

Opening a trial, in order:
1. a run with this exact config already finished (or diverged) -> a link run under this sweep's
   parent (tag `sweeper.linked_run_id`, nothing copied) and a `skipped` outcome;
2. a run with this config was interrupted and its checkpoint is on disk -> that run is reopened
   under this sweep's parent and the trial resumes in it, its logged steps not logged again;
3. else a new child run, which is the claim: if another live sweep claimed the config first,
   this one waits for it, then links to its result (or trains, if it did not finish).
Every write after that goes through the trial's outbox (sweeper/outbox.py), so a store that goes
away loses nothing; the run carries a heartbeat (sweeper/liveness.py) while it is open.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from sweeper import expand, liveness, notes, provenance, search, state, tracking, ui
from sweeper.config import trial_dict
from sweeper.outbox import Outbox, retry
from sweeper.progress import TrialBar, phase_times

CLAIM_POLL_SECONDS = 5.0


def child_tags(job, sweep: state.SweepState, digest: str) -> dict:
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


def _skipped(job, name: str, link_id: Optional[str], previous) -> state.Outcome:
    metrics = previous.data.metrics
    return state.Outcome(
        trial=job.number, name=name, status="skipped", run_id=link_id or previous.info.run_id,
        message=f"the same config {previous.data.tags.get('sweeper.status', 'finished')} earlier "
                f"in run {previous.info.run_id}",
        validation_accuracy=metrics.get("validation_accuracy", math.nan),
        test_accuracy=metrics.get("test_accuracy", math.nan), output_dir=str(job.output_dir),
    )


def _resumable_run(client, cfg: DictConfig, sweep: state.SweepState, digest: str, values: dict):
    """An interrupted run of this config whose checkpoint (trainer/resume.py) is on disk, or None."""
    from trainer.config import to_trial_config
    from trainer.resume import TrialCheckpoints

    candidates = tracking.find_resumable(client, sweep.experiment_id, digest)
    if not candidates or not cfg.train.resume:
        return None
    trial_cfg = to_trial_config(OmegaConf.create(values))
    for run in candidates:
        if run.info.status != "RUNNING" and TrialCheckpoints(trial_cfg, label=run.info.run_id).latest_step():
            return run
    return None


def _reopen(client, run, job, sweep: state.SweepState, digest: str) -> None:
    """Move an interrupted run under this sweep's parent and mark it running again."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    tags = {**child_tags(job, sweep, digest), **liveness.liveness_tags(),
            MLFLOW_PARENT_RUN_ID: sweep.parent_run_id, "sweeper.sweep_id": sweep.parent_run_id,
            "sweeper.resumed_by_sweep": sweep.parent_run_id}
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, str(value))
    if "sweeper.error" in run.data.tags:  # set when it was marked KILLED; no longer true
        client.delete_tag(run.info.run_id, "sweeper.error")
    client.update_run(run.info.run_id, status="RUNNING")


class TrackedTrial:
    """A trial's child run: opened before training, fed its steps, ended FINISHED, FAILED or KILLED.

    The run ends KILLED (sweeper.status interrupted) unless `record_result` or `record_failure`
    says how the trial ended.
    """

    def __init__(self, cfg: DictConfig, job, sweep: state.SweepState, name: str, values: dict,
                 outbox: Outbox, run_id: str, bar: Optional[TrialBar], logged_step: int = 0) -> None:
        self.cfg, self.job, self.sweep, self.name, self.values = cfg, job, sweep, name, values
        self.outbox, self.run_id, self.bar = outbox, run_id, bar
        self.steps = tracking.StepLogger(outbox, run_id, cfg.tracking.flush_every, after_step=logged_step)
        self.run_status = "KILLED"
        self.outcome = state.Outcome(trial=job.number, name=name, status="interrupted", run_id=run_id,
                                     message="stopped before it ended", output_dir=str(job.output_dir))
        self.heartbeat = liveness.heartbeat(sweep.tracking_uri, cfg.tracking.heartbeat_every)
        self.heartbeat.add(run_id)

    @classmethod
    def open(cls, cfg: DictConfig, job, sweep: state.SweepState, name: str, *,
             values: Optional[dict] = None, bar: bool = True) -> "TrackedTrial | state.Outcome":
        """The trial's run (new, or an interrupted one resumed), or a `skipped` outcome.

        `values`: the resolved trial config, when resolved earlier (outside this job's Hydra context).
        """
        client = tracking.MlflowClient(tracking_uri=sweep.tracking_uri)
        window = cfg.tracking.retry_window
        values = trial_dict(cfg) if values is None else values
        digest = tracking.config_hash(values)
        tags = child_tags(job, sweep, digest)
        run_name = notes.run_name(job.number, name)  # `#3 lr=2e-4 ratio=0.9`: tells runs apart in the UI

        def finished():
            if not cfg.resume:
                return None
            return tracking.find_finished(client, sweep.experiment_id, digest, diverged=not cfg.rerun_diverged)

        def link(previous) -> state.Outcome:
            link_id = retry(lambda: tracking.start_link(
                client, sweep.experiment_id, sweep.parent_run_id, run_name, tags, previous.info.run_id),
                window, "linking the earlier result")
            return _skipped(job, name, link_id, previous)

        previous = retry(finished, window, "looking up finished trials")
        if previous is not None:
            return link(previous)
        logged_step = 0
        resumable = retry(lambda: _resumable_run(client, cfg, sweep, digest, values), window, "looking up runs to resume")
        if resumable is not None:
            run_id = resumable.info.run_id
            retry(lambda: _reopen(client, resumable, job, sweep, digest), window, "reopening the interrupted run")
            logged_step = retry(lambda: tracking.logged_steps(client, run_id), window, "reading the logged steps")
            print(f"trial {job.number}: resuming run {run_id} (steps up to {logged_step} logged)", flush=True)
        else:
            run_id = retry(lambda: tracking.start_child(client, sweep.experiment_id, sweep.parent_run_id, run_name, tags),
                           window, "creating the trial's run")
            previous = cls._wait_for_claims(cfg, client, sweep, digest, run_id, job)
            if previous is not None:  # another sweep trained it meanwhile: this run becomes a link
                for key, value in {"sweeper.status": "skipped", "sweeper.linked_run_id": previous.info.run_id}.items():
                    retry(lambda: client.set_tag(run_id, key, value), window, "linking the result")
                retry(lambda: client.set_terminated(run_id, "FINISHED"), window, "linking the result")
                return _skipped(job, name, run_id, previous)
        outbox = Outbox(job.output_dir, sweep.tracking_uri, window, client=client)
        outbox.lock()
        progress = TrialBar(job.number, sweep.num_trials, cfg.train.total_steps) if bar else None
        return cls(cfg, job, sweep, name, values, outbox, run_id, progress, logged_step)

    @staticmethod
    def _wait_for_claims(cfg, client, sweep, digest: str, run_id: str, job):
        """Wait while a live run of another sweep trains this config; its result if it finished."""
        window, stale_after = cfg.tracking.retry_window, cfg.tracking.stale_after
        run = retry(lambda: client.get_run(run_id), window, "reading the trial's run")
        announced = False
        while True:
            other = retry(lambda: liveness.earlier_claim(client, sweep.experiment_id, digest, run, stale_after),
                          window, "looking up claims")
            if other is None:
                break
            if not announced:
                print(f"trial {job.number}: run {other.info.run_id} of another sweep is training this config; "
                      "waiting for its result", flush=True)
                announced = True
            time.sleep(CLAIM_POLL_SECONDS)
        if not announced or not cfg.resume:
            return None
        return retry(lambda: tracking.find_finished(client, sweep.experiment_id, digest,
                                                    diverged=not cfg.rerun_diverged), window, "looking up results")

    def log_config(self) -> None:
        self.outbox.log_batch(self.run_id, params=[(p.key, p.value) for p in tracking.trial_params(self.values)])
        data = provenance.data_params(self.values)
        if data:  # a batch of its own: a resumed run whose data changed keeps its config params
            self.outbox.log_batch(self.run_id, params=data)
        self.outbox.log_text(self.run_id, OmegaConf.to_yaml(self.values), "config.yaml")
        self.outbox.send(block=False)

    def on_phase(self, name: str, details: dict) -> None:
        if self.bar is not None:
            self.bar.phase(name, details)

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
        tracking.log_metrics(self.outbox, self.run_id, {**ui.headline_metrics(result.metrics), **result.metrics},
                             step=last_step)
        ui.trial_note(self, result.metrics, result.status, result.message)
        tracking.log_trial_artifacts(self.outbox, self.run_id, result)
        if result.message:
            self.outbox.set_tag(self.run_id, "sweeper.message", result.message)
        self.outcome = state.Outcome(
            trial=self.job.number, name=self.name, status=result.status, run_id=self.run_id, message=result.message,
            validation_accuracy=result.metrics.get("validation_accuracy", math.nan),
            test_accuracy=result.metrics.get("test_accuracy", math.nan),
            compile_seconds=result.metrics.get("compile_seconds", math.nan), output_dir=str(self.job.output_dir),
            before_test_accuracy=result.metrics.get("before_test_accuracy", math.nan),
            phases=phase_times(result.metrics),
        )
        # A diverged trial is a measured outcome, not a crash: FINISHED, sweeper.status=diverged.
        self.run_status = "FINISHED"
        return self.outcome

    def record_failure(self, error: Exception) -> state.Outcome:
        """Record `error` (call it from the `except` block that caught it); the run will end FAILED."""
        from trainer.checkpoint import CheckpointError
        from trainer.config import ConfigError
        from trainer.data import DataError

        if self.bar is not None:
            self.bar.close()
        message = f"{type(error).__name__}: {error}"
        self.outcome = state.Outcome(trial=self.job.number, name=self.name, status="failed", run_id=self.run_id,
                                     message=message, output_dir=str(self.job.output_dir))
        self.run_status = "FAILED"
        details = traceback.format_exc()
        if not isinstance(error, (ConfigError, DataError, CheckpointError)):
            print(details, file=sys.stderr, flush=True)
        self.steps.flush()
        tracking.log_error(self.outbox, self.run_id, message, details)
        ui.trial_note(self, {}, "failed", message)
        return self.outcome

    def close(self, interrupted: bool = False) -> None:
        """End the run and send what is unsent: retrying for tracking.retry_window, except when
        interrupted (a preempted machine has seconds), when one attempt is made."""
        self.steps.flush()
        tracking.end_run(self.outbox, self.run_id, self.run_status, self.outcome.status)
        self.heartbeat.discard(self.run_id)
        left = self.outbox.send(block=not interrupted)
        self.outbox.release()
        self.outcome.unsent = left
        if left:
            note = (f"{left} tracking write(s) not sent; they wait in {self.outbox.folder} for "
                    f"`python -m sweeper.sync {self.outbox.folder}` or the next sweep")
            self.outcome.message = f"{self.outcome.message}; {note}" if self.outcome.message else note
            print(f"warning: trial {self.job.number}: {note}", file=sys.stderr, flush=True)


def run_tracked_trial(cfg: DictConfig, job, sweep: state.SweepState, name: str,
                      opened: Optional[list] = None) -> state.Outcome:
    """Skip, or train in a child run that ends FINISHED (finished, diverged), FAILED or KILLED.

    `opened` gets the TrackedTrial once it exists, so a caller that sees the trial interrupted
    can still record its outcome (run id included).
    """
    from trainer.trial import run_trial

    trial = TrackedTrial.open(cfg, job, sweep, name)
    if isinstance(trial, state.Outcome):
        return trial
    if opened is not None:
        opened.append(trial)
    interrupted = False
    try:
        trial.log_config()
        result = run_trial(OmegaConf.create(trial.values), callback=trial.on_step, checkpoint_label=trial.run_id,
                           on_phase=trial.on_phase,
                           on_eval=search.eval_hook(trial))
        trial.record_result(result)
    except Exception as error:
        trial.record_failure(error)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        trial.close(interrupted=interrupted)
    return trial.outcome


__all__ = ["TrackedTrial", "child_tags", "run_tracked_trial"]
