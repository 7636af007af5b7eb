"""What MLflow's UI shows of a sweep, as text: run names, and the Markdown descriptions (notes) of
the parent run (the sweep's comparison), of each trial's run and of the experiment.

Pure functions of the outcome files' values (sweeper/state.py); sweeper/ui.py writes them.
"""

from __future__ import annotations

import math
import re

from sweeper import state
from sweeper.summary import best_outcome

# Copies of the two metrics a user came for, named so that MLflow's alphabetical lists (the
# runs table's column picker, a run's "Model metrics" charts) put them first.
HEADLINE_METRICS = {"accuracy/test": "test_accuracy", "accuracy/validation": "validation_accuracy"}
# The saved runs-table view (an experiment tag; see sweeper/ui.py) the notes link to.
VIEW_ID = "llm-sweeper-accuracy"
VIEW_NAME = "Test and validation accuracy"
# MLflow refuses longer tag values (5000 characters on older servers, 8000 on 3.x).
NOTE_LIMIT = 5000
# A pivot wider or longer than this (a search's continuous values) is left out; the trials table stays.
PIVOT_MAX_ROWS, PIVOT_MAX_COLUMNS = 25, 10


# ---------------------------------------------------------------- run names


def split_overrides(name: str) -> list[str]:
    """`lr=0.0002,train.mesh=[1,8,1]` -> ["lr=0.0002", "train.mesh=[1,8,1]"] (commas inside values kept)."""
    return [part for part in re.split(r",(?=[+~]{0,2}[\w.\-/]+=)", name) if part]


def short_value(text: str) -> str:
    """A number as it reads best in a narrow column: 0.0002 -> 2e-4, 0.000312345 -> 3.12e-4;
    integers and short decimals (0.5, 1.0, 184) as typed; anything else unchanged."""
    if re.fullmatch(r"[+-]?\d+", text):
        return text
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    if number != 0 and (abs(number) < 1e-2 or abs(number) >= 1e4):
        mantissa, exponent = f"{number:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return text if len(text) <= 6 else f"{number:.3g}"


def run_name(number: int, name: str) -> str:
    """A trial's run name in the UI: its number first, then its swept values, short:
    `#3 lr=2e-4 ratio=0.9`. The exact overrides stay in the tag `sweeper.overrides`."""
    parts = []
    for override in split_overrides(name):
        key, _, value = override.partition("=")
        parts.append(f"{key}={short_value(value)}" if _ else override)
    return f"#{number} {' '.join(parts) or name or 'defaults'}"


# ---------------------------------------------------------------- the parent run's note


# MLflow 3.17 opens on its GenAI pages unless told otherwise (a toggle, or this in the link).
TRAINING_PAGES = "workflowType=machine_learning"
# The UI's Markdown tables have no cell padding: "50.00%50.00%". Non-breaking spaces keep columns apart.
PAD = "&nbsp;&nbsp;"


def run_link(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_PAGES}"


def view_link(experiment_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_ID}&{TRAINING_PAGES}"


def table_row(cells: list[str]) -> str:
    return "|" + "|".join(f"{PAD}{cell}{PAD}" for cell in cells) + "|"


def _percent(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.2%}"


def trial_values(outcome: state.Outcome) -> dict[str, str]:
    """The trial's overrides as {key: value text}, from its name."""
    values = {}
    for override in split_overrides(outcome.name):
        key, sep, value = override.partition("=")
        if sep:
            values[key.lstrip("+~")] = value
    return values


def _ordered(values: list[str]) -> list[str]:
    """Distinct values, numerically ascending when all are numbers, else in first-seen order."""
    distinct = list(dict.fromkeys(values))
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return distinct


def pivot(outcomes: list[state.Outcome], keys: list[str], metric: str, best: state.Outcome | None) -> list[str]:
    """A Markdown table of `metric` over the swept keys (the last one across), the best trial's cell
    in bold; [] when it would not be a grid (fewer than 2 keys, repeated or too many values)."""
    if len(keys) < 2:
        return []
    cells: dict[tuple[str, str], state.Outcome] = {}
    for outcome in outcomes:
        values = trial_values(outcome)
        if not all(key in values for key in keys):
            return []
        row = ", ".join(values[key] for key in keys[:-1])
        if (row, values[keys[-1]]) in cells:
            return []
        cells[(row, values[keys[-1]])] = outcome
    rows = _ordered([r for r, _ in cells]) if len(keys) == 2 else list(dict.fromkeys(r for r, _ in cells))
    columns = _ordered([c for _, c in cells])
    if not cells or len(rows) > PIVOT_MAX_ROWS or len(columns) > PIVOT_MAX_COLUMNS:
        return []

    def cell(row: str, column: str) -> str:
        outcome = cells.get((row, column))
        if outcome is None:
            return ""
        text = _percent(getattr(outcome, metric)) or outcome.status
        return f"**{text}**" if outcome is best else text

    corner = f"{', '.join(keys[:-1])} ↓ · {keys[-1]} →"
    lines = [table_row([corner, *columns]), "|---|" + "---:|" * len(columns)]
    lines += [table_row([row, *(cell(row, column) for column in columns)]) for row in rows]
    return lines


def trials_table(outcomes: list[state.Outcome], keys: list[str], experiment_id: str,
                 best: state.Outcome | None) -> list[str]:
    """One row per trial: its number (a link to its run), swept values, status and accuracies."""
    header = ["trial", *keys, "status", "test", "validation", "before training (test)"]
    lines = [table_row(header), "|---:|" + "---:|" * len(keys) + "---|" + "---:|" * 3]
    for o in outcomes:
        values = trial_values(o)
        number = f"[{o.trial}]({run_link(experiment_id, o.run_id)})" if o.run_id else str(o.trial)
        row = [f"**{number}**" if o is best else number, *(values.get(k, "") for k in keys), o.status,
               _percent(o.test_accuracy), _percent(o.validation_accuracy), _percent(o.before_test_accuracy)]
        lines.append(table_row(row))
    return lines


def _counts(summary: state.Summary) -> str:
    counts = {s: sum(1 for o in summary.outcomes if o.status == s) for s in state.STATUSES}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none yet"


def headline(best: state.Outcome | None, summary: state.Summary) -> str:
    """The note's first line, which is also what the runs table's Description column shows."""
    if best is None:
        return "No trial has a validation accuracy yet." if not summary.outcomes else \
            "No trial has a validation accuracy (see the trials below)."
    before = _percent(best.before_test_accuracy)
    return (f"Best by validation accuracy: trial {best.trial} ({', '.join(split_overrides(best.name)) or 'defaults'}), "
            f"test **{_percent(best.test_accuracy) or '-'}**, validation **{_percent(best.validation_accuracy)}**"
            + (f" (before training: test {before})" if before else ""))


def parent_note(summary: state.Summary, sweep: state.SweepState, *, final: bool = False) -> str:
    """The parent run's description: the best trial, the pivot tables of test and validation
    accuracy over the swept keys, every trial with a link to its run; at most NOTE_LIMIT characters."""
    outcomes = sorted(summary.outcomes, key=lambda o: o.trial)
    best = best_outcome(summary)
    keys = list(sweep.swept_keys)
    done, total = len(outcomes), summary.num_trials
    of = f" of {total}" if total else ""
    if final and summary.interrupted:
        progress = (f"The sweep was stopped after {done}{of} trials ({_counts(summary)}); "
                    "run the same command again to resume it.")
    elif final:
        progress = f"Final: {done}{of} trials ({_counts(summary)})."
    else:
        progress = f"{done}{of} trials done so far ({_counts(summary)}); updated as each trial ends."
    if best is not None and best.run_id:
        progress += f" The best trial's run: [trial {best.trial}]({run_link(sweep.experiment_id, best.run_id)})."
    footer = [f"Every trial side by side: the [{VIEW_NAME.lower()} view]({view_link(sweep.experiment_id)}) "
              "of the runs table (also under *Views*); tables and plots: "
              f"`python -m sweeper.results --sweep {sweep.parent_run_id}`."]
    pivots: list[str] = []
    test_pivot = pivot(outcomes, keys, "test_accuracy", best)
    if test_pivot:
        pivots = ["**Test accuracy**", "", *test_pivot, "",
                  "**Validation accuracy**", "", *pivot(outcomes, keys, "validation_accuracy", best), ""]
    for shown in (len(outcomes), 20, 10, 5):
        listed = outcomes if shown >= len(outcomes) else sorted(
            outcomes, key=lambda o: (-o.validation_accuracy if not math.isnan(o.validation_accuracy) else math.inf,
                                     o.trial))[:shown]
        title = "**Trials**" if shown >= len(outcomes) else \
            f"**The {shown} best of {len(outcomes)} trials by validation accuracy**"
        table = trials_table(sorted(listed, key=lambda o: o.trial), keys, sweep.experiment_id, best)
        for sections in ([pivots, [title, "", *table, ""]], [[title, "", *table, ""]]):
            text = "\n".join([headline(best, summary), "", progress, "",
                              *[line for section in sections for line in section], *footer])
            if len(text) <= NOTE_LIMIT:
                return text
    return text[: NOTE_LIMIT - 1] + "…"


# ---------------------------------------------------------------- a trial's note, the experiment's


def trial_note(metrics: dict[str, float], number: int, num_trials: int, status: str, message: str,
               experiment_id: str, parent_run_id: str, sweep_name: str) -> str:
    """A trial run's description: its headline accuracies first, then where it belongs."""
    test, validation = metrics.get("test_accuracy", math.nan), metrics.get("validation_accuracy", math.nan)
    if math.isnan(test) and math.isnan(validation):
        first = f"**{status}**" + (f": {message}" if message else "")
    else:
        first = f"Test accuracy **{_percent(test) or '-'}**, validation accuracy **{_percent(validation) or '-'}**"
        before = [f"{split} {_percent(metrics.get(f'before_{split}_accuracy', math.nan))}"
                  for split in ("test", "validation") if not math.isnan(metrics.get(f"before_{split}_accuracy", math.nan))]
        first += f" (before training: {', '.join(before)})" if before else ""
        first += f"; {status}: {message}" if message else ""
    of = f" of {num_trials}" if num_trials else ""
    return (f"{first}\n\nTrial {number}{of} of the sweep [{sweep_name or parent_run_id}]"
            f"({run_link(experiment_id, parent_run_id)}), whose description compares every trial.")


def experiment_note(experiment_id: str) -> str:
    """The experiment's description: what its runs are and where to look first."""
    names = " and ".join(f"`{copy}`" for copy in HEADLINE_METRICS)
    originals = " and ".join(f"`{original}`" for original in HEADLINE_METRICS.values())
    return "\n".join([
        "Hyperparameter sweeps of LLaMA fine-tuning (llm-sweeper): one parent run per sweep, one child run per trial.",
        "",
        "- **A sweep's parent run**: its description compares the trials (test and validation accuracy "
        "pivoted over the swept keys) and names the best one by validation accuracy; its metrics count the trials.",
        "- **A trial's run**, named `#<trial> <swept values>`: params (the resolved config, and the data it "
        "used: `data.origin`, `data.resolved_path`, `data.sha256`, split sizes), step curves, final metrics, "
        "config, predictions and confusion matrix as artifacts.",
        f"- **Headline metrics**: {names}, copies of {originals} named to come first in the UI's lists.",
        f"- **Runs table with the accuracies**: the [{VIEW_NAME.lower()} view]({view_link(experiment_id)}) "
        "(under *Views*).",
    ])


__all__ = [
    "HEADLINE_METRICS", "VIEW_ID", "VIEW_NAME", "experiment_note", "parent_note", "pivot", "run_name",
    "short_value", "split_overrides", "trial_note", "trials_table",
]
