"""sweeper.tracking: hashing, params, batching, store checks, and a sweep through a real server."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow_servers import MlflowServer

from sweeper import tracking

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.total_steps=3", "eval.max_examples=16", "eval.before_training=false"]
TRIAL = {
    "lr": 2e-4, "warmup": 184, "ratio": 0.9, "seed": 0, "output_dir": "/tmp/a",
    "optim": {"b1": 0.9, "b2": 0.9}, "data": {"cache_dir": "/tmp/cache", "seq_len": 128},
    "eval": {"splits": ["test", "validation"]},
}


def with_values(**changes) -> dict:
    trial = json.loads(json.dumps(TRIAL))
    for dotted, value in changes.items():
        node = trial
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return trial


def test_flatten_uses_dotted_keys():
    flat = tracking.flatten(TRIAL)
    assert flat["optim.b1"] == 0.9 and flat["data.seq_len"] == 128 and flat["lr"] == 2e-4


def test_params_are_the_flat_config_without_output_dir():
    params = {p.key: p.value for p in tracking.trial_params(TRIAL)}
    assert params["optim.b2"] == "0.9" and params["warmup"] == "184"
    assert params["eval.splits"] == '["test", "validation"]'
    assert "output_dir" not in params


def test_config_hash_changes_with_results_not_with_where_they_go():
    digest = tracking.config_hash(TRIAL)
    assert digest == tracking.config_hash(with_values(output_dir="/elsewhere", data__cache_dir="/other"))
    assert digest != tracking.config_hash(with_values(lr=2e-5))
    assert digest != tracking.config_hash(with_values(optim__b1=0.8))


def test_default_store_is_mlflow_db_in_the_launch_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_uri(None, tmp_path)
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.artifact_location(uri) == (tmp_path / "mlartifacts").as_uri()
    assert tracking.resolve_uri("http://host:5000", tmp_path) == "http://host:5000"
    assert tracking.artifact_location("http://host:5000") is None
    # Like `python -m sweeper.results`, the environment's store comes before the default.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://other:5000")
    assert tracking.resolve_uri(None, tmp_path) == "http://other:5000"


def test_step_metrics_go_in_batches(tmp_path):
    from sweeper.outbox import Outbox

    calls = []
    client = SimpleNamespace(log_batch=lambda run_id, metrics, params, tags: calls.append(list(metrics)))
    box = Outbox(tmp_path, "sqlite:///unused.db", window=0, client=client)
    logger = tracking.StepLogger(box, "run", every=3)
    for step in range(1, 8):
        logger(SimpleNamespace(step=step, loss=1.0, learning_rate=0.1, grad_norm=0.5, tokens_per_second=9.0, tokens_seen=step))
    logger.flush()
    assert [len(batch) for batch in calls] == [15, 15, 5]  # 5 metrics a step: steps 1-3, 4-6, 7
    assert {m.key for m in calls[0]} == set(tracking.STEP_KEYS)
    assert sorted({m.step for m in calls[1]}) == [4, 5, 6]
    assert box.unsent == 0


def test_a_resumed_run_does_not_log_its_steps_twice(tmp_path):
    from sweeper.outbox import Outbox

    calls = []
    client = SimpleNamespace(log_batch=lambda run_id, metrics, params, tags: calls.append(list(metrics)))
    logger = tracking.StepLogger(Outbox(tmp_path, "sqlite:///unused.db", 0, client=client), "run", every=2, after_step=4)
    for step in range(1, 9):
        logger(SimpleNamespace(step=step, loss=1.0, learning_rate=0.1, grad_norm=0.5, tokens_per_second=9.0, tokens_seen=step))
    logger.flush()
    assert sorted({m.step for batch in calls for m in batch}) == [5, 6, 7, 8]


def test_unreachable_server_error_names_the_uri():
    with pytest.raises(tracking.TrackingError, match=r"http://127\.0\.0\.1:1 .*mlflow server"):
        tracking.check_reachable("http://127.0.0.1:1", timeout=2)


# --- through the command -----------------------------------------------------------------




def run_sweeper(env, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def test_unreachable_server_stops_the_sweep_before_any_trial(sweeper_env, tmp_path):
    started = time.monotonic()
    result = run_sweeper(
        sweeper_env, "-m", "lr=2e-3,2e-4", "tracking.uri=http://127.0.0.1:1", f"hydra.sweep.dir={tmp_path}/sweep"
    )
    assert result.returncode == 2, explain(result)
    assert "cannot reach the MLflow tracking server at tracking.uri=http://127.0.0.1:1" in result.stderr
    assert not (tmp_path / "sweep").exists()  # no trial started
    assert time.monotonic() - started < 30


@contextlib.contextmanager
def mlflow_server(folder: Path, boot_timeout: float = 90):
    """`mlflow server` on a free port with its own SQLite store; stopped (process group) on exit."""
    server = MlflowServer(folder).start(boot_timeout)
    try:
        yield server.url
    finally:
        server.stop()


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_parallel_sweep_through_a_tracking_server(sweeper_env, tmp_path):
    """Two joblib workers log to one server; the runs are read back over its REST API."""
    with mlflow_server(tmp_path) as url:
        result = run_sweeper(
            sweeper_env, "-m", "lr=2e-3,2e-4", *TINY, f"tracking.uri={url}", f"hydra.sweep.dir={tmp_path}/sweep",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        )
        assert result.returncode == 0, explain(result)
        assert "2 trials: 2 finished, 0 failed, 0 diverged, 0 skipped" in result.stdout, explain(result)
        experiment = rest(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=rotten_tomatoes")
        experiment_id = experiment["experiment"]["experiment_id"]
        runs = rest(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
        tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
        parents = [r for r, t in zip(runs, tags) if "mlflow.parentRunId" not in t]
        children = [(r, t) for r, t in zip(runs, tags) if "mlflow.parentRunId" in t]
        assert len(parents) == 1 and len(children) == 2
        parent_id = parents[0]["info"]["run_id"]
        assert parents[0]["info"]["status"] == "FINISHED"
        assert sorted(t["sweeper.overrides"] for _, t in children) == ["lr=0.0002", "lr=0.002"]
        for run, run_tags in children:
            assert run["info"]["status"] == "FINISHED"
            assert run_tags["mlflow.parentRunId"] == parent_id and run_tags["sweeper.status"] == "finished"
            metrics = {m["key"] for m in run["data"]["metrics"]}
            assert {"test_accuracy", "validation_accuracy", "loss"} <= metrics
            listed = rest(url, f"/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}")
            assert "config.yaml" in {f["path"] for f in listed.get("files", [])}


def _run(status="RUNNING", host=None, pid=None, beat=None, start=0.0):
    tags = {}
    if host is not None:
        tags["sweeper.host"] = host
    if pid is not None:
        tags["sweeper.pid"] = str(pid)
    if beat is not None:
        tags["sweeper.heartbeat"] = str(beat)
    return SimpleNamespace(info=SimpleNamespace(status=status, start_time=start * 1000), data=SimpleNamespace(tags=tags))


def test_a_run_is_stale_when_its_process_is_gone_or_its_heartbeat_is_old():
    import os
    import socket

    from sweeper.liveness import is_stale

    here, now = socket.gethostname(), 10_000.0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    assert is_stale(_run(host=here, pid=dead_pid, beat=now), stale_after=180, now=now)  # gone: at once
    assert not is_stale(_run(host=here, pid=os.getpid(), beat=now - 100), stale_after=180, now=now)
    assert not is_stale(_run(host="another-host", pid=dead_pid, beat=now - 100), stale_after=180, now=now)
    assert is_stale(_run(host="another-host", pid=dead_pid, beat=now - 200), stale_after=180, now=now)
    assert is_stale(_run(start=now - 500), stale_after=180, now=now)  # no heartbeat: its start time
    assert not is_stale(_run(status="FINISHED", start=0), stale_after=180, now=now)


def test_the_confusion_matrix_png_is_labelled_titled_and_readable(tmp_path):
    counts = [[412, 121, 0], [98, 435, 0]]
    figure = tracking.confusion_figure(counts, "test")
    axes = figure.axes[0]
    assert axes.get_title() == "test split: confusion matrix (accuracy 79.5% of 1,066)"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["Negative", "Positive", "invalid answer"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["Negative", "Positive"]
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted", "true label")
    cells = {t.get_text(): t.get_color() for t in axes.texts}
    # Counts with the share of the true class; white on the dark cells, dark blue on the light ones.
    assert cells["412\n77.3%"] == "white" and cells["435\n81.6%"] == "white"
    assert cells["121\n22.7%"] == "#08306b" and cells["0\n0.0%"] == "#08306b"
    figure.savefig(tmp_path / "confusion.png")
    from PIL import Image

    with Image.open(tmp_path / "confusion.png") as image:
        assert image.size == (672, 432)
