"""The table a sweep ends with: one aligned row per trial, the best trial, and what to run next."""

from __future__ import annotations

import math
import shlex

from sweeper import state
from sweeper.progress import format_seconds


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2%}"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def best_outcome(summary: state.Summary) -> state.Outcome | None:
    """The trial with the best validation accuracy (the objective; never chosen by test accuracy)."""
    scored = [o for o in summary.outcomes if not math.isnan(o.validation_accuracy) and o.status != "failed"]
    return max(scored, key=lambda o: (o.validation_accuracy, -o.trial)) if scored else None


def next_commands(sweep: state.SweepState) -> list[str]:
    """How to look at this sweep: the MLflow UI on its store, and the export of its tables."""
    uri = sweep.tracking_uri
    ui = (f"mlflow ui --backend-store-uri {shlex.quote(uri)}" if not uri.startswith(("http://", "https://"))
          else f"open {uri} in a browser")
    folder = f"exports/{sweep.name}" if sweep.name else "exports/<sweep>"
    export = shlex.join(["python", "-m", "sweeper.results", "--tracking-uri", uri, "--sweep", sweep.parent_run_id])
    return [f"  browse: {ui}   (http://127.0.0.1:5000)", f"  export: {export}   (tables and plots into {folder}/)"]


def format_summary(summary: state.Summary, sweep: state.SweepState | None = None) -> str:
    rows = [["trial", "status", "validation", "test", "before", "time", "overrides"]]
    notes = []
    for o in summary.outcomes:
        rows.append([str(o.trial), o.status, _percent(o.validation_accuracy), _percent(o.test_accuracy),
                     _percent(o.before_test_accuracy), format_seconds(o.seconds), o.name or "(defaults)"])
        if o.message:
            notes.append(f"  trial {o.trial}: {o.message}")
    lines = _table(rows, right={0, 2, 3, 4, 5})
    lines.insert(1, "-" * len(lines[0]))
    lines += notes
    if summary.missing:
        lines.append(f"{summary.missing} trial(s) never started (the sweep was stopped)" if summary.interrupted
                     else f"{summary.missing} trial(s) left no outcome (the job crashed); counted as failed")
    if summary.unsent:
        lines.append(f"{summary.unsent} tracking write(s) wait in the trials' folders; "
                     "`python -m sweeper.sync` sends them once the store is back")
    lines.append(summary.line())
    best = best_outcome(summary)
    if best is not None:
        lines.append(f"best by validation accuracy: trial {best.trial} {best.name or '(defaults)'}: validation "
                     f"{best.validation_accuracy:.2%}, test {_percent(best.test_accuracy)}"
                     + (f" (before training {best.before_test_accuracy:.2%})" if not math.isnan(best.before_test_accuracy) else "")
                     + (f", run {best.run_id}" if best.run_id else ""))
    if sweep is not None and summary.outcomes:
        lines.append("next:")
        lines += next_commands(sweep)
    return "\n".join(lines)
