"""What a sweep survives: signals, killed processes, concurrent sweeps, a tracking store that goes
away. Each test runs the real `python -m sweeper` in a subprocess against its own store, causes
the fault, and reads the store back to check that nothing was lost and nothing is left RUNNING.
(Bad data and bad files: tests/data_test.py, tests/input_faults_test.py.)
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow_servers import MlflowServer

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
GRID = ["-m", "lr=2e-3,1e-3", "ratio=0.5,1.0"]
SHORT = ["eval.max_examples=32", "eval.before_training=false", "tracking.flush_every=2", "train.batch_size=16"]


def sweep_args(folder: Path, steps: int = 30, store: str | None = None) -> list[str]:
    return [*GRID, f"train.total_steps={steps}", *SHORT,
            f"tracking.uri={store or f'sqlite:///{folder}/mlflow.db'}", f"hydra.sweep.dir={folder}/sweep",
            f"train.checkpoint_dir={folder}/checkpoints"]


def start_sweeper(env, args, folder: Path, name: str = "sweep") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sweeper", *args], cwd=REPO, env=env,
        stdout=open(folder / f"{name}.out", "w"), stderr=open(folder / f"{name}.err", "w"),
    )


def run_sweeper(env, args, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def explain(result) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str):
    client = client_for(uri)
    experiment = client.get_experiment_by_name("rotten_tomatoes")
    return client, client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def wait_for_trial_steps(uri: str, trial: int, steps: int, process: subprocess.Popen, timeout: float = 300):
    """Block until the sweep's trial `trial` has `steps` loss values in the store; its run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the sweep ended before the fault could be caused"
        if not any(Path(a.split("=", 1)[1], "sweeper_state.json").is_file()
                   for a in process.args if a.startswith("hydra.sweep.dir=")):
            # The store is the sweep's to create: a reader opening a new SQLite file at the same
            # moment would run MLflow's migrations beside it.
            time.sleep(0.5)
            continue
        with contextlib.suppress(Exception):
            client, runs = runs_of(uri)
            for run in runs:
                if run.data.tags.get("sweeper.trial") == str(trial) and run.info.status == "RUNNING":
                    if len(client.get_metric_history(run.info.run_id, "loss")) >= steps:
                        return run
        time.sleep(0.5)
    raise AssertionError(f"trial {trial} never logged {steps} steps")


def loss_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def no_run_left_running(uri: str) -> None:
    _, runs = runs_of(uri)
    running = [(r.info.run_name, r.info.run_id) for r in runs if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING: {running}"


# ---------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigterm_mid_trial_then_rerun_resumes_in_the_same_run_with_the_same_numbers(sweeper_env, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = sweep_args(tmp_path, steps=40)
    process = start_sweeper(sweeper_env, args, tmp_path)
    cut = wait_for_trial_steps(uri, trial=2, steps=6, process=process)
    process.send_signal(signal.SIGTERM)  # what a preempted TPU VM or spot GPU machine gets
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    out = (tmp_path / "sweep.out").read_text()
    assert "4 trials: 1 finished, 0 failed, 0 diverged, 0 skipped, 1 interrupted, 1 not run" in out or \
        "4 trials: 1 finished, 0 failed, 0 diverged, 0 skipped, 1 interrupted, 2 not run" in out, out
    client, runs = runs_of(uri)
    interrupted = client.get_run(cut.info.run_id)
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["sweeper.status"] == "interrupted"
    parent = client.get_run(interrupted.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    no_run_left_running(uri)
    logged_before = loss_steps(client, cut.info.run_id)
    assert any((tmp_path / "checkpoints").iterdir())  # saved at the step boundary after SIGTERM

    result = run_sweeper(sweeper_env, args)
    assert result.returncode == 0, explain(result)
    assert f"resuming run {cut.info.run_id}" in result.stdout, explain(result)
    resumed = client.get_run(cut.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["sweeper.status"] == "finished"
    assert resumed.data.metrics["resumed_from_step"] >= len(logged_before)
    assert loss_steps(client, cut.info.run_id) == list(range(1, 41))  # every step once, none twice
    assert not any((tmp_path / "checkpoints").iterdir())  # a finished trial's checkpoint is removed
    latest_parent = resumed.data.tags["mlflow.parentRunId"]
    children = client.search_runs([resumed.info.experiment_id], f"tags.mlflow.parentRunId = '{latest_parent}'")
    assert len(children) == 4  # every grid point: 1 link, the resumed run, 2 new
    no_run_left_running(uri)

    # The same trial, never interrupted, in a store of its own: the same loss and accuracy.
    alone = tmp_path / "alone"
    alone.mkdir()
    reference = run_sweeper(sweeper_env, ["lr=2e-3", "ratio=1.0", "train.total_steps=40", *SHORT,
                                          f"tracking.uri=sqlite:///{alone}/mlflow.db", f"hydra.run.dir={alone}/run",
                                          f"train.checkpoint_dir={alone}/checkpoints"])
    assert reference.returncode == 0, explain(reference)
    _, alone_runs = runs_of(f"sqlite:///{alone}/mlflow.db")
    whole = next(r for r in alone_runs if r.data.tags.get("sweeper.kind") == "trial")
    assert cut.data.tags["sweeper.config_hash"] == whole.data.tags["sweeper.config_hash"]
    for key in ("final_loss", "test_accuracy", "validation_accuracy"):
        assert resumed.data.metrics[key] == pytest.approx(whole.data.metrics[key], rel=1e-6), key
    print(f"resume equality: final_loss {resumed.data.metrics['final_loss']!r} (resumed from step "
          f"{resumed.data.metrics['resumed_from_step']:.0f}) vs {whole.data.metrics['final_loss']!r} uninterrupted")


def test_ctrl_c_counts_one_interrupted_trial_not_three_failures(sweeper_env, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = start_sweeper(sweeper_env, sweep_args(tmp_path, steps=200), tmp_path)
    wait_for_trial_steps(uri, trial=1, steps=2, process=process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 128 + signal.SIGINT
    out = (tmp_path / "sweep.out").read_text()
    assert "4 trials: 0 finished, 0 failed, 0 diverged, 0 skipped, 1 interrupted, 3 not run" in out, out
    no_run_left_running(uri)


@pytest.mark.slow
def test_kill_9_leaves_runs_that_the_next_sweep_marks_killed_and_resumes(sweeper_env, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = sweep_args(tmp_path, steps=40) + ["train.checkpoint_every_steps=5"]
    process = start_sweeper(sweeper_env, args, tmp_path)
    cut = wait_for_trial_steps(uri, trial=2, steps=12, process=process)
    process.kill()
    process.wait(timeout=60)
    client, runs = runs_of(uri)
    assert {r.info.status for r in runs} >= {"RUNNING"}  # what kill -9 leaves behind

    result = run_sweeper(sweeper_env, args)
    assert result.returncode == 0, explain(result)
    assert "left RUNNING by a stopped sweep as KILLED" in result.stderr, explain(result)
    first_parent = client.get_run(cut.data.tags["mlflow.parentRunId"])
    assert first_parent.info.status == "KILLED" and "stopped without closing" in first_parent.data.tags["sweeper.error"]
    resumed = client.get_run(cut.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert loss_steps(client, cut.info.run_id) == list(range(1, 41))  # logged steps past the checkpoint: not twice
    no_run_left_running(uri)


# ---------------------------------------------------------------- concurrent sweeps


@pytest.mark.slow
def test_two_sweeps_on_one_new_store_train_each_config_once(sweeper_env, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*GRID, "train.total_steps=20", *SHORT, f"tracking.uri={uri}"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_sweeper(sweeper_env, [*args, f"hydra.sweep.dir={tmp_path}/a/sweep"], tmp_path / "a")
    second = start_sweeper(sweeper_env, [*args, f"hydra.sweep.dir={tmp_path}/b/sweep"], tmp_path / "b")
    for process, name in ((first, "a"), (second, "b")):
        code = process.wait(timeout=600)
        assert code == 0, (tmp_path / name / "sweep.out").read_text() + (tmp_path / name / "sweep.err").read_text()
    client, runs = runs_of(uri)
    trials = [r for r in runs if r.data.tags.get("sweeper.kind") == "trial"]
    trained = [r for r in trials if not r.data.tags.get("sweeper.linked_run_id")]
    assert len(trained) == 4 and len({r.data.tags["sweeper.config_hash"] for r in trained}) == 4
    parents = [r for r in runs if r.data.tags.get("sweeper.kind") == "sweep"]
    assert len(parents) == 2
    for parent in parents:
        children = [r for r in trials if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(children) == 4  # each sweep shows the whole grid, trained there or linked
    no_run_left_running(uri)


def test_a_sweep_folder_in_use_is_refused(sweeper_env, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = start_sweeper(sweeper_env, sweep_args(tmp_path, steps=300), tmp_path)
    try:
        wait_for_trial_steps(uri, trial=1, steps=1, process=process)
        result = run_sweeper(sweeper_env, sweep_args(tmp_path, steps=300))
        assert result.returncode == 2, explain(result)
        assert f"the sweep folder {tmp_path}/sweep is in use by another sweep" in result.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    no_run_left_running(uri)


def test_default_sweep_folders_differ_for_sweeps_started_in_the_same_second():
    from hydra import compose, initialize_config_dir

    from sweeper.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("sweeper", return_hydra_config=True)
    import re

    # down to the microsecond: two sweeps would have to start within the same one to share a folder
    assert re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", cfg.hydra.sweep.dir), cfg.hydra.sweep.dir
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", cfg.hydra.run.dir), cfg.hydra.run.dir


# ---------------------------------------------------------------- the tracking store goes away


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop(signal.SIGKILL)


def quick_http_env(env) -> dict:
    # A dead server fails a request at once; the outbox's own retry window does the waiting.
    return {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@pytest.mark.slow
def test_a_server_down_for_half_a_minute_mid_sweep_loses_nothing(sweeper_env, tmp_path, server):
    env = quick_http_env(sweeper_env)
    args = sweep_args(tmp_path, steps=40, store=server.url) + ["tracking.retry_window=240"]
    process = start_sweeper(env, args, tmp_path)
    wait_for_trial_steps(server.url, trial=2, steps=4, process=process)
    server.stop(signal.SIGKILL)
    time.sleep(30)
    server.start()
    assert process.wait(timeout=600) == 0, (tmp_path / "sweep.out").read_text() + (tmp_path / "sweep.err").read_text()
    client, runs = runs_of(server.url)
    trials = [r for r in runs if r.data.tags.get("sweeper.kind") == "trial"]
    assert len(trials) == 4
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags["sweeper.status"] == "finished", run.info.run_name
        assert "test_accuracy" in run.data.metrics
        assert loss_steps(client, run.info.run_id) == list(range(1, 41))
    no_run_left_running(server.url)


@pytest.mark.slow
def test_writes_kept_through_a_long_outage_are_sent_by_sweeper_sync(sweeper_env, tmp_path, server):
    env = quick_http_env(sweeper_env)
    args = ["-m", "lr=2e-3,1e-3", "train.total_steps=30", *SHORT, f"tracking.uri={server.url}",
            f"hydra.sweep.dir={tmp_path}/sweep", f"train.checkpoint_dir={tmp_path}/checkpoints",
            "tracking.retry_window=5"]
    process = start_sweeper(env, args, tmp_path)
    cut = wait_for_trial_steps(server.url, trial=1, steps=4, process=process)
    server.stop(signal.SIGKILL)  # and it stays away until the sweep has ended
    code = process.wait(timeout=600)
    out = (tmp_path / "sweep.out").read_text()
    assert code == 1, out  # trial 2 could not even open its run: failed, and said so
    assert "tracking write(s) wait in the trials' folders" in out, out
    server.start()
    sync = subprocess.run([sys.executable, "-m", "sweeper.sync", str(tmp_path / "sweep")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, explain(sync)
    client = client_for(server.url)
    trial = client.get_run(cut.info.run_id)
    assert trial.info.status == "FINISHED" and "test_accuracy" in trial.data.metrics
    assert loss_steps(client, cut.info.run_id) == list(range(1, 31))
    parent = client.get_run(cut.data.tags["mlflow.parentRunId"])
    assert parent.info.status in ("FINISHED", "FAILED") and parent.data.metrics["trials_finished"] == 1
    again = subprocess.run([sys.executable, "-m", "sweeper.sync", str(tmp_path / "sweep")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to send" in again.stdout
    no_run_left_running(server.url)
