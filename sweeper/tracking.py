"""Everything the sweeper writes to MLflow, through MlflowClient (no global active run).

One experiment; one parent run per sweep, created before any trial starts; one child run per
trial (tag mlflow.parentRunId), with the flattened trial config as params, step metrics sent in
batches, the TrialResult metrics under their own names, and the config, predictions and
confusion matrices as artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
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
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID  # noqa: E402

STEP_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "tokens_seen")
# Keys that don't change what a trial computes, so they stay out of the resume hash.
UNHASHED_KEYS = ("output_dir", "data.cache_dir")
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


def open_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created (with the store's tables) if it doesn't exist yet."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another sweep
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} is deleted in {uri}; restore it with `mlflow experiments "
            f"restore --experiment-id {experiment.experiment_id}` or pass tracking.experiment=<new name>"
        )
    return experiment.experiment_id


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"b1": 0.9}} -> {"optim.b1": 0.9}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
    run = client.create_run(experiment_id, run_name=name, tags={t.key: t.value for t in tags(run_tags)})
    return run.info.run_id


def start_child(
    client: MlflowClient, experiment_id: str, parent_run_id: str, name: str, run_tags: dict[str, Any]
) -> str:
    run_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, "sweeper.sweep_id": parent_run_id, **run_tags}
    run = client.create_run(experiment_id, run_name=name, tags={t.key: t.value for t in tags(run_tags)})
    return run.info.run_id


def find_finished(client: MlflowClient, experiment_id: str, digest: str):
    """The latest child run that finished with this exact config, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`sweeper.config_hash` = '{digest}' AND tags.`sweeper.status` = 'finished' "
            "AND attributes.status = 'FINISHED'"
        ),
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


class StepLogger:
    """Buffers step records and sends them with one log_batch call every `every` steps."""

    def __init__(self, client: MlflowClient, run_id: str, every: int) -> None:
        self.client, self.run_id, self.every = client, run_id, max(int(every), 1)
        self.pending: list[Metric] = []
        self.steps_pending = 0

    def __call__(self, record) -> None:
        timestamp = int(time.time() * 1000)
        self.pending.extend(
            Metric(key, float(getattr(record, key)), timestamp, int(record.step)) for key in STEP_KEYS
        )
        self.steps_pending += 1
        if self.steps_pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending, self.steps_pending = [], 0


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Final metrics at the trial's last step, so each is the latest value in the runs table."""
    timestamp = int(time.time() * 1000)
    batch = [Metric(key, float(value), timestamp, step) for key, value in sorted(metrics.items())]
    client.log_batch(run_id, metrics=batch)


def log_trial_artifacts(client: MlflowClient, run_id: str, result) -> None:
    """Predictions JSONL files and the confusion matrices (JSON, and a PNG of the test split)."""
    for path in result.artifacts.values():
        if Path(path).is_file():
            client.log_artifact(run_id, path, artifact_path="predictions")
    if result.reports:
        confusion = {
            name: {
                "rows_true": ["Negative", "Positive"],
                "columns_predicted": ["Negative", "Positive", "invalid"],
                "counts": [list(map(int, row)) for row in report.confusion],
            }
            for name, report in result.reports.items()
        }
        client.log_dict(run_id, confusion, "confusion.json")
    if "test" in result.reports:
        figure = confusion_figure(result.reports["test"].confusion, "test")
        if figure is not None:
            client.log_figure(run_id, figure, "confusion_test.png")
            import matplotlib.pyplot as plt

            plt.close(figure)


def confusion_figure(counts: list[list[int]], split: str):
    """A small heat map of the confusion matrix, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(3.2, 2.4), dpi=100)
    axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(3), ["Neg", "Pos", "invalid"])
    axes.set_yticks(range(2), ["Neg", "Pos"])
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{split} confusion")
    for i, row in enumerate(counts):
        for j, value in enumerate(row):
            axes.text(j, i, str(value), ha="center", va="center", fontsize=8)
    figure.tight_layout()
    return figure


def log_error(client: MlflowClient, run_id: str, message: str, details: str) -> None:
    client.set_tag(run_id, "sweeper.error", message[:MAX_TAG_CHARS])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "error.txt"
        path.write_text(details)
        client.log_artifact(run_id, str(path))


def finish_parent(client: MlflowClient, run_id: str, summary, status: Optional[str] = None) -> None:
    """The sweep's counts on the parent run, which ends FAILED if any trial failed (or `status`)."""
    counts = {f"trials_{s}": float(summary.count(s)) for s in ("finished", "failed", "diverged", "skipped")}
    counts["trials"] = float(summary.total)
    best = max(
        (o.validation_accuracy for o in summary.outcomes if not math.isnan(o.validation_accuracy)),
        default=None,
    )
    if best is not None:
        counts["best_validation_accuracy"] = best
    log_metrics(client, run_id, counts, step=0)
    client.set_tag(run_id, "sweeper.summary", summary.line())
    client.set_terminated(run_id, status or ("FAILED" if summary.failed else "FINISHED"))


def end_run_quietly(client: MlflowClient, run_id: str, run_status: str, sweeper_status: str) -> Optional[str]:
    """Tag sweeper.status and end the run, never raising; returns the error when the store refused."""
    try:
        client.set_tag(run_id, "sweeper.status", sweeper_status)
        client.set_terminated(run_id, run_status)
    except Exception as error:  # the store is gone; the outcome file still records the trial
        return f"{type(error).__name__}: {error}"
    return None
