"""`hydra/launcher=ray` end to end: a local Ray, a killed worker, a 2-host trial on a simulated cluster.

Each sweep is the real command in a subprocess. Every Ray here listens on 127.0.0.1 addresses and
is stopped by the test that started it (the launcher stops the Ray it starts for a sweep).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

# MLflow's own SQLAlchemy models warn on import (mlflow 3.17, SQLAlchemy 2); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
SHORT = ["train.batch_size=8", "eval.max_examples=16", "eval.before_training=false", "train.save_model=none"]


def explain(out: str, err: str, code) -> str:
    return f"exit {code}\n--- stdout\n{out[-5000:]}\n--- stderr\n{err[-5000:]}"


# Ray resolves 127.0.0.1 in a cluster address to this machine's outward address unless told it
# runs without clusters; these tests keep every Ray address on the loopback interface.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def sweeper(env, cwd: Path, *args: str) -> subprocess.Popen:
    """`python -m sweeper` in its own session (so whatever it leaves can be stopped by group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "sweeper", *args], cwd=cwd, env={**env, "JAX_PLATFORMS": "cpu", **LOOPBACK_ONLY},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
    return out, err


def runs(uri: str):
    """(parents, children) of the experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rotten_tomatoes")
    if experiment is None:
        return [], []
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    return ([r for r in found if "mlflow.parentRunId" not in r.data.tags],
            [r for r in found if "mlflow.parentRunId" in r.data.tags])


@pytest.mark.parametrize("args, says", [
    (["hydra.launcher.address=127.0.0.1:1"], r"hydra\.launcher\.address=127\.0\.0\.1:1 cannot reach.*tracking=server"),
    (["hydra.launcher.hosts=2"], r"hydra\.launcher\.hosts=2 with placement_strategy=STRICT_SPREAD.*placement_strategy=PACK"),
    (["hydra.launcher.tpu_topology=2x2x2"], r"tpu_topology=2x2x2 and tpu_version=None.*tpu_version=v4"),
])
def test_a_launch_that_cannot_work_stops_before_the_sweep_opens(sweeper_env, tmp_path, args, says):
    out, err = finish(sweeper(sweeper_env, tmp_path, "-m", "lr=2e-3,2e-4", "hydra/launcher=ray", *args))
    assert re.search(says, err), explain(out, err, "?")
    assert not (tmp_path / "mlflow.db").exists()  # no store opened, no parent run, no Ray started


def kill_a_trial_worker(process: subprocess.Popen, uri: str, sweep_dir: Path, timeout: float = 240) -> int:
    """SIGKILL the Ray worker of the first trial that has logged a step; returns that trial's number."""
    from mlflow import MlflowClient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        if not (sweep_dir / "sweeper_state.json").is_file():
            continue  # the sweep is still creating the store's tables: reading now would race it
        _, children = runs(uri)
        training = [c for c in children if c.info.status == "RUNNING"
                    and MlflowClient(tracking_uri=uri).get_metric_history(c.info.run_id, "loss")]
        if not training:
            continue
        number = int(training[0].data.tags["sweeper.trial"])
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.cmdline()[:1] == [f"ray::trial-{number}"]:
                    child.send_signal(signal.SIGKILL)
                    return number
    raise AssertionError("no trial worker was seen training")


@pytest.mark.slow
def test_a_sweep_on_a_local_ray_retries_a_killed_worker_and_brings_results_back(sweeper_env, tmp_path):
    """4 trials on a Ray started for the sweep, logging to an MLflow server; one worker killed
    mid-trial; trials keep their folders in a worker_dir, so the summary is built only from what
    the tasks returned."""
    from tracking_test import mlflow_server

    with mlflow_server(tmp_path) as uri:
        process = sweeper(
            sweeper_env, tmp_path, "-m", "lr=2e-3,2e-4", "ratio=0.5,1.0", *SHORT, "train.total_steps=30",
            "tracking.flush_every=2", f"tracking.uri={uri}",
            "hydra/launcher=ray", "hydra.launcher.local_num_cpus=1", f"hydra.launcher.worker_dir={tmp_path}/worker",
            "hydra.sweep.dir=multirun/s", "hydra.launcher.local_object_store_memory=100000000",
        )
        killed = kill_a_trial_worker(process, uri, tmp_path / "multirun/s")
        out, err = finish(process, timeout=500)
        assert process.returncode == 0, explain(out, err, process.returncode)
        assert "4 trials: 4 finished, 0 failed, 0 diverged, 0 skipped" in out, explain(out, err, 0)
        parents, children = runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(c.data.tags["sweeper.overrides"] for c in finished) == [
        "lr=0.0002,ratio=0.5", "lr=0.0002,ratio=1.0", "lr=0.002,ratio=0.5", "lr=0.002,ratio=1.0"]
    assert all(c.data.tags["sweeper.status"] == "finished" and c.data.metrics["steps"] == 30 for c in finished)
    # The killed attempt is closed, not left RUNNING, and says why.
    lost = [c for c in children if c.info.status != "FINISHED"]
    assert [(c.info.status, c.data.tags["sweeper.trial"], c.data.tags["sweeper.status"]) for c in lost] == [
        ("KILLED", str(killed), "interrupted")]
    assert "worker running this attempt was lost" in lost[0].data.tags["sweeper.error"]
    # Outcomes came back by value into this machine's sweep folder; the trials' folders stayed on the worker side.
    here, there = tmp_path / "multirun/s", tmp_path / "worker/multirun/s"
    assert sorted(p.name for p in (here / "sweeper_outcomes").iterdir()) == [f"000{n}.json" for n in range(1, 5)]
    assert not (here / "0").exists() and (there / "0/predictions_test.jsonl").is_file()


@contextlib.contextmanager
def simulated_cluster(monkeypatch, env: dict, nodes: int, **node_args):
    """A Ray cluster of `nodes` nodes on 127.0.0.1 (ray.cluster_utils), shut down on exit.

    Its workers get `env`'s checkout (PYTHONPATH), data and cache, as nodes that have the project
    installed and the data in place would.
    """
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # LOOPBACK_ONLY, in this process
    for name in ("PYTHONPATH", "ROTTEN_TOMATOES_DIR", "LLM_SWEEPER_CACHE"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": "127.0.0.1", "include_dashboard": False,
                                                            **node_args})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(node_ip_address="127.0.0.1", **node_args)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_a_two_host_trial_on_a_simulated_tpu_cluster_trains_once_and_logs_once(sweeper_env, tmp_path, monkeypatch):
    from tracking_test import mlflow_server

    with (mlflow_server(tmp_path) as url,
          simulated_cluster(monkeypatch, sweeper_env, 2, num_cpus=1, resources={"TPU": 4}) as cluster):
        assert cluster.address.startswith("127.0.0.1:")
        out, err = finish(sweeper(
            sweeper_env, tmp_path, "-m", "lr=2e-3", *SHORT, "train.total_steps=3", "tracking.flush_every=1",
            "tracking=server", f"tracking.uri={url}", "hydra/launcher=ray", f"hydra.launcher.address={cluster.address}",
            "hydra.launcher.hosts=2", "hydra.launcher.num_tpus=4",
        ))
        parents, children = runs(url)
        from mlflow import MlflowClient

        history = [MlflowClient(tracking_uri=url).get_metric_history(c.info.run_id, "loss") for c in children]
    assert "1 trials: 1 finished, 0 failed" in out, explain(out, err, "?")
    assert len(parents) == 1 and len(children) == 1  # process 1 trained too, but opened no run
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.tags["sweeper.status"] == "finished"
    assert child.data.tags["sweeper.device_count"] == "2"  # one mesh over both hosts' devices
    assert sorted(m.step for m in history[0]) == [1, 2, 3]  # each step logged once
