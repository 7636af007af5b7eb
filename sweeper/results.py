"""Export one sweep's trials from MLflow as side-by-side tables (CSV, Markdown, HTML, LaTeX) and plots.

    python -m sweeper.results                                   # the latest sweep: lr x ratio on test_accuracy
    python -m sweeper.results --sweep lr_ratio --rows warmup --cols lr --metric validation_accuracy
    python -m sweeper.results --experiment rotten_tomatoes --all --formats csv,md

Reads only what the sweeper logged (see results/README.md for every file it writes); it never
writes to MLflow.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from sweeper import compare
from sweeper.compare import FLAGGED, column, format_metric, label
from sweeper.selection import (
    DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, ResultsError, Sweep, logged_names, override_keys, select_runs,
    tidy_trials, trials_table,
)

FORMATS = ("csv", "md", "html", "tex")

# ---------------------------------------------------------------- formatting


def _as_text(table: pd.DataFrame) -> pd.DataFrame:
    """The long table with metrics formatted for reading (percentages, thousands separators)."""
    text = pd.DataFrame(index=table.index)
    for name in table.columns:
        if name == "started":
            text[name] = table[name].dt.strftime("%Y-%m-%d %H:%M")
        elif name == "error":
            text[name] = table[name].fillna("").astype(str).str.slice(0, 80)
        else:
            text[name] = [format_metric(name, v) for v in table[name]]
    return text


# ---------------------------------------------------------------- pivot and the reference shapes


def _require(trials: pd.DataFrame, kind: str, name: str, option: str, swept: list[str]) -> str:
    prefix = "params." if kind == "param" else "metrics."
    name = name.removeprefix(prefix)
    if f"{prefix}{name}" not in trials.columns:
        available = logged_names(trials, prefix)
        hint = f"swept: {', '.join(swept)}; " if kind == "param" and swept else ""
        raise ResultsError(
            f"{option} {name!r} is not a {kind} logged by these trials; {hint}"
            f"{kind}s logged: {', '.join(available) or 'none'}"
        )
    return f"{prefix}{name}"


def _cell_note(group: pd.DataFrame, values: pd.Series) -> list[str]:
    notes = []
    if len(values) > 1:
        notes.append(f"mean of {len(values)}")
    for status in FLAGGED:
        count = int((group["status"] == status).sum())
        # Degenerate and diverged trials carry values; failed and running ones do not.
        among = len(values) if status in ("degenerate", "diverged") and len(values) else len(group)
        if count:
            notes.append(status if count == among else f"{count} {status}")
    return notes


def _axis_values(values: pd.Series) -> list:
    return sorted(values.dropna().unique()) + ([float("nan")] if values.isna().any() else [])


def pivot_tables(trials: pd.DataFrame, rows: str, cols: str, metric: str,
                 by_setup: bool | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The mean metric per (rows, cols) cell: numeric (raw values), and annotated text for reading.

    With trials of several model setups (`by_setup` None: unless one axis alone tells them apart,
    e.g. --rows model.name with one method per model), a `model` column leads and each setup has its own rows, so that no cell averages two
    models."""
    swept = override_keys(trials["overrides"])
    row_col = _require(trials, "param", rows, "--rows", swept)
    col_col = _require(trials, "param", cols, "--cols", swept)
    metric_col = _require(trials, "metric", metric, "--metric", swept)
    if row_col == col_col:
        raise ResultsError(
            f"--rows and --cols are both {rows!r}; pick two different params, e.g. --rows lr --cols ratio"
        )
    metric = metric_col[len("metrics."):]
    rows = row_col[len("params."):]
    setup = compare.setups(trials)["setup"]
    if by_setup is None:
        told_apart = any(setup.groupby(trials[c], dropna=False).nunique().max() <= 1 for c in (row_col, col_col))
        by_setup = setup.nunique() > 1 and not told_apart
    setup = setup if by_setup else pd.Series("", index=trials.index)
    # Setups in the trials' order (by model, then fine-tuning method and rank: see tidy_trials).
    keys = [(s, label(v)) for s in setup.unique() for v in _axis_values(trials.loc[setup == s, row_col])]
    index = pd.MultiIndex.from_tuples(keys, names=["model", rows]) if by_setup else \
        pd.Index([row for _, row in keys], name=rows)
    headers = [label(v) for v in _axis_values(trials[col_col])]
    numeric = pd.DataFrame(float("nan"), index=index, columns=headers)
    annotated = pd.DataFrame("", index=index, columns=headers)
    for (setup_label, row_value, col_value), group in trials.groupby([setup, row_col, col_col], dropna=False):
        # A failed trial's metrics, if any, are from before the failure: not a result.
        values = group.loc[group["status"] != "failed", metric_col].dropna()
        notes = _cell_note(group, values)
        row = (setup_label, label(row_value)) if by_setup else label(row_value)
        if len(values):
            numeric.loc[row, label(col_value)] = values.mean()
            text = format_metric(metric, values.mean())
        else:
            text, notes = (notes[0], notes[1:]) if notes and notes[0] in FLAGGED else ("no value", notes)
        annotated.loc[row, label(col_value)] = text + (f" ({'; '.join(notes)})" if notes else "")
    return numeric, annotated


def _numeric_rows(pivot: pd.DataFrame) -> pd.DataFrame:
    """The numeric pivot with its row labels as columns, empty where the param is unset, for the CSV."""
    table = pivot.reset_index()
    return table.replace({name: {"(unset)": ""} for name in pivot.index.names})


# ---------------------------------------------------------------- writing


def _markdown(text: pd.DataFrame) -> str:
    # Numbers are already formatted; tabulate must not re-parse "2e-05" or "88.74%" into something else.
    numeric = re.compile(r"^[-+]?[\d,.]+(e[-+]?\d+)?[%KMBT]?( \(.*\))?$")
    align = []
    for name in text.columns:
        filled = [v for v in text[name] if v != ""]
        align.append("right" if filled and all(numeric.match(v) for v in filled) else "left")
    return text.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


def write_table(out_dir: Path, stem: str, text: pd.DataFrame, formats: list[str], title: str,
                numeric: pd.DataFrame | None = None) -> list[Path]:
    """One table in each format; the CSV holds `numeric` when given, else the same text as the others."""
    written = []
    text = text.astype(str)
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        if fmt == "csv":
            (numeric if numeric is not None else text).to_csv(path, index=False)
        elif fmt == "md":
            path.write_text(_markdown(text))
        elif fmt == "html":
            table = text.to_html(index=False, escape=True, border=0)
            path.write_text(f"<!doctype html>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n{table}\n")
        elif fmt == "tex":
            styler = text.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
            path.write_text(styler.to_latex(hrules=True, column_format="l" * len(text.columns)))
        written.append(path)
    return written


def _best_setup_line(models: pd.DataFrame) -> str:
    scored = models.dropna(subset=["test_accuracy"])
    if scored.empty:
        return "- best model setup: none (no setup has a trial with validation and test accuracy)"
    best = scored.iloc[0]
    setup = best["model"] if best["fine_tuning"] == compare.NOT_APPLICABLE else f"{best['model']} ({best['fine_tuning']})"
    test = format_metric("test_accuracy", best["test_accuracy"])
    before = format_metric("test_accuracy", best["before_test_accuracy"])
    if best["fine_tuning"] == compare.NOT_APPLICABLE:
        scores = f"test {test} (a baseline: no before-training value)"
    else:
        scores = f"test {test} after fine-tuning, " + (f"{before} before" if before else "no before-training value logged")
    flag = f" ({best['status']})" if best["status"] != "finished" else ""
    return (
        f"- best model setup: {setup}{flag}: {scores}; its trial {best['id']} has the setup's best validation "
        f"accuracy, {format_metric('validation_accuracy', best['validation_accuracy'])} (run {best['run_id']}); "
        f"{len(models)} setup{'s' if len(models) > 1 else ''} side by side in models.*"
    )


def summary_text(sweep: Sweep, trials: pd.DataFrame, rows: str, cols: str, metric: str, command: str,
                 models: pd.DataFrame | None = None) -> str:
    """`models`: the numeric models table (compare.models_table), computed when not given."""
    counts = trials["status"].value_counts()
    order = ["finished", "degenerate", "diverged", "failed", "running"]
    order += [s for s in counts.index if s not in order]
    started = f"{sweep.started:%Y-%m-%d %H:%M} UTC" if sweep.started is not None else "unknown"
    lines = [
        f"# Sweep {sweep.name}",
        "",
        f"- experiment: {sweep.experiment} (tracking URI `{sweep.tracking_uri}`)",
        f"- parent run: {sweep.run_id or 'none (--all: every run of the experiment)'}",
        f"- started: {started}; exported {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- trials: {len(trials)} (" + ", ".join(f"{int(counts.get(s, 0))} {s}" for s in order) + ")",
    ]
    best = compare.best_trial(trials)
    if best is not None:
        # A degenerate trial wins only if nothing else scored; it is flagged when it does.
        flag = f" ({best['status']})" if best["status"] != "finished" else ""
        setup = compare.setups(trials)["setup"]
        model = f" {setup[best.name]}" if setup.nunique() > 1 else ""
        before = format_metric("test_accuracy", column(trials, "metrics.before_test_accuracy")[best.name])
        lines.append(
            f"- best by validation accuracy: trial {best['id']}{model} `{best['overrides']}`{flag}: validation "
            f"{format_metric('validation_accuracy', best['metrics.validation_accuracy'])}, test "
            f"{format_metric('test_accuracy', column(trials, 'metrics.test_accuracy')[best.name]) or 'not logged'}"
            f"{f' (before fine-tuning {before})' if before else ''} (run {best['run_id']})"
        )
    else:
        lines.append("- best by validation accuracy: none (no trial logged validation_accuracy)")
    lines.append(_best_setup_line(compare.models_table(trials)[0] if models is None else models))
    lines.append(f"- pivot: {metric} by {rows} (rows) x {cols} (columns)")
    flagged = trials[trials["status"].isin(FLAGGED)]
    if len(flagged):
        lines += ["", "## Flagged trials", ""]
        for _, trial in flagged.iterrows():
            error = trial["error"] if isinstance(trial["error"], str) else ""
            line = f"- trial {trial['id']} `{trial['overrides']}`: {trial['status']}"
            lines.append(line + (f": {error}" if error else ""))
    lines += ["", f"Exported with `{command}`", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def _formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {','.join(FORMATS)}")
    return formats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sweeper.results",
        description="Export the trials of one sweep (the MLflow child runs of one parent run) as tables\n"
        "(trials, models, pivot, by_ratio, runs) in CSV, Markdown, HTML and LaTeX, with plots and a summary,\n"
        "into OUT/<sweep name>/. Values before fine-tuning sit beside those after; the models table has\n"
        "one row per model setup. Failed and degenerate trials are marked, never dropped.",
        epilog="examples:\n"
        "  python -m sweeper.results\n"
        "  python -m sweeper.results --sweep lr_ratio --rows warmup --cols lr --metric validation_accuracy\n"
        "  python -m sweeper.results --all --formats csv,md\n"
        "  python -m sweeper.results register --name NAME   # the best trial into the Model Registry",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sweep", default="latest",
                       help="'latest' (default: the newest sweep), or a sweep's parent run id or name")
    which.add_argument("--all", action="store_true", dest="all_runs",
                       help="every trial run of the experiment instead of one sweep; written to OUT/<experiment>-all/")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else %(default)s)")
    parser.add_argument("--rows", default="lr",
                        help="param for the pivot's rows, without 'params.' (default: %(default)s)")
    parser.add_argument("--cols", default="ratio", help="param for the pivot's columns (default: %(default)s)")
    parser.add_argument("--metric", default="test_accuracy",
                        help="metric in the pivot cells and the plots, without 'metrics.' (default: %(default)s)")
    parser.add_argument("--formats", type=_formats, default=list(FORMATS),
                        help=f"comma list of table formats (default: {','.join(FORMATS)})")
    parser.add_argument("--out", type=Path, default=Path("exports"),
                        help="root folder of the exports (default: %(default)s, which git ignores; "
                             "--out results for the exports committed with the project)")
    return parser


def export(args: argparse.Namespace, command: str) -> Path:
    sweep, runs = select_runs(args.tracking_uri, args.experiment, args.sweep, args.all_runs)
    trials = tidy_trials(runs)
    numeric_pivot, annotated_pivot = pivot_tables(trials, args.rows, args.cols, args.metric)
    rows, cols = numeric_pivot.index.names[-1], args.cols.removeprefix("params.")
    metric = args.metric.removeprefix("metrics.")

    out_dir = args.out / re.sub(r"[^\w.=+-]+", "_", sweep.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = args.formats
    written: list[Path] = []
    long_table = trials_table(trials)
    written += write_table(
        out_dir, "trials", _as_text(long_table), formats, f"{sweep.name}: trials", numeric=long_table
    )
    models, models_text = compare.models_table(trials)
    written += write_table(out_dir, "models", models_text, formats, f"{sweep.name}: model setups", numeric=models)
    corner = f"{rows} \\ {cols}"
    written += write_table(
        out_dir, "pivot", annotated_pivot.rename_axis(index={rows: corner}).reset_index(), formats,
        f"{sweep.name}: {metric}", numeric=_numeric_rows(numeric_pivot),
    )
    before = compare.before_metric(metric)
    if compare.logs_before(trials, metric):
        # The kinds with no before-training values (the baseline) are left out, not shown as empty.
        llm = trials[~compare.is_baseline(trials)]
        numeric_before, annotated_before = pivot_tables(
            llm, rows, cols, before, by_setup=isinstance(numeric_pivot.index, pd.MultiIndex))
        written += write_table(
            out_dir, "pivot_before", annotated_before.rename_axis(index={rows: corner}).reset_index(), formats,
            f"{sweep.name}: {before}", numeric=_numeric_rows(numeric_before),
        )
    by_ratio = compare.by_ratio_table(trials)
    if by_ratio is not None:
        written += write_table(out_dir, "by_ratio", by_ratio, formats, f"{sweep.name}: accuracy by sampling ratio")
    else:
        print("note: no 'ratio' param logged; by_ratio tables skipped", file=sys.stderr)
    written += write_table(out_dir, "runs", compare.runs_table(trials), formats, f"{sweep.name}: runs")
    for x, series, log_x in (("ratio", "lr", False), ("lr", "ratio", True)):
        path = compare.plot(trials, x, series, metric, out_dir / f"by_{x}.png", log_x,
                            f"{sweep.name}: {metric} by {x}")
        if path is not None:
            written.append(path)
    if sweep.run_id is not None:  # a search sweep (hydra/sweeper=optuna): its study's history and importances
        from sweeper.search_plots import write_search_plots

        written += write_search_plots(sweep.tracking_uri, sweep.run_id, out_dir)
    resolved = shlex.join([
        "python", "-m", "sweeper.results", "--tracking-uri", sweep.tracking_uri, "--experiment", sweep.experiment,
        *(["--all"] if sweep.run_id is None else ["--sweep", sweep.run_id]),
        "--rows", rows, "--cols", cols, "--metric", metric, "--formats", ",".join(formats), "--out", str(args.out),
    ])
    (out_dir / "command.txt").write_text(f"{command}\n# the same export, pinned to this sweep:\n{resolved}\n")
    (out_dir / "summary.md").write_text(summary_text(sweep, trials, rows, cols, metric, command, models))
    written += [out_dir / "command.txt", out_dir / "summary.md"]

    counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
    print(f"sweep {sweep.name} ({sweep.run_id or 'all runs'}): {len(trials)} trials ({counts})")
    print(f"wrote {len(written)} files to {out_dir}/:")
    print("  " + " ".join(p.name for p in written))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["register"]:  # python -m sweeper.results register ...: sweeper/register.py
        from sweeper.register import main as register

        return register(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        export(args, shlex.join(["python", "-m", "sweeper.results", *argv]))
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
