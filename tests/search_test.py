"""`hydra/sweeper=optuna`: search spaces, the study's bookkeeping, and whole searches end to end.

The end-to-end searches are the real command in a subprocess on the tiny model, a few steps a
trial, against a temporary SQLite store; the study is read back from its journal file.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from sweeper.search_space import SearchSpaceError, override_value, overrides_for, parse
from sweeper.study import SearchConfigError, Settings, counted, retire, running, trials_to_run

# MLflow's own SQLAlchemy models warn on import (mlflow 3.17, SQLAlchemy 2); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
SHORT = ["train.total_steps=4", "eval.max_examples=16", "eval.before_training=false", "tracking.flush_every=2"]
SEARCHES = sorted(p.stem for p in (REPO / "conf/sweep").glob("*.yaml") if "/hydra/sweeper: optuna" in p.read_text())


# ---------------------------------------------------------------- search spaces


def test_space_from_hydra_override_syntax():
    space = parse(
        {"lr": "tag(log,interval(1e-5,1e-2))", "warmup": "range(0,400,50)"},
        ["ratio=choice(0.5,0.7,0.9,1.0)", "train.total_steps=4", "finetune=lora,full"],
    )
    assert space.distributions == {
        "lr": FloatDistribution(1e-5, 1e-2, log=True),
        "warmup": IntDistribution(0, 350, step=50),  # range() excludes its stop, as in Python
        "ratio": CategoricalDistribution([0.5, 0.7, 0.9, 1.0]),
        "finetune": CategoricalDistribution(["lora", "full"]),  # a config group, as Hydra's a,b list
    }
    assert space.fixed == ["train.total_steps=4"]
    assert space.grid["warmup"] == [0, 50, 100, 150, 200, 250, 300, 350]
    with pytest.raises(SearchSpaceError, match="lr is a continuous interval"):
        space.grid_values()
    assert parse({"lr": "interval(1e-4,1e-2)"}, ["lr=1e-3"]).distributions == {}  # the command line wins


def test_sampled_values_reach_the_trial_exactly():
    parser = OverridesParser.create()
    for value in (1.2345678901234567e-05, 0.1 + 0.2, 350, 0.0, True, None, "lora", "two words", "1e-3"):
        parsed = parser.parse_override(f"key={override_value(value)}").value()
        assert parsed == value and type(parsed) is type(value), (value, override_value(value), parsed)
    space = parse({}, ["train.total_steps=4", "lr=interval(0.1,1.0)", "ratio=choice(0.5,1.0)"])
    assert overrides_for(space, {"ratio": 0.5, "lr": 0.25}) == ["train.total_steps=4", "lr=0.25", "ratio=0.5"]


@pytest.mark.parametrize("line, expected", [
    ("lr=interval(1e-5)", r"'lr=interval\(1e-5\)' is not a valid search space.*Write e\.g\. lr=tag\(log,interval"),
    ("lr=interval(1e-2,1e-5)", r"lr=interval\(1e-2,1e-5\): interval\(low,high\) needs finite low < high"),
    ("lr=tag(log,interval(0,1e-2))", r"a log scale needs low > 0"),
    ("lr=tag(logg,interval(1e-5,1e-2))", r"unknown tag logg; the search understands tag\(log"),
    ("warmup=range(400,0,50)", r"warmup=range\(400,0,50\) is empty or runs backwards"),
    ("ratio=choice([0.5],[1.0])", r"choice\(\) needs plain values"),
])
def test_bad_space_names_the_value_and_the_fix(line, expected):
    with pytest.raises(SearchSpaceError, match=expected):
        parse({}, [line])


def settings_error(config: dict, **settings) -> str:
    from omegaconf import OmegaConf

    base = {"eval": {"every_steps": 0}, "hydra": {"launcher": {"_target_": "hydra._internal.BasicLauncher"}}}
    with pytest.raises(SearchConfigError) as caught:
        Settings(**settings).check(OmegaConf.merge(base, config))
    return str(caught.value)


def test_bad_settings_name_the_value_and_the_fix():
    assert "hydra.sweeper.sampler='bayes' is not a sampler: expected tpe, random, grid" in settings_error({}, sampler="bayes")
    assert "hydra.sweeper.pruner='early' is not a pruner" in settings_error({}, pruner="early")
    assert "use hydra.sweeper.objective=validation_accuracy" in settings_error({}, objective="test_accuracy")
    assert "set eval.every_steps, e.g. eval.every_steps=20" in settings_error({}, pruner="median")
    vectorized = {"eval": {"every_steps": 5}, "hydra": {"launcher": {"_target_": "x.vectorized_launcher.VectorizedLauncher"}}}
    assert "vectorized launcher" in settings_error(vectorized, pruner="median")
    assert "n_trials=0 must be > 0" in settings_error({}, n_trials=0)


# ---------------------------------------------------------------- the study's bookkeeping


def test_an_interrupted_trial_fails_uncounted_and_runs_again():
    study = optuna.create_study(direction="maximize")
    space = parse({}, ["lr=interval(0.1,1.0)"])
    done = study.ask(space.distributions)
    study.tell(done, 0.5)
    cut = study.ask(space.distributions)
    assert [t.number for t in running(study)] == [cut.number]
    retire(study, cut, "the sweep stopped while it ran")

    frozen = study.trials[cut.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["interrupted"]
    assert counted(study) == 1  # the cut trial does not count towards n_trials ...
    assert trials_to_run(study, Settings(n_trials=3), space) == 2
    again = study.ask(space.distributions)  # ... and its params are asked next
    assert again.params == cut.params and again.number == cut.number + 1


def test_a_grid_runs_each_point_once_whatever_n_trials_says():
    space = parse({}, ["warmup=range(0,3,1)", "ratio=choice(0.5,1.0)"])
    study = optuna.create_study()
    assert trials_to_run(study, Settings(n_trials=100, sampler="grid"), space) == 6


# ---------------------------------------------------------------- whole searches


def run_sweeper(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-3000:]}"


def store_args(folder: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{folder}/mlflow.db", f"hydra.sweep.dir={folder}/sweep"]


def search_runs(folder: Path):
    """(client, parents newest first, {parent run id: its children})."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("rotten_tomatoes")
    runs = client.search_runs([experiment.experiment_id], max_results=1000, order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("sweeper.kind") == "sweep"]
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents}
    return client, parents, children


def the_study(folder: Path, parent) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    assert parent.data.tags["search.storage"] == str(folder / "optuna.journal")  # beside the store
    storage = JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))
    return optuna.load_study(study_name=parent.data.tags["search.study"], storage=storage)


@pytest.mark.slow
def test_search_grows_the_study_to_n_trials_and_a_rerun_continues_it(sweeper_env, tmp_path):
    # conf/sweep/search_cpu.yaml (lr, warmup, ratio; TPE; median pruner), cut to 4 steps a trial
    # with one validation report at step 2, where the pruner may stop a trial.
    args = ["-m", "sweep=search_cpu", "hydra.sweeper.tpe_startup_trials=3", *SHORT, "eval.every_steps=2",
            "hydra.sweeper.pruner_startup_trials=2", "hydra.sweeper.pruner_warmup_steps=0", *store_args(tmp_path)]
    first = run_sweeper(sweeper_env, *args, "hydra.sweeper.n_trials=6")
    assert first.returncode == 0, explain(first)
    client, parents, children = search_runs(tmp_path)
    assert len(parents) == 1
    parent, runs = parents[0], children[parents[0].info.run_id]
    assert len(runs) == 6
    study = the_study(tmp_path, parent)
    assert len(study.trials) == 6
    by_run = {t.user_attrs["run_id"]: t for t in study.trials}
    assert set(by_run) == {r.info.run_id for r in runs}  # each study trial is one child run
    for run in runs:
        trial, status = by_run[run.info.run_id], run.data.tags["sweeper.status"]
        assert run.info.status == "FINISHED" and status in ("finished", "pruned"), explain(first)
        assert trial.state == {"finished": TrialState.COMPLETE, "pruned": TrialState.PRUNED}[status]
        assert run.data.tags["search.trial"] == str(trial.number)
        # The run is named by the searched keys only, with the values the study suggested.
        assert run.data.tags["sweeper.overrides"] == (
            f"lr={trial.params['lr']!r},warmup={trial.params['warmup']},ratio={trial.params['ratio']}")
        assert run.info.run_name.startswith(f"#{run.data.tags['sweeper.trial']} lr=")
        assert float(run.data.params["lr"]) == trial.params["lr"]
        if status == "finished":
            assert trial.value == run.data.metrics["validation_accuracy"]
        else:  # stopped at its only report (step 2 of 4); the curve up to it is kept
            assert trial.intermediate_values.keys() == {2} and run.data.metrics["steps"] == 2
            assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    best = study.best_trial
    assert parent.data.metrics["study_best_validation_accuracy"] == best.value
    assert parent.data.params["best.lr"] == str(best.params["lr"])
    assert parent.data.tags["search.best_run_id"] == best.user_attrs["run_id"]
    pruned = sum(r.data.tags["sweeper.status"] == "pruned" for r in runs)
    assert f"6 trials: {6 - pruned} finished, 0 failed" in first.stdout, explain(first)

    again = run_sweeper(sweeper_env, *args, "hydra.sweeper.n_trials=8")
    assert again.returncode == 0, explain(again)
    assert "holds 6 trial(s); asking 2 more" in again.stdout, explain(again)
    _, parents, children = search_runs(tmp_path)
    assert len(parents) == 2 and len(children[parents[0].info.run_id]) == 2
    study = the_study(tmp_path, parents[0])
    assert len(study.trials) == 8 and parents[0].data.tags["search.study"] == parent.data.tags["search.study"]
    assert sorted(r.data.tags["search.trial"] for r in children[parents[0].info.run_id]) == ["6", "7"]

    from sweeper.results import main as export

    # The first sweep: its first 2 trials finished (the pruner's startup), so it has test accuracies to tabulate.
    assert export(["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--sweep", parent.info.run_id,
                   "--out", str(tmp_path / "results")]) == 0
    written = {p.name for p in (tmp_path / "results").glob("*/*.png")}
    assert {"optimization_history.png", "param_importances.png"} <= written


@pytest.mark.slow
def test_a_failing_trial_is_failed_in_the_study_and_the_search_goes_on(sweeper_env, tmp_path):
    # warmup=-1 fails validation: the job records a FAILED run and returns NaN.
    result = run_sweeper(sweeper_env, "-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid",
                         "warmup=choice(-1,0,2)", *SHORT, *store_args(tmp_path))
    assert result.returncode == 1, explain(result)  # a failed trial makes the sweep's exit status 1
    assert "3 trials: 2 finished, 1 failed" in result.stdout, explain(result)
    _, parents, children = search_runs(tmp_path)
    runs = children[parents[0].info.run_id]
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert "warmup=-1 must be >= 0" in failed.data.tags["sweeper.error"]
    study = the_study(tmp_path, parents[0])
    states = {t.params["warmup"]: t.state for t in study.trials}
    assert states == {-1: TrialState.FAIL, 0: TrialState.COMPLETE, 2: TrialState.COMPLETE}
    assert all(math.isfinite(t.value) for t in study.trials if t.state == TrialState.COMPLETE)


@pytest.mark.slow
def test_a_trial_at_chance_is_pruned_and_keeps_its_curve(sweeper_env, tmp_path):
    # lr=0 never moves from the random init: its validation accuracy stays at chance; lr=2e-3
    # runs first (enqueued) and is above chance by step 10, so the median pruner stops lr=0 there.
    result = run_sweeper(
        sweeper_env, "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler=random",
        "hydra.sweeper.pruner=median", "hydra.sweeper.pruner_startup_trials=1",
        "hydra.sweeper.enqueue=[{lr:0.002},{lr:0.0}]", "lr=choice(0.002,0.0)",
        "train.total_steps=30", "eval.every_steps=10", "eval.max_examples=16", "eval.before_training=false",
        *store_args(tmp_path),
    )
    assert result.returncode == 0, explain(result)
    assert "2 trials: 1 finished, 0 failed, 0 diverged, 0 skipped, 1 pruned" in result.stdout, explain(result)
    client, parents, children = search_runs(tmp_path)
    runs = {r.data.tags["sweeper.overrides"]: r for r in children[parents[0].info.run_id]}
    chance, learner = runs["lr=0.0"], runs["lr=0.002"]
    assert chance.data.tags["sweeper.status"] == "pruned" and chance.info.status == "FINISHED"
    assert chance.data.tags["sweeper.message"].startswith("pruned at step 10: validation accuracy")
    assert [m.step for m in client.get_metric_history(chance.info.run_id, "loss")] == list(range(1, 11))
    assert "validation_accuracy" not in chance.data.metrics  # stopped before the final evaluation
    curve = {m.step: m.value for m in client.get_metric_history(learner.info.run_id, "periodic_validation_accuracy")}
    at_chance = client.get_metric_history(chance.info.run_id, "periodic_validation_accuracy")
    assert sorted(curve) == [10, 20] and [m.step for m in at_chance] == [10]
    assert abs(at_chance[0].value - 0.5) < 0.05 < curve[10] - at_chance[0].value
    assert parents[0].data.metrics["trials_pruned"] == 1
    study = the_study(tmp_path, parents[0])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert study.trials[1].intermediate_values == {10: at_chance[0].value}


@pytest.mark.parametrize("sweep", SEARCHES)
def test_every_search_sweep_previews_its_space_and_creates_nothing(sweep, tmp_path):
    result = run_sweeper(os.environ | {"PYTHONPATH": str(REPO)}, "-m", f"sweep={sweep}", "preview=true", *store_args(tmp_path))
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("search of ") and "(preview: nothing is trained" in lines[0], result.stdout
    assert "0 trial(s) so far" in lines[1]
    params = yaml.safe_load((REPO / "conf/sweep" / f"{sweep}.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert [line.split(":")[0].strip() for line in lines[-len(params):]] == list(params)
    assert list(tmp_path.iterdir()) == []  # no store, no sweep folder, no journal


@pytest.mark.slow
def test_an_unknown_sampler_stops_before_any_run(sweeper_env, tmp_path):
    result = run_sweeper(sweeper_env, "-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=bayes",
                         "lr=interval(1e-4,1e-2)", *SHORT, *store_args(tmp_path))
    assert result.returncode == 2, explain(result)
    assert "error: hydra.sweeper.sampler='bayes' is not a sampler: expected tpe, random, grid" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() or not search_runs(tmp_path)[1]


@pytest.mark.slow
def test_a_search_killed_mid_trial_reruns_that_trial_when_continued(sweeper_env, tmp_path):
    name = ["hydra.sweeper.study_name=killed", "hydra.sweeper.n_trials=2", "lr=tag(log,interval(1e-4,1e-2))"]
    process = subprocess.Popen(
        [sys.executable, "-m", "sweeper", "-m", "hydra/sweeper=optuna", *name, "train.total_steps=100000",
         "eval.before_training=false", *store_args(tmp_path)],
        cwd=REPO, env=sweeper_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        for line in process.stdout:  # the study has asked for trial 1 once the job announces it
            lines.append(line)
            if line.startswith("trial 1 of 2:"):
                break
        time.sleep(2.0)
        process.send_signal(signal.SIGKILL)  # no cleanup runs: the study keeps a RUNNING trial
    finally:
        process.kill()
        process.wait(timeout=30)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.RUNNING], "".join(lines[-20:])
    cut = study.trials[0].params

    result = run_sweeper(sweeper_env, "-m", "hydra/sweeper=optuna", *name, *SHORT, *store_args(tmp_path))
    assert result.returncode == 0, explain(result)
    assert "holds 0 trial(s); asking 2 more" in result.stdout, explain(result)
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[0].user_attrs["interrupted"] and study.trials[1].params == cut
