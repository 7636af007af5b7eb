"""trainer.distributed: one trial over two JAX processes equals the same trial in one process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.config import ConfigError
from trainer.distributed import ProcessGroup, follower_config

REPO = Path(__file__).resolve().parents[1]
TRIAL = ["train.total_steps=3", "train.batch_size=8", "eval.max_examples=16", "eval.before_training=false"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(env, output_dir: Path, coordinator: str, num_processes: int, process_id: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.distributed", "--coordinator", coordinator,
         "--num-processes", str(num_processes), "--process-id", str(process_id), "--output-dir", str(output_dir), *TRIAL],
        cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    assert process.returncode == 0, f"exit {process.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return out


def results_in(out: str) -> list[dict]:
    """The JSON result lines a process printed (gloo prints its own lines too)."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_two_processes_train_the_same_losses_as_one(sweeper_env, tmp_path):
    [single] = results_in(finish(start(sweeper_env, tmp_path / "single", "127.0.0.1:1", 1, 0)))
    coordinator = f"127.0.0.1:{free_port()}"
    processes = [start(sweeper_env, tmp_path / "multi", coordinator, 2, rank) for rank in (0, 1)]
    leader, follower = (finish(p) for p in processes)
    [multi] = results_in(leader)
    assert results_in(follower) == []  # only process 0 reports
    # One mesh over both processes' devices, not two independent trials.
    assert (multi["processes"], multi["devices"]) == (2, 2) and (single["processes"], single["devices"]) == (1, 1)
    assert multi["status"] == single["status"] == "finished"
    assert len(multi["losses"]) == len(single["losses"]) == 3
    for ours, reference in zip(multi["losses"], single["losses"]):
        assert ours == pytest.approx(reference, rel=1e-5)
    assert multi["metrics"]["test_accuracy"] == single["metrics"]["test_accuracy"]
    # Process 0 wrote the predictions and the model; the follower wrote nothing beside them.
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == [
        "model", "predictions_test.jsonl", "predictions_validation.jsonl"]
    assert len((tmp_path / "multi" / "predictions_test.jsonl").read_text().splitlines()) == 16
    # The exported weights were gathered from both processes' shards: whole, and equal to one process's.
    from safetensors.numpy import load_file

    ours, reference = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("multi", "single"))
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].shape == tensor.shape
        assert np.allclose(ours[name], tensor, rtol=1e-5, atol=1e-5), name  # Adam: rounding of near-zero grads


def test_a_bad_process_group_names_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"coordinator='10\.0\.0\.2'.*host:port"):
        ProcessGroup("10.0.0.2", 2, 0)
    with pytest.raises(ConfigError, match=r"process_id=2 must be in 0\.\.1"):
        ProcessGroup("10.0.0.2:8476", 2, 2)
    with pytest.raises(ConfigError, match=r"num_processes=0"):
        ProcessGroup("10.0.0.2:8476", 0, 0)
    assert ProcessGroup("10.0.0.2:8476", 2, 0).is_leader and not ProcessGroup("h:1", 2, 1).is_leader


def test_followers_write_into_their_scratch_folder_without_predictions():
    from trainer.config import TrialConfig

    cfg = TrialConfig(output_dir="/sweep/trial")
    follower = follower_config(cfg, "/tmp/scratch")
    assert follower.output_dir == "/tmp/scratch" and follower.eval.predictions is False
    assert cfg.output_dir == "/sweep/trial" and cfg.eval.predictions is True  # the leader's is untouched
