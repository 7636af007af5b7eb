"""Everything the sweeper writes to MLflow, through MlflowClient (no global active run).

One experiment; one parent run per sweep, created before any trial starts; one child run per
trial (tag mlflow.parentRunId), with the flattened trial config as params, step metrics sent in
batches, the TrialResult metrics under their own names, and the config, predictions and
confusion matrices as artifacts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

# A tracking server that stops answering mid-sweep should fail a trial within minutes, not
# after MLflow's default 7 retries with exponential backoff; a user's own settings win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID  # noqa: E402

from sweeper import liveness  # noqa: E402
from trainer.config import flatten  # noqa: E402  (re-exported: tracking.flatten)

STEP_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "tokens_seen")
# Keys that don't change what a trial computes, so they stay out of the resume hash.
UNHASHED_KEYS = (
    "output_dir", "data.cache_dir", "train.checkpoint_dir", "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes", "train.keep_checkpoint", "train.resume",
    "train.save_model", "train.save_adapter",  # what is kept of a trial, not what it computes
)
MAX_TAG_CHARS = 5000


class TrackingError(RuntimeError):
    """The tracking store can't be used; the message names the URI and the fix."""


def resolve_uri(uri: Optional[str], launch_dir: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the SQLite store `mlflow.db` in the launch directory.

    The same order as `python -m sweeper.results`, so both read and write one store.
    """
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(launch_dir / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> Optional[str]:
    """For a SQLite store, `mlartifacts/` beside the database file; else the server's default."""
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        return (database.parent / "mlartifacts").resolve().as_uri()
    return None


def check_reachable(uri: str, timeout: float) -> None:
    """Fail fast, naming the URI, when no tracking store answers there."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # the server answered, if not on /health
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(
                f"cannot reach the MLflow tracking server at tracking.uri={uri} ({reason}). "
                "Start one, e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db "
                "--host 127.0.0.1 --port 5000` and pass tracking.uri=http://127.0.0.1:5000, "
                "or drop tracking.uri to use the local store mlflow.db in this directory."
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingError(
                f"cannot create the folder of tracking.uri={uri}: {error}; "
                "pass tracking.uri=sqlite:////a/writable/path/mlflow.db"
            ) from None


def open_experiment(uri: str, name: str) -> tuple[MlflowClient, str]:
    """A client of the store and the experiment's id, created (with the store's tables) if need be.

    For a SQLite store, this holds a lock file beside the database: two sweeps starting at once
    on a new file would otherwise both run MLflow's table migrations (which the client runs as
    soon as it is made).
    """
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client, client.create_experiment(name, artifact_location=artifact_location(uri))
            except MlflowException:
                experiment = client.get_experiment_by_name(name)  # created meanwhile by another sweep
                if experiment is None:
                    raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} is deleted in {uri}; restore it with `mlflow experiments "
            f"restore --experiment-id {experiment.experiment_id}` or pass tracking.experiment=<new name>"
        )
    return client, experiment.experiment_id


@contextlib.contextmanager
def _store_lock(uri: str):
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def config_hash(trial: dict[str, Any]) -> str:
    """sha256 of the canonical resolved trial config, without keys that don't change results."""
    flat = {k: v for k, v in flatten(trial).items() if k not in UNHASHED_KEYS}
    canonical = json.dumps(flat, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def trial_params(trial: dict[str, Any]) -> list[Param]:
    return [Param(key, param_value(value)) for key, value in flatten(trial).items() if key != "output_dir"]


def tags(values: dict[str, Any]) -> list[RunTag]:
    return [RunTag(key, str(value)[:MAX_TAG_CHARS]) for key, value in values.items() if value is not None]


def git_tags(commit: Optional[str], dirty: Optional[bool]) -> dict[str, Any]:
    return {MLFLOW_GIT_COMMIT: commit, "sweeper.git_dirty": dirty}


def start_parent(client: MlflowClient, experiment_id: str, name: str, run_tags: dict[str, Any]) -> str:
    run_tags = {**liveness.liveness_tags(), **run_tags}
    run = client.create_run(experiment_id, run_name=name, tags={t.key: t.value for t in tags(run_tags)})
    return run.info.run_id


def start_child(
    client: MlflowClient, experiment_id: str, parent_run_id: str, name: str, run_tags: dict[str, Any]
) -> str:
    run_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, "sweeper.sweep_id": parent_run_id,
                **liveness.liveness_tags(), **run_tags}
    run = client.create_run(experiment_id, run_name=name, tags={t.key: t.value for t in tags(run_tags)})
    return run.info.run_id


def find_finished(client: MlflowClient, experiment_id: str, digest: str, *, diverged: bool = True):
    """The latest trial run that finished (or, with `diverged`, diverged) with this exact config, or None.

    Runs that only link to another run's result are not results themselves.
    """
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`sweeper.config_hash` = '{digest}' AND attributes.status = 'FINISHED'",
        max_results=50,
        order_by=["attributes.start_time DESC"],
    )
    wanted = ("finished", "diverged") if diverged else ("finished",)
    for run in runs:
        tags = run.data.tags
        if tags.get("sweeper.status") in wanted and not tags.get("sweeper.linked_run_id"):
            return run
    return None


def find_resumable(client: MlflowClient, experiment_id: str, digest: str):
    """Trial runs with this config that were interrupted (newest first): candidates to resume."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`sweeper.config_hash` = '{digest}' AND tags.`sweeper.status` = 'interrupted'",
        max_results=10,
        order_by=["attributes.start_time DESC"],
    )


def start_link(client: MlflowClient, experiment_id: str, parent_run_id: str, name: str,
               run_tags: dict[str, Any], linked_run_id: str) -> str:
    """A child run that stands for an earlier run's result in this sweep (nothing copied)."""
    run_tags = {**run_tags, "sweeper.status": "skipped", "sweeper.linked_run_id": linked_run_id}
    run_id = start_child(client, experiment_id, parent_run_id, name, run_tags)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def logged_steps(client: MlflowClient, run_id: str) -> int:
    """The last step of the run's loss curve already in the store (0 if none)."""
    history = client.get_metric_history(run_id, "loss")
    return max((m.step for m in history), default=0)


class StepLogger:
    """Buffers step records and hands them to the run's outbox every `every` steps, then tries to
    send; steps up to `after_step` (already in the store, for a resumed run) are not logged again."""

    def __init__(self, outbox, run_id: str, every: int, after_step: int = 0) -> None:
        self.outbox, self.run_id, self.every = outbox, run_id, max(int(every), 1)
        self.after_step = int(after_step)
        self.pending: list[tuple] = []
        self.steps_pending = 0

    def __call__(self, record) -> None:
        if record.step <= self.after_step:
            return
        timestamp = int(time.time() * 1000)
        self.pending.extend((key, float(getattr(record, key)), timestamp, int(record.step)) for key in STEP_KEYS)
        self.steps_pending += 1
        if self.steps_pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.outbox.log_batch(self.run_id, metrics=self.pending)
            self.outbox.send(block=False)
        self.pending, self.steps_pending = [], 0


def log_metrics(outbox, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Final metrics at the trial's last step, so each is the latest value in the runs table."""
    timestamp = int(time.time() * 1000)
    outbox.log_batch(run_id, metrics=[(key, float(value), timestamp, step) for key, value in sorted(metrics.items())])


def log_trial_artifacts(outbox, run_id: str, result) -> None:
    """Predictions JSONL files and the confusion matrices (JSON, and a PNG of the test split)."""
    for path in result.artifacts.values():
        if Path(path).is_file():
            outbox.log_artifact(run_id, path, artifact_path="predictions")
    if result.reports:
        confusion = {
            name: {
                "rows_true": ["Negative", "Positive"],
                "columns_predicted": ["Negative", "Positive", "invalid"],
                "counts": [list(map(int, row)) for row in report.confusion],
            }
            for name, report in result.reports.items()
        }
        outbox.log_dict(run_id, confusion, "confusion.json")
    if "test" in result.reports:
        figure = confusion_figure(result.reports["test"].confusion, "test")
        if figure is not None:
            outbox.log_figure(run_id, figure, "confusion_test.png")
            import matplotlib.pyplot as plt

            plt.close(figure)


def confusion_figure(counts: list[list[int]], split: str):
    """The confusion matrix as a heat map: counts and row shares in each cell (white on dark cells),
    labelled axes, accuracy and example count in the title; or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [[int(value) for value in row] for row in counts]
    total = sum(map(sum, rows))
    correct = sum(rows[i][i] for i in range(min(len(rows), len(rows[0]) if rows else 0)))
    largest = max((value for row in rows for value in row), default=0) or 1
    figure, axes = plt.subplots(figsize=(5.6, 3.6), dpi=120)
    axes.imshow(rows, cmap="Blues", vmin=0, vmax=largest, aspect="auto")
    columns = ["Negative", "Positive", "invalid answer"][: len(rows[0]) if rows else 0]
    axes.set_xticks(range(len(columns)), columns, fontsize=10)
    axes.set_yticks(range(len(rows)), ["Negative", "Positive"][: len(rows)], fontsize=10)
    axes.set_xlabel("predicted", fontsize=11)
    axes.set_ylabel("true label", fontsize=11)
    accuracy = f"accuracy {correct / total:.1%} of {total:,}" if total else "no examples"
    axes.set_title(f"{split} split: confusion matrix ({accuracy})", fontsize=11)
    for i, row in enumerate(rows):
        row_total = sum(row) or 1
        for j, value in enumerate(row):
            dark = value / largest > 0.5  # Blues turns dark past its middle: white text there
            axes.text(j, i, f"{value:,}\n{value / row_total:.1%}", ha="center", va="center", fontsize=11,
                      color="white" if dark else "#08306b", fontweight="bold" if i == j else "normal")
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.tight_layout()
    return figure


def log_error(outbox, run_id: str, message: str, details: str) -> None:
    outbox.set_tag(run_id, "sweeper.error", message[:MAX_TAG_CHARS])
    outbox.log_text(run_id, details, "error.txt")


def finish_parent(outbox, run_id: str, summary, status: Optional[str] = None) -> None:
    """The sweep's counts on the parent run, which ends FAILED if any trial failed (or `status`)."""
    counts = {f"trials_{s}": float(summary.count(s)) for s in summary.statuses()}
    counts["trials"] = float(summary.total)
    best = max(
        (o.validation_accuracy for o in summary.outcomes if not math.isnan(o.validation_accuracy)),
        default=None,
    )
    if best is not None:
        counts["best_validation_accuracy"] = best
    log_metrics(outbox, run_id, counts, step=0)
    outbox.set_tag(run_id, "sweeper.summary", summary.line())
    outbox.set_tag(run_id, "sweeper.status", "interrupted" if status == "KILLED" else "finished")
    outbox.set_terminated(run_id, status or ("FAILED" if summary.failed else "FINISHED"))


def end_run(outbox, run_id: str, run_status: str, sweeper_status: str) -> None:
    """Tag sweeper.status and end the run (through the outbox: never raises on a store that is away)."""
    outbox.set_tag(run_id, "sweeper.status", sweeper_status)
    outbox.set_terminated(run_id, run_status)
