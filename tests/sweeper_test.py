"""`python -m sweeper -m ...` end to end, against a temporary SQLite store.

Each sweep is the real command in a subprocess, on the tiny model with a few steps; the
assertions read the store back through MlflowClient.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# MLflow's own SQLAlchemy models warn on import (mlflow 3.17, SQLAlchemy 2); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.total_steps=4", "eval.max_examples=16", "eval.before_training=false", "tracking.flush_every=2"]




def run_sweeper(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def store_args(folder: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{folder}/mlflow.db", f"hydra.sweep.dir={folder}/sweep", f"hydra.run.dir={folder}/run"]


def read_runs(folder: Path):
    """(parents, children) of the experiment, as MLflow Run objects."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("rotten_tomatoes")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def quick_sweep(sweeper_env, tmp_path_factory):
    """conf/sweep/quick_cpu.yaml (2 lr x 2 ratio), cut to 4 steps, run once for the module."""
    folder = tmp_path_factory.mktemp("quick_sweep")
    args = ["-m", "sweep=quick_cpu", *TINY, *store_args(folder)]
    result = run_sweeper(sweeper_env, *args)
    assert result.returncode == 0, explain(result)
    return folder, args, result


def test_sweep_makes_one_parent_and_a_finished_child_per_trial(quick_sweep):
    folder, _, result = quick_sweep
    assert "4 trials: 4 finished, 0 failed, 0 diverged, 0 skipped" in result.stdout, explain(result)
    client, parents, children = read_runs(folder)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_finished"] == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["sweeper.overrides"] for c in children} == {
        "lr=0.002,ratio=0.5", "lr=0.002,ratio=1.0", "lr=0.0002,ratio=0.5", "lr=0.0002,ratio=1.0",
    }
    # Run names lead with the trial number and read short, so the UI's narrow column tells them apart.
    assert {c.info.run_name for c in children} == {
        "#1 lr=2e-3 ratio=0.5", "#2 lr=2e-3 ratio=1.0", "#3 lr=2e-4 ratio=0.5", "#4 lr=2e-4 ratio=1.0",
    }
    hashes = {c.data.tags["sweeper.config_hash"] for c in children}
    assert len(hashes) == 4 and all(len(h) == 64 for h in hashes)
    assert parent.data.tags["sweeper.kind"] == "sweep"
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["sweeper.status"] == "finished"
        assert child.data.tags["sweeper.kind"] == "trial"
        assert child.info.run_name.startswith(f"#{child.data.tags['sweeper.trial']} ")
        assert "train.total_steps=4" in child.data.tags["sweeper.all_overrides"]
        assert child.data.tags["sweeper.jax_backend"] and child.data.tags["sweeper.device_count"]
        if (REPO / ".git").exists():
            assert len(child.data.tags["mlflow.source.git.commit"]) == 40
        assert 0.0 <= child.data.metrics["test_accuracy"] <= 1.0
        assert 0.0 <= child.data.metrics["validation_accuracy"] <= 1.0
        params = child.data.params
        assert params["optim.b1"] == "0.9" and params["model.hidden_size"] and params["train.total_steps"] == "4"
        assert float(params["lr"]) in (2e-3, 2e-4) and float(params["ratio"]) in (0.5, 1.0)
        assert "output_dir" not in params
        history = client.get_metric_history(child.info.run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "confusion.json", "predictions"} <= artifacts
        predictions = {a.path for a in client.list_artifacts(child.info.run_id, "predictions")}
        assert "predictions/predictions_test.jsonl" in predictions


def test_trials_after_the_first_reuse_the_compiled_step(quick_sweep):
    """The basic launcher runs the trials in one process; only trial 1 compiles."""
    folder, _, _ = quick_sweep
    _, _, children = read_runs(folder)
    compile_seconds = {int(c.data.tags["sweeper.trial"]): c.data.metrics["compile_seconds"] for c in children}
    first, later = compile_seconds[1], [compile_seconds[k] for k in (2, 3, 4)]
    assert max(later) < first / 3, compile_seconds


def test_the_ui_sees_the_comparison_the_headline_metrics_and_the_data(quick_sweep, sweeper_env):
    """The parent's description pivots test and validation accuracy; each trial carries headline
    copies of its accuracies, a description, and which data it read (path, digest, sizes)."""
    folder, _, _ = quick_sweep
    client, parents, children = read_runs(folder)
    parent = min(parents, key=lambda r: r.info.start_time)  # the first sweep (a later test re-runs it)
    note = parent.data.tags["mlflow.note.content"]
    best = max(sorted(children, key=lambda c: int(c.data.tags["sweeper.trial"])),
               key=lambda c: c.data.metrics["validation_accuracy"])
    assert note.startswith(f"Best by validation accuracy: trial {best.data.tags['sweeper.trial']} ("), note
    assert "Final: 4 of 4 trials (4 finished)." in note
    assert "|lr ↓ · ratio →|0.5|1.0|" in note.replace("&nbsp;", "")
    for child in children:
        metrics, params = child.data.metrics, child.data.params
        assert metrics["accuracy/test"] == metrics["test_accuracy"]
        assert metrics["accuracy/validation"] == metrics["validation_accuracy"]
        assert f"{metrics['test_accuracy']:.2%}" in note
        assert child.data.tags["mlflow.note.content"].startswith(f"Test accuracy **{metrics['test_accuracy']:.2%}**")
        assert params["data.resolved_path"] == str(Path(sweeper_env["ROTTEN_TOMATOES_DIR"]).resolve())
        assert params["data.origin"].startswith("$ROTTEN_TOMATOES_DIR=") and len(params["data.sha256"]) == 64
        assert (params["data.train_size"], params["data.test_size"], params["data.test_evaluated"]) == ("8530", "1066", "16")
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "finetuning"
    assert "one parent run per sweep" in experiment.tags["mlflow.note.content"]


def test_rerunning_a_sweep_skips_every_finished_trial(quick_sweep, sweeper_env):
    folder, args, _ = quick_sweep
    result = run_sweeper(sweeper_env, *args)
    assert result.returncode == 0, explain(result)
    assert "4 trials: 0 finished, 0 failed, 0 diverged, 4 skipped" in result.stdout, explain(result)
    _, parents, children = read_runs(folder)
    assert len(parents) == 2
    latest = max(parents, key=lambda r: r.info.start_time)
    assert latest.data.metrics["trials_skipped"] == 4
    # Nothing new trained: the new sweep's children link to the first sweep's runs, copying nothing.
    trained = [r for r in children if "sweeper.linked_run_id" not in r.data.tags]
    links = [r for r in children if r.data.tags["mlflow.parentRunId"] == latest.info.run_id]
    assert len(trained) == 4 and len(links) == 4
    assert {r.data.tags["sweeper.linked_run_id"] for r in links} == {r.info.run_id for r in trained}
    assert all(r.data.tags["sweeper.status"] == "skipped" and not r.data.metrics for r in links)
    # ... and the export of the latest sweep has all four trials, with their numbers.
    export = subprocess.run(
        [sys.executable, "-m", "sweeper.results", "--out", str(folder / "export")],
        cwd=REPO, env={**sweeper_env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"},
        capture_output=True, text=True, timeout=300,
    )
    assert export.returncode == 0, explain(export)
    import pandas as pd

    table = pd.read_csv(folder / "export" / "quick_cpu" / "trials.csv")
    assert len(table) == 4 and table["test_accuracy"].notna().all(), table


def test_a_failing_trial_is_recorded_and_the_others_finish(sweeper_env, tmp_path):
    # (2e-3, 0.5) finishes; ratio=0 fails validation; lr=1e9 blows up at step 2 (diverged).
    result = run_sweeper(sweeper_env, "-m", "lr=2e-3,1e9", "ratio=0.5,0", *TINY, *store_args(tmp_path))
    assert result.returncode == 1, explain(result)
    assert "4 trials: 1 finished, 2 failed, 1 diverged, 0 skipped" in result.stdout, explain(result)
    _, parents, children = read_runs(tmp_path)
    by_name = {c.data.tags["sweeper.overrides"]: c for c in children}
    assert len(children) == 4
    finished = by_name["lr=0.002,ratio=0.5"]
    assert finished.info.status == "FINISHED" and finished.data.tags["sweeper.status"] == "finished"
    for name in ("lr=0.002,ratio=0", "lr=1000000000.0,ratio=0"):
        failed = by_name[name]
        assert failed.info.status == "FAILED"
        assert failed.data.tags["sweeper.status"] == "failed"
        assert "ratio=0.0 is outside (0, 1]" in failed.data.tags["sweeper.error"]
    diverged = by_name["lr=1000000000.0,ratio=0.5"]
    assert diverged.info.status == "FINISHED"
    assert diverged.data.tags["sweeper.status"] == "diverged"
    assert "diverged at step" in diverged.data.tags["sweeper.message"]
    assert parents[0].info.status == "FAILED"
    assert parents[0].data.metrics["trials_failed"] == 2


def test_a_single_run_is_a_tracked_sweep_of_one(sweeper_env, tmp_path):
    result = run_sweeper(sweeper_env, "lr=2e-4", "ratio=0.5", *TINY, *store_args(tmp_path))
    assert result.returncode == 0, explain(result)
    assert "1 trials: 1 finished" in result.stdout
    _, parents, children = read_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 1


def test_an_unknown_key_fails_before_any_run(sweeper_env, tmp_path):
    result = run_sweeper(sweeper_env, "-m", "lr=2e-3,2e-4", "optim.beta1=0.9", *store_args(tmp_path))
    assert result.returncode != 0
    assert "Key 'beta1' not in 'OptimConfig'" in result.stderr, explain(result)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweep").exists()


def test_a_wrong_type_in_one_grid_value_fails_before_any_run(sweeper_env, tmp_path):
    result = run_sweeper(sweeper_env, "-m", "lr=2e-3,fast", *store_args(tmp_path))
    assert result.returncode == 2, explain(result)
    assert "trial 2 of 2 (lr=fast " in result.stderr and "does not compose" in result.stderr
    assert "could not be converted to Float" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


# --- hydra/launcher=vectorized: compatible trials trained together, each its own run ----------

VECTORIZED = ["hydra/launcher=vectorized", "hydra.launcher.group_size=4"]


@pytest.fixture(scope="module")
def vectorized_sweep(sweeper_env, tmp_path_factory):
    """The quick_cpu grid of `quick_sweep`, its 4 trials trained as one vectorised group."""
    folder = tmp_path_factory.mktemp("vectorized_sweep")
    args = ["-m", "sweep=quick_cpu", *TINY, *VECTORIZED, *store_args(folder)]
    result = run_sweeper(sweeper_env, *args)
    assert result.returncode == 0, explain(result)
    return folder, args, result


def test_a_vectorized_sweep_makes_a_finished_child_run_per_trial(vectorized_sweep, quick_sweep):
    folder, _, result = vectorized_sweep
    assert "vectorised group of 4: trials 1,2,3,4" in result.stdout, explain(result)
    assert "4 trials: 4 finished, 0 failed, 0 diverged, 0 skipped" in result.stdout, explain(result)
    client, parents, children = read_runs(folder)
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].data.tags["sweeper.launcher"].endswith("VectorizedLauncher")
    _, _, sequential = read_runs(quick_sweep[0])
    alone = {c.data.tags["sweeper.overrides"]: c for c in sequential}
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["sweeper.status"] == "finished"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        metrics = child.data.metrics
        assert metrics["vectorized_trials"] == 4
        # The same trial as the basic launcher's run of it: same accuracies, loss to float rounding.
        twin = alone[child.data.tags["sweeper.overrides"]].data.metrics
        for key in ("test_accuracy", "validation_accuracy", "train_examples", "steps"):
            assert metrics[key] == twin[key], key
        assert metrics["final_loss"] == pytest.approx(twin["final_loss"], rel=1e-5)
        assert child.data.tags["sweeper.config_hash"] == alone[child.data.tags["sweeper.overrides"]].data.tags["sweeper.config_hash"]
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss")) == [1, 2, 3, 4]
        assert {"config.yaml", "confusion.json", "predictions"} <= {a.path for a in client.list_artifacts(child.info.run_id)}


def test_rerunning_a_vectorized_sweep_skips_every_finished_trial(vectorized_sweep, sweeper_env):
    folder, args, _ = vectorized_sweep
    result = run_sweeper(sweeper_env, *args)
    assert result.returncode == 0, explain(result)
    assert "4 trials: 0 finished, 0 failed, 0 diverged, 4 skipped" in result.stdout, explain(result)
    assert "vectorised group" not in result.stdout
    children = read_runs(folder)[2]
    assert len(children) == 8  # 4 trained, and 4 links to them under the new parent
    assert sum("sweeper.linked_run_id" in r.data.tags for r in children) == 4


def test_a_vectorized_sweep_records_failed_and_diverged_trials_one_by_one(sweeper_env, tmp_path):
    # ratio=0 fails validation (alone, through the app); (2e-3, 0.5) and (1e9, 0.5) train as a group
    # of two in which the second diverges.
    result = run_sweeper(sweeper_env, "-m", "lr=2e-3,1e9", "ratio=0.5,0", *TINY, *VECTORIZED, *store_args(tmp_path))
    assert result.returncode == 1, explain(result)
    assert "4 trials: 1 finished, 2 failed, 1 diverged, 0 skipped" in result.stdout, explain(result)
    assert "vectorised group of 2: trials 1,3" in result.stdout, explain(result)
    _, parents, children = read_runs(tmp_path)
    by_name = {c.data.tags["sweeper.overrides"]: c for c in children}
    assert len(children) == 4
    assert by_name["lr=0.002,ratio=0.5"].data.tags["sweeper.status"] == "finished"
    for name in ("lr=0.002,ratio=0", "lr=1000000000.0,ratio=0"):
        assert by_name[name].info.status == "FAILED"
        assert "ratio=0.0 is outside (0, 1]" in by_name[name].data.tags["sweeper.error"]
    diverged = by_name["lr=1000000000.0,ratio=0.5"]
    assert diverged.info.status == "FINISHED" and diverged.data.tags["sweeper.status"] == "diverged"
    assert "diverged at step" in diverged.data.tags["sweeper.message"]
    assert parents[0].data.metrics["trials_failed"] == 2


def test_groups_are_cut_to_the_launchers_group_size():
    from sweeper.vectorized import chunks

    assert chunks([0, 2, 3, 5, 6], 2) == [[0, 2], [3, 5], [6]]
    assert chunks([0, 1, 2], 0) == chunks([0, 1, 2], 1) == [[0], [1], [2]]  # 0 or 1: one by one
    assert chunks([4, 7], 8) == [[4, 7]]


def test_preview_marks_the_trials_that_finished_before(quick_sweep, sweeper_env):
    folder, args, first = quick_sweep
    # The run's console: one numbering, a summary with the best trial and what to run next.
    assert "  trial 1: lr=0.002,ratio=0.5" in first.stdout and "#0 :" not in first.stdout + first.stderr
    assert "best by validation accuracy: trial " in first.stdout and "next:" in first.stdout
    assert "  time: data " in first.stdout
    parents_before = len(read_runs(folder)[1])
    result = run_sweeper(sweeper_env, *args, "preview=true")
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert "4 finished before and would be skipped" in lines[0], result.stdout
    assert sum("-> finished before (run " in line for line in lines) == 4
    assert len(read_runs(folder)[1]) == parents_before  # the preview created nothing


def test_a_sweep_config_without_dash_m_warns(sweeper_env, tmp_path):
    result = run_sweeper(sweeper_env, "sweep=quick_cpu", *TINY, *store_args(tmp_path))
    assert result.returncode == 0, explain(result)
    assert "defines a sweep over lr, ratio, but without -m" in result.stderr
