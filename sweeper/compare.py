"""Trials side by side: which model setup each trial is, before versus after fine-tuning, and the
tables and plots that compare them (the models table, the reference study's two shapes, by_*.png).

A model setup is `model.name`, plus for an LLM `finetune.method` (and the LoRA rank or the number
of top layers when those vary within the method). The TF-IDF + logistic-regression baseline
(`model.kind=tfidf_logreg`) is a setup of its own: it has no before-training values and none of
the LLM's keys (lr, warmup, optim.*, ...) apply to it. Used by sweeper/results.py, which writes
the files; the values' formatting lives here too, so that both modules read numbers one way.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import pandas as pd

# Worst first: the order in which a trial's problems are reported.
FLAGGED = ("failed", "diverged", "degenerate", "running")

# Trial kinds that are not fine-tuned LLMs: no before-training metrics, no LLM keys.
BASELINE_KINDS = ("tfidf_logreg",)
# Params of the LLM trial kind only (the baseline logs their defaults, which mean nothing there) ...
LLM_ONLY_KEYS = ("lr", "warmup")
LLM_ONLY_GROUPS = ("optim.", "train.", "finetune.", "model.")
# ... except these, which every kind has.
EVERY_KIND = ("model.name", "model.kind")
NOT_APPLICABLE = "—"  # a models-table cell that has no meaning for the kind: the baseline's fine-tuning and before


def column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs.columns else pd.Series(float("nan"), index=runs.index)


# ---------------------------------------------------------------- how values read


def is_fraction(metric: str) -> bool:
    """Metrics in [0, 1] that read best as percentages."""
    return metric == "accuracy" or metric.endswith(("_accuracy", "_f1_macro", "_invalid_rate", "_majority_share"))


def missing(value) -> bool:
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def format_number(value) -> str:
    if missing(value):
        return ""
    if isinstance(value, numbers.Real):
        if float(value).is_integer() and abs(value) < 1e15:
            return f"{int(value):,}" if abs(value) >= 10_000 else f"{int(value)}"
        return f"{value:,.2f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def format_metric(metric: str, value) -> str:
    if missing(value):
        return ""
    return f"{value:.2%}" if is_fraction(metric) else format_number(value)


def label(value) -> str:
    """An axis value as it reads in a header: 0.0002, 2e-05, 0.9, 184, tiny."""
    if isinstance(value, numbers.Real):
        return "(unset)" if math.isnan(value) else format(value, ".10g")
    return str(value)


def compact(count: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.2f}{suffix}"
    return f"{count:.0f}"


# ---------------------------------------------------------------- trial kinds and model setups


def is_baseline(trials: pd.DataFrame) -> pd.Series:
    """True for the trials of a baseline kind (by `model.kind`, else by `model.name`)."""
    kind = column(trials, "params.model.kind").astype(object).fillna(column(trials, "params.model.name"))
    return kind.isin(BASELINE_KINDS)


def blank_inapplicable(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials with the params that don't apply to their kind blanked: the LLM's keys on a
    baseline trial (its logged lr would otherwise join an LLM's lr row), `baseline.*` on an LLM's."""
    trials = trials.copy()
    baseline = is_baseline(trials)
    for name in [c for c in trials.columns if c.startswith("params.")]:
        key = name[len("params."):]
        if (key in LLM_ONLY_KEYS or key.startswith(LLM_ONLY_GROUPS)) and key not in EVERY_KIND:
            trials.loc[baseline, name] = None
        elif key.startswith("baseline."):
            trials.loc[~baseline, name] = None
    return trials


def setups(trials: pd.DataFrame) -> pd.DataFrame:
    """Each trial's `model` (name), `fine_tuning` (method and what varies within it) and `setup`
    (both in one label, e.g. "smollm2_135m (lora, rank 8)")."""
    models = pd.Series([label(v) for v in column(trials, "params.model.name")], index=trials.index)
    baseline = is_baseline(trials)
    # Runs from before finetune.method existed fine-tuned every weight.
    methods = column(trials, "params.finetune.method").astype(object).fillna("full")
    ranks = column(trials, "params.finetune.rank")
    layers = column(trials, "params.finetune.layers")
    checkpoint = column(trials, "params.model.checkpoint")
    siblings = [models, methods]

    def varies(values: pd.Series) -> pd.Series:
        return values.groupby(siblings).transform("nunique") > 1

    rank_varies, layers_varies = varies(ranks), varies(layers)
    fine_tuning = []
    for i, method in enumerate(methods):
        text = str(method)
        if method == "lora" and rank_varies.iloc[i]:
            text += f", rank {label(ranks.iloc[i])}"
        elif method == "top_layers" and layers_varies.iloc[i]:
            text += f", {label(layers.iloc[i])} layers"
        if "params.model.checkpoint" in trials.columns and checkpoint.iloc[i] in ("None", ""):
            text += ", random init"
        fine_tuning.append(NOT_APPLICABLE if baseline.iloc[i] else text)
    return pd.DataFrame({
        "model": models,
        "fine_tuning": fine_tuning,
        "setup": [m if f == NOT_APPLICABLE else f"{m} ({f})" for m, f in zip(models, fine_tuning)],
    }, index=trials.index)


def before_metric(metric: str) -> str:
    """The name of a metric's before-training value, as the trainer logs it."""
    return f"before_{metric}"


def logs_before(trials: pd.DataFrame, metric: str) -> bool:
    """Whether any trial logged the before-training value of `metric`."""
    return column(trials, f"metrics.{before_metric(metric)}").notna().any()


def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The trial with the highest validation accuracy, never one that failed; a flagged (degenerate,
    diverged, running) trial only when no finished one has a value. None when none has one."""
    if "metrics.validation_accuracy" not in trials.columns:
        return None
    candidates = trials[trials["status"] != "failed"].dropna(subset=["metrics.validation_accuracy"])
    if candidates.empty:
        return None
    ranked = candidates.assign(_flag=candidates["status"] != "finished").sort_values(
        ["_flag", "metrics.validation_accuracy"], ascending=[True, False], kind="stable")
    return ranked.iloc[0]


# ---------------------------------------------------------------- the models table


def _count_note(group: pd.DataFrame) -> str:
    counts = [f"{int((group['status'] == s).sum())} {s}" for s in FLAGGED if (group["status"] == s).any()]
    return f"{len(group)}" + (f" ({', '.join(counts)})" if counts else "")


def models_table(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per model setup: its trial with the best validation accuracy (`best_trial`), that
    trial's test accuracy after and before fine-tuning; sorted by that test accuracy, best first.
    Numeric (for the CSV) and formatted for reading."""
    setup = setups(trials)
    baseline = is_baseline(trials)
    rows, text = [], []
    for (model, fine_tuning), group in trials.groupby([setup["model"], setup["fine_tuning"]], sort=False):
        best = best_trial(group)
        no_before = bool(baseline[group.index].all())
        test, before, validation = (
            float("nan") if best is None else column(group, f"metrics.{name}")[best.name]
            for name in ("test_accuracy", "before_test_accuracy", "validation_accuracy")
        )
        before = float("nan") if no_before else before
        rows.append({
            "model": model, "fine_tuning": fine_tuning, "trials": len(group),
            "test_accuracy": test, "before_test_accuracy": before, "validation_accuracy": validation,
            "id": None if best is None else best["id"], "run_id": None if best is None else best["run_id"],
            "status": None if best is None else best["status"],
        })
        flag = f" ({best['status']})" if best is not None and best["status"] != "finished" else ""
        text.append({
            "Model": model, "Fine-tuning": fine_tuning, "Trials": _count_note(group),
            "Test accuracy": format_metric("test_accuracy", test) + flag,
            "Before fine-tuning": NOT_APPLICABLE if no_before else format_metric("test_accuracy", before),
            "Validation accuracy": format_metric("validation_accuracy", validation),
            "Trial": "" if best is None else label(best["id"]), "Run id": "" if best is None else best["run_id"],
        })
    numeric = pd.DataFrame(rows).astype({"id": "Int64"})
    order = numeric.sort_values("test_accuracy", ascending=False, na_position="last", kind="stable").index
    return numeric.loc[order].reset_index(drop=True), pd.DataFrame(text).loc[order].reset_index(drop=True)


# ---------------------------------------------------------------- the reference study's shapes


def by_ratio_table(trials: pd.DataFrame) -> pd.DataFrame | None:
    """The reference study's `Sampling ratio | Training data size | Accuracy`, one row per trial;
    `Before` (fine-tuning) beside `Accuracy` when the trials logged it, `Model` first when the
    trials are of several model setups."""
    if "params.ratio" not in trials.columns:
        return None
    setup = setups(trials)["setup"]
    lrs = column(trials, "params.lr")
    seeds = column(trials, "params.seed")
    # Setups in the trials' order (by model, then fine-tuning method and rank).
    setup_order = setup.map({name: i for i, name in enumerate(setup.unique())})
    ordered = trials.assign(_setup=setup, _order=setup_order, _lr=lrs, _seed=seeds).sort_values(
        ["_order", "_lr", "params.ratio", "_seed", "id"], kind="stable")
    table = pd.DataFrame(index=ordered.index)
    if setup.nunique() > 1:
        table["Model"] = ordered["_setup"]
    if lrs.nunique() > 1:
        table["LR"] = [label(v) for v in ordered["_lr"]]
    if seeds.nunique() > 1:
        table["Seed"] = [label(v) for v in ordered["_seed"]]
    table["Sampling ratio"] = [
        "" if missing(v) else f"{v * 100:g}%" if isinstance(v, numbers.Real) else str(v)
        for v in ordered["params.ratio"]
    ]
    table["Training data size"] = [format_number(v) for v in column(ordered, "metrics.train_examples")]
    table["Accuracy"] = [format_metric("test_accuracy", v) for v in column(ordered, "metrics.test_accuracy")]
    if logs_before(trials, "test_accuracy"):
        table["Before"] = [format_metric("test_accuracy", v) for v in ordered["metrics.before_test_accuracy"]]
    table["Status"] = ordered["status"]
    return table.replace("(unset)", "").reset_index(drop=True)


def runs_table(trials: pd.DataFrame) -> pd.DataFrame:
    """The reference study's `ID | LR | params | b1 | b2 | warmup steps | weight decay | tokens | accuracy`;
    `before` beside `accuracy` when logged, `model` after `ID` when the trials are of several setups."""
    names = column(trials, "params.model.name")
    logged_param = pd.to_numeric(column(trials, "params.model_params"), errors="coerce")
    size = column(trials, "metrics.model_params").fillna(logged_param)
    # A trial that failed before counting its parameters has the same model as its siblings.
    size = size.fillna(size.groupby(names).transform("max"))
    table = pd.DataFrame({"ID": trials["id"]})
    setup = setups(trials)["setup"]
    if setup.nunique() > 1:
        table["model"] = setup
    table["LR"] = [label(v) for v in column(trials, "params.lr")]
    table["params"] = [compact(n) if pd.notna(n) else label(name) for n, name in zip(size, names)]
    for header, key in (("b1", "optim.b1"), ("b2", "optim.b2"), ("warmup steps", "warmup"),
                        ("weight decay", "optim.weight_decay")):
        table[header] = [label(v) for v in column(trials, f"params.{key}")]
    table["tokens"] = [format_number(v) for v in column(trials, "metrics.train_tokens")]
    table["accuracy"] = [format_metric("test_accuracy", v) for v in column(trials, "metrics.test_accuracy")]
    if logs_before(trials, "test_accuracy"):
        table["before"] = [format_metric("test_accuracy", v) for v in trials["metrics.before_test_accuracy"]]
    table["status"] = trials["status"]
    return table.replace("(unset)", "")


# ---------------------------------------------------------------- plots


AXIS_NAMES = {"lr": "learning rate (lr)", "ratio": "training-data sampling ratio (ratio)",
              "warmup": "warmup steps (warmup)", "test_accuracy": "test accuracy",
              "validation_accuracy": "validation accuracy"}


def plot(trials: pd.DataFrame, x: str, series: str, metric: str, path: Path, log_x: bool, title: str) -> Path | None:
    """`metric` against param `x`, one line per value of `series` (and model setup, when several);
    the before-training value dashed in the line's colour; flagged trials with their own marker;
    a setup that has no `x` (the baseline has no lr) as a flat dash-dot line at its mean."""
    x_col, series_col, metric_col = f"params.{x}", f"params.{series}", f"metrics.{metric}"
    before_col = f"metrics.{before_metric(metric)}"
    if x_col not in trials.columns or metric_col not in trials.columns:
        return None
    if not pd.api.types.is_numeric_dtype(trials[x_col]):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    setup = setups(trials)["setup"]
    several = setup.nunique() > 1
    data = trials.assign(_setup=setup, _order=setup.map({name: i for i, name in enumerate(setup.unique())}),
                         _series=column(trials, series_col), _before=column(trials, before_col))
    data["_placed"] = data[x_col].notna() & (data[x_col] > 0 if log_x else True)
    fig, ax = plt.subplots(figsize=(9.6 if several else 6.4, 4.2))
    scored = data[data["status"] != "failed"]
    colors = iter(f"C{i % 10}" for i in range(1000))
    drew_before = False
    # Setups in the trials' order; a setup without `x` (no lr: the baseline) drawn flat, last.
    for (flat, _, value), group in scored.assign(_flat=~scored["_placed"]).groupby(
            ["_flat", "_order", "_series"], dropna=False):
        setup_label = group["_setup"].iloc[0]
        name = f"{series}={label(value)}"
        name = (setup_label if missing(value) else f"{setup_label}, {name}") if several else name
        if flat:
            mean = group[metric_col].mean()
            if not missing(mean):
                ax.axhline(mean, linestyle="-.", linewidth=1.2, color=next(colors), label=f"{name} (no {x})")
            continue
        color = next(colors)
        means = group.groupby(x_col)[metric_col].mean().dropna()
        ax.plot(means.index, means.values, marker="o", color=color, label=name)
        for x_value, y_value in means.items():  # the value at each point, not only the line
            ax.annotate(f"{y_value:.1%}" if is_fraction(metric) else f"{y_value:.3g}", (x_value, y_value),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color=color)
        before = group.groupby(x_col)["_before"].mean().dropna()
        if len(before):
            ax.plot(before.index, before.values, linestyle="--", marker="o", markerfacecolor="none", color=color)
            drew_before = True
    if drew_before:
        ax.plot([], [], linestyle="--", marker="o", markerfacecolor="none", color="gray",
                label="dashed: before fine-tuning")
    markers = {"degenerate": ("X", "tab:red"), "diverged": ("s", "tab:orange")}
    for status, (marker, color) in markers.items():
        flagged = scored[scored["_placed"] & (scored["status"] == status) & scored[metric_col].notna()]
        if len(flagged):
            ax.scatter(flagged[x_col], flagged[metric_col], marker=marker, s=90, color=color, zorder=3, label=status)
    if is_fraction(metric):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if metric.endswith("accuracy"):
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="50%: one class for all")
    failed = data[data["_placed"] & (data["status"] == "failed")]
    if len(failed):
        # Failed trials have no value: mark where they sat on the x axis, along the bottom edge.
        bottom = ax.get_ylim()[0]
        ax.scatter(failed[x_col], [bottom] * len(failed), marker="v", s=70, color="black", clip_on=False,
                   zorder=3, label="failed")
    if log_x:
        ax.set_xscale("log")
        # Ticks at the swept values, written as typed (2e-04), instead of colliding log-scale labels.
        ticks = sorted(v for v in data.loc[data["_placed"], x_col].dropna().unique())
        if 0 < len(ticks) <= 12:
            from matplotlib.ticker import FixedLocator, NullLocator

            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel(AXIS_NAMES.get(x, x))
    ax.set_ylabel(AXIS_NAMES.get(metric, metric.replace("_", " ")))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if several:  # many series: the legend goes beside the axes, not over the lines
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
