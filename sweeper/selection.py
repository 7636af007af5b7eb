"""A sweep read back from MLflow: its parent and child runs, and one tidy row per trial.

What `python -m sweeper.results` exports and `python -m sweeper.register` registers from. Reads
only what the sweeper logged, by tag and param name; never writes to MLflow.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sweeper import compare
from sweeper.compare import column

DEFAULT_EXPERIMENT = "rotten_tomatoes"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# One class in >= 95% of the answers; used only when a run lacks the test_degenerate metric.
DEGENERATE_SHARE = 0.95

# Tags the sweeper writes on its runs; read here by name so the reader never imports the writer.
KIND_TAG = "tags.sweeper.kind"
OVERRIDES_TAG = "tags.sweeper.overrides"
STATUS_TAG = "tags.sweeper.status"
ERROR_TAG = "tags.sweeper.error"
LINK_TAG = "tags.sweeper.linked_run_id"
TRIAL_TAG = "tags.sweeper.trial"
RUN_NAME_TAG = "tags.mlflow.runName"

TRIAL_PARAMS = (
    "lr", "ratio", "warmup", "seed", "optim.b1", "optim.b2", "optim.weight_decay", "optim.end_lr",
    "model.name", "model.kind", "finetune.method", "finetune.rank", "train.epochs", "data.seq_len", "eval.mode",
)
# The params that tell model setups apart (sweeper/compare.py): trials are sorted by them first.
SETUP_PARAMS = ("model.name", "model.kind", "finetune.method", "finetune.rank", "finetune.layers")
TRIAL_METRICS = (
    "test_accuracy", "validation_accuracy", "test_f1_macro", "test_invalid_rate", "test_majority_share",
    "before_test_accuracy", "before_validation_accuracy", "train_examples", "train_tokens", "steps", "final_loss", "tokens_per_second",
    "train_seconds", "wall_seconds",
)


class ResultsError(Exception):
    """A selection or option that cannot be exported; the message names the value and what exists."""


@dataclass(frozen=True)
class Sweep:
    name: str
    run_id: str | None  # None for --all
    started: pd.Timestamp | None
    experiment: str
    tracking_uri: str


# ---------------------------------------------------------------- selecting runs from MLflow


def _open_experiment(tracking_uri: str, experiment: str) -> str:
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        # MLflow would silently create an empty store; a missing file is a wrong directory or URI.
        if not path.is_file():
            raise ResultsError(
                f"no MLflow store at {path} (tracking URI {tracking_uri}); run a sweep here first, "
                "or pass --tracking-uri / set MLFLOW_TRACKING_URI"
            )
    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in mlflow.search_experiments())
        raise ResultsError(
            f"no experiment {experiment!r} at {tracking_uri}; experiments there: "
            f"{', '.join(names) or 'none'}; pass --experiment NAME"
        )
    return found.experiment_id


def _describe_sweeps(parents: pd.DataFrame, limit: int = 10) -> str:
    lines = [
        f"  {row[RUN_NAME_TAG]}  ({row['run_id']}, started {row['start_time']:%Y-%m-%d %H:%M} UTC)"
        for _, row in parents.head(limit).iterrows()
    ]
    more = len(parents) - limit
    return "\n".join(lines + ([f"  ... and {more} older"] if more > 0 else []))


def select_runs(tracking_uri: str, experiment: str, sweep: str, all_runs: bool) -> tuple[Sweep, pd.DataFrame]:
    """The sweep (or the whole experiment) and its trial runs as mlflow.search_runs returns them."""
    import mlflow

    experiment_id = _open_experiment(tracking_uri, experiment)
    if all_runs:
        runs = mlflow.search_runs([experiment_id])
        if KIND_TAG in runs.columns:
            runs = runs[runs[KIND_TAG] != "sweep"]
        if LINK_TAG in runs.columns:  # a re-run sweep's stand-ins for runs that are here anyway
            runs = runs[runs[LINK_TAG].isna() | (runs[LINK_TAG] == "")]
        if runs.empty:
            raise ResultsError(f"experiment {experiment!r} at {tracking_uri} has no trial runs yet")
        return Sweep(f"{experiment}-all", None, runs["start_time"].min(), experiment, tracking_uri), runs

    parents = mlflow.search_runs(
        [experiment_id], filter_string="tags.`sweeper.kind` = 'sweep'", order_by=["attributes.start_time DESC"]
    )
    if parents.empty:
        raise ResultsError(
            f"no sweep in experiment {experiment!r} at {tracking_uri} (no run tagged sweeper.kind=sweep); "
            "run a sweep first, or pass --all to export every run of the experiment"
        )
    if sweep == "latest":
        chosen = parents.iloc[[0]]
    else:
        chosen = parents[parents["run_id"] == sweep]
        if chosen.empty:
            chosen = parents[parents[RUN_NAME_TAG] == sweep]
        if chosen.empty:
            raise ResultsError(
                f"no sweep {sweep!r} (parent run id or name) in experiment {experiment!r}; "
                f"sweeps there, newest first:\n{_describe_sweeps(parents)}"
            )
        if len(chosen) > 1:
            print(
                f"note: {len(chosen)} sweeps are named {sweep!r}; exporting the newest, {chosen.iloc[0]['run_id']}; "
                "pass a run id to pick another", file=sys.stderr,
            )
    parent = chosen.iloc[0]
    runs = _follow_links(mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'"))
    name = parent[RUN_NAME_TAG] if isinstance(parent.get(RUN_NAME_TAG), str) else parent["run_id"]
    if runs.empty:
        raise ResultsError(f"sweep {name!r} ({parent['run_id']}) has no trial runs yet")
    return Sweep(name, parent["run_id"], parent["start_time"], experiment, tracking_uri), runs


def _follow_links(runs: pd.DataFrame) -> pd.DataFrame:
    """Each link run (a trial a re-run sweep skipped: tag sweeper.linked_run_id) replaced by the run it
    links to, so a re-run sweep exports every trial with its measured values."""
    import mlflow

    if runs.empty or LINK_TAG not in runs.columns:
        return runs
    is_link = runs[LINK_TAG].notna() & (runs[LINK_TAG] != "")
    linked_ids = list(dict.fromkeys(runs.loc[is_link, LINK_TAG]))
    if not linked_ids:
        return runs
    experiment_ids = list(runs["experiment_id"].unique())
    quoted = ", ".join(f"'{run_id}'" for run_id in linked_ids)
    linked = mlflow.search_runs(experiment_ids, filter_string=f"attributes.run_id IN ({quoted})")
    missing = set(linked_ids) - set(linked["run_id"])
    if missing:
        print(f"note: {len(missing)} linked run(s) no longer exist (deleted?): {', '.join(sorted(missing))}",
              file=sys.stderr)
    # A linked run keeps this sweep's trial number (its own tag is the earlier sweep's).
    numbers = dict(zip(runs.loc[is_link, LINK_TAG], runs.loc[is_link].get(TRIAL_TAG, pd.Series(dtype=object))))
    if TRIAL_TAG in linked.columns:
        linked[TRIAL_TAG] = [numbers.get(run_id, old) for run_id, old in zip(linked["run_id"], linked[TRIAL_TAG])]
    return pd.concat([runs[~is_link], linked], ignore_index=True)


# ---------------------------------------------------------------- one row per trial


def _maybe_numeric(values: pd.Series) -> pd.Series:
    """MLflow stores params as text; make a column numeric when every value it has is a number."""
    as_numbers = pd.to_numeric(values, errors="coerce")
    return as_numbers if as_numbers[values.notna()].notna().all() else values


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The swept keys in first-seen order, from tags like "lr=0.0002,ratio=0.9" (Hydra's +/~ dropped)."""
    keys: list[str] = []
    for text in overrides:
        if isinstance(text, str):
            for key in re.findall(r"(?:^|,)\s*[+~]{0,2}([\w.\-/]+)=", text):
                if key not in keys:
                    keys.append(key)
    return keys


def _status(tag, mlflow_status, degenerate, majority_share) -> str:
    if isinstance(tag, str) and tag:
        status = tag
    else:
        status = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "failed"}.get(
            str(mlflow_status), "running"
        )
    if pd.notna(degenerate):
        is_degenerate = degenerate >= 0.5
    else:
        is_degenerate = pd.notna(majority_share) and majority_share >= DEGENERATE_SHARE
    return "degenerate" if status == "finished" and is_degenerate else status


def tidy_trials(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with numeric params (blank where a key doesn't apply to the trial's kind), a status
    column, sorted by model setup and the swept keys, numbered from 1."""
    trials = compare.blank_inapplicable(runs)
    for name in [c for c in trials.columns if c.startswith("params.")]:
        trials[name] = _maybe_numeric(trials[name])
    trials["overrides"] = column(trials, OVERRIDES_TAG).fillna(column(trials, RUN_NAME_TAG))
    trials["status"] = [
        _status(*values)
        for values in zip(
            column(trials, STATUS_TAG), trials["status"],
            column(trials, "metrics.test_degenerate"), column(trials, "metrics.test_majority_share"),
        )
    ]
    trials["error"] = column(trials, ERROR_TAG)
    sort_by = [f"params.{k}" for k in list(SETUP_PARAMS) + override_keys(trials["overrides"]) + ["seed"]]
    sort_by = list(dict.fromkeys(c for c in sort_by if c in trials.columns)) + ["start_time"]
    trials = trials.sort_values(sort_by, kind="stable", na_position="last").reset_index(drop=True)
    # One numbering everywhere: a sweep's trial numbers (the console's, the run tag's, the summary's)
    # when every row has a distinct one; else (several sweeps, --all) the row order.
    numbers = pd.to_numeric(column(trials, TRIAL_TAG), errors="coerce")
    if numbers.notna().all() and numbers.is_unique:
        trials.insert(0, "id", numbers.astype(int).to_numpy())
    else:
        trials.insert(0, "id", range(1, len(trials) + 1))
    return trials


def logged_names(trials: pd.DataFrame, prefix: str) -> list[str]:
    """The params or metrics the trials logged: column names under `prefix` ("params." or "metrics.")."""
    return sorted(c[len(prefix):] for c in trials.columns if c.startswith(prefix))


def trials_table(trials: pd.DataFrame) -> pd.DataFrame:
    """The long table: one row per trial with its swept keys, key params and main metrics (raw values)."""
    params = list(dict.fromkeys(override_keys(trials["overrides"]) + list(TRIAL_PARAMS)))
    columns = {"id": "id", "overrides": "overrides", "status": "status"}
    columns |= {f"params.{p}": p for p in params if f"params.{p}" in trials.columns}
    columns |= {f"metrics.{m}": m for m in TRIAL_METRICS if f"metrics.{m}" in trials.columns}
    columns |= {"error": "error", "run_id": "run_id", "start_time": "started"}
    table = trials[list(columns)].rename(columns=columns)
    keep = [c for c in table.columns if c in ("id", "overrides", "status", "run_id") or table[c].notna().any()]
    return table[keep]
