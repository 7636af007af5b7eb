"""Register a sweep's best trial in the MLflow Model Registry, and say how to load and serve it.

    python -m sweeper.results register --name rotten-tomatoes-sentiment
    python -m sweeper.results register --sweep quick_cpu --metric validation_accuracy --name rt-tiny

The best trial is the finished (not failed, diverged or degenerate) trial of the sweep with the
highest --metric (the earlier one among equals). It must have an MLflow model (`runs:/<run
id>/model`): the sweeper logs one for the trial with the best validation accuracy
(train.save_model=best, the default) or for every trial (train.save_model=all). The new model
version carries the sweep, the trial's params and its metrics as tags.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

import pandas as pd

from sweeper import selection

# Tags of the model version besides the swept keys: what tells trials and model setups apart.
TAGGED_PARAMS = tuple(dict.fromkeys(selection.TRIAL_PARAMS + selection.SETUP_PARAMS + ("train.total_steps",)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sweeper.results register",
        description="Register the best trial of a sweep (its MLflow model, runs:/<run id>/model) in the Model "
        "Registry as a new version of NAME, tagged with the sweep, the trial's params and metrics.",
        epilog="example:\n  python -m sweeper.results register --sweep quick_cpu --name rotten-tomatoes-sentiment",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True, help="the registered model's name (created if new)")
    parser.add_argument("--sweep", default="latest",
                        help="'latest' (default: the newest sweep), or a sweep's parent run id or name")
    parser.add_argument("--metric", default="validation_accuracy",
                        help="the metric that picks the best trial, highest wins (default: %(default)s)")
    parser.add_argument("--experiment", default=selection.DEFAULT_EXPERIMENT,
                        help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or selection.DEFAULT_TRACKING_URI,
                        help="MLflow store, also the registry (default: $MLFLOW_TRACKING_URI, else %(default)s)")
    return parser


def best_trial(trials: pd.DataFrame, metric: str) -> pd.Series:
    """The finished trial with the highest metric; the earliest among equals."""
    column = f"metrics.{metric.removeprefix('metrics.')}"
    if column not in trials.columns:
        logged = sorted(c.removeprefix("metrics.") for c in trials.columns if c.startswith("metrics."))
        raise selection.ResultsError(f"--metric {metric!r} is not logged by these trials; metrics logged: "
                                   f"{', '.join(logged) or 'none'}")
    eligible = trials[(trials["status"] == "finished") & trials[column].notna()]
    if eligible.empty:
        counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
        raise selection.ResultsError(f"no finished trial of this sweep has {metric} ({counts}); nothing to register")
    return eligible.sort_values([column, "start_time"], ascending=[False, True], kind="stable").iloc[0]


def version_tags(sweep: selection.Sweep, trial: pd.Series, trials: pd.DataFrame, metric: str) -> dict[str, str]:
    swept = selection.override_keys(trials["overrides"])
    tags = {
        "sweep": sweep.name,
        "sweep_run_id": str(sweep.run_id),
        "experiment": sweep.experiment,
        "run_id": trial["run_id"],
        "trial": str(trial["overrides"]),
        "selected_by": f"highest {metric} of {len(trials)} trials",
    }
    for key in dict.fromkeys(swept + list(TAGGED_PARAMS)):
        value = trial.get(f"params.{key}")
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            tags[f"param.{key}"] = str(value)
    for name in [c for c in trials.columns if c.startswith("metrics.")]:
        value = trial.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            tags[f"metric.{name.removeprefix('metrics.')}"] = f"{value:.6g}"
    return tags


def register(args: argparse.Namespace):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from sweeper.mlflow_model import MODEL_NAME, logged_model

    sweep, runs = selection.select_runs(args.tracking_uri, args.experiment, args.sweep, all_runs=False)
    trials = selection.tidy_trials(runs)
    metric = args.metric.removeprefix("metrics.")
    trial = best_trial(trials, metric)
    client = MlflowClient(tracking_uri=args.tracking_uri, registry_uri=args.tracking_uri)
    model = logged_model(client, trial["run_id"])
    if model is None:
        raise selection.ResultsError(
            f"the best trial by {metric}, {trial['overrides']} (run {trial['run_id']}), has no MLflow model: it ran "
            f"with train.save_model=none, or train.save_model=best kept another trial's (the best by "
            f"validation_accuracy); rerun the sweep with train.save_model=all, or pick --metric validation_accuracy"
        )
    try:
        client.get_registered_model(args.name)
    except MlflowException:  # a new name
        client.create_registered_model(args.name, description="Rotten Tomatoes sentiment: review text in, label "
                                       "and score out (a LLaMA fine-tuned by llm-sweeper)")
    version = client.create_model_version(
        args.name, source=model.model_uri, run_id=trial["run_id"], model_id=model.model_id,
        tags=version_tags(sweep, trial, trials, metric),
        description=f"{trial['overrides']} of sweep {sweep.name}: {metric} {trial[f'metrics.{metric}']:.4f}",
    )
    return sweep, trial, version, f"runs:/{trial['run_id']}/{MODEL_NAME}"


def _absolute(uri: str) -> str:
    """A relative SQLite URI made absolute, so the printed commands work from any directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def how_to_use(name: str, version: str, tracking_uri: str, port: int = 5001) -> str:
    uri = f"models:/{name}/{version}"
    env = f"MLFLOW_TRACKING_URI={shlex.quote(_absolute(tracking_uri))}"
    load = f'import mlflow; print(mlflow.pyfunc.load_model("{uri}").predict({{"text": ["a gorgeous film"]}}))'
    body = '{"inputs": {"text": ["a gorgeous film", "a dull mess"]}}'
    return "\n".join([
        f"  load:  {env} python -c {shlex.quote(load)}",
        f"  serve: {env} mlflow models serve -m {uri} --env-manager local --host 127.0.0.1 --port {port}",
        f"  query: curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' -d '{body}'",
    ])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sweep, trial, version, run_uri = register(args)
    except selection.ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metric = args.metric.removeprefix("metrics.")
    print(f"registered {args.name} version {version.version}: trial {trial['overrides']} of sweep {sweep.name} "
          f"({metric} {trial[f'metrics.{metric}']:.4f}), {run_uri}")
    print(how_to_use(args.name, version.version, args.tracking_uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
