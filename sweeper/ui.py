"""What the sweeper writes for MLflow's UI besides the runs' data: the descriptions (notes) of the
experiment, of each sweep's parent run and of each trial's run, the headline metrics, and a
saved view of the runs table with the accuracy columns (texts in sweeper/notes.py).

None of this may fail a trial or a sweep: every writer here catches what goes wrong and warns.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from sweeper import notes, state
from sweeper.outbox import Outbox

NOTE_TAG = "mlflow.note.content"  # a run's or an experiment's description, rendered as Markdown
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # without it, MLflow 3 opens an experiment on its GenAI pages
EXPERIMENT_KIND = "finetuning"
VIEW_TAG = f"mlflow.sharedViewState.{notes.VIEW_ID}"  # where MLflow 3.17 keeps a saved runs-table view
OUR_NOTE_TAG = "sweeper.note_sha256"  # the experiment note we wrote: replaced by a newer one, a user's never
PARENT_OUTBOX = "tracking_parent"  # the parent run's outbox folder in the sweep folder (sweeper/callbacks.py)
LOCK_WAIT_SECONDS = 5.0  # a trial's update; the sweep's last one waits longer
FINAL_LOCK_WAIT_SECONDS = 60.0


def _warn(what: str, error: BaseException) -> None:
    print(f"warning: {what} ({type(error).__name__}: {error})", file=sys.stderr, flush=True)


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """accuracy/test and accuracy/validation: copies of test_accuracy and validation_accuracy."""
    return {copy: metrics[original] for copy, original in notes.HEADLINE_METRICS.items()
            if original in metrics and not math.isnan(metrics[original])}


def view_state() -> dict:
    """The saved view's state, as MLflow 3.17's runs table saves one: the accuracy columns shown,
    newest sweeps first with their trials nested under them."""
    columns = [f"metrics.`{name}`" for name in notes.HEADLINE_METRICS] + [
        "metrics.`before_test_accuracy`", "tags.`sweeper.status`"]
    # The table applies widths only to the columns named in columnOrder (its ids, as ag-grid has them).
    widths = {"attributes.`Run Name`": 250, **dict(zip(columns, (150, 160, 170, 130)))}
    order = ["1", "attributes.`Run Name`", "runDateAndNestInfo", *columns, "duration"]
    return {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": columns, "columnOrder": order, "columnWidths": widths, "runsHiddenMode": "SHOW_ALL",
        "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
        "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def describe_experiment(client, experiment_id: str) -> None:
    """The experiment's description (unless a user wrote their own), its kind (so the UI opens it on
    its training runs), and the saved accuracy view (unless one of that id exists, which a user may
    have changed)."""
    try:
        tags = client.get_experiment(experiment_id).tags
        text = notes.experiment_note(experiment_id)
        digest = hashlib.sha256(text.encode()).hexdigest()
        current = tags.get(NOTE_TAG)
        ours = current is not None and hashlib.sha256(current.encode()).hexdigest() == tags.get(OUR_NOTE_TAG)
        if (current is None or ours) and tags.get(OUR_NOTE_TAG) != digest:
            client.set_experiment_tag(experiment_id, NOTE_TAG, text)
            client.set_experiment_tag(experiment_id, OUR_NOTE_TAG, digest)
        if EXPERIMENT_KIND_TAG not in tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if VIEW_TAG not in tags:
            now = int(time.time() * 1000)
            view = {"name": notes.VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(view_state())}
            client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(view, separators=(",", ":")))
    except Exception as error:
        _warn("the experiment's description and saved view were not written", error)


@contextlib.contextmanager
def _parent_writer(sweep_dir: Path, sweep: state.SweepState, wait: float):
    """The parent run's outbox, held by one writer at a time (trials may end in several processes);
    None when another writer keeps it longer than `wait` seconds (a later update supersedes this one)."""
    folder = sweep_dir / PARENT_OUTBOX
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "note.lock", "a") as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    yield None
                    return
                time.sleep(0.1)
        box = Outbox(folder, sweep.tracking_uri, 0.0)  # read after the lock: the count of sent writes is current
        try:
            yield box
        finally:
            box.release()  # the outbox's own send lock, which the sweep's end takes again in this process
            fcntl.flock(handle, fcntl.LOCK_UN)


def refresh_parent_note(sweep_dir: Path, sweep: state.SweepState, *, final: bool = False,
                        interrupted: bool = False) -> None:
    """Rewrite the parent run's description from the outcome files: after each trial (one attempt
    to send it), and at the end (`final`: only journaled; the sweep's end sends the parent's writes)."""
    try:
        summary = state.read_summary(sweep_dir, sweep.num_trials, interrupted=interrupted)
        text = notes.parent_note(summary, sweep, final=final)
        with _parent_writer(sweep_dir, sweep, FINAL_LOCK_WAIT_SECONDS if final else LOCK_WAIT_SECONDS) as box:
            if box is not None:
                box.set_tag(sweep.parent_run_id, NOTE_TAG, text)
                if not final:
                    box.send(block=False)  # what is left goes with the sweep's last writes
    except Exception as error:
        _warn("the parent run's description was not updated", error)


def trial_note(trial, result_metrics: dict[str, float], status: str, message: str) -> None:
    """A TrackedTrial's description, through its outbox (sent with its other writes)."""
    try:
        sweep, job = trial.sweep, trial.job
        text = notes.trial_note(result_metrics, job.number, sweep.num_trials, status, message,
                                sweep.experiment_id, sweep.parent_run_id, sweep.name)
        trial.outbox.set_tag(trial.run_id, NOTE_TAG, text)
    except Exception as error:
        _warn("the trial's description was not written", error)


__all__ = ["describe_experiment", "headline_metrics", "refresh_parent_note", "trial_note", "view_state"]
