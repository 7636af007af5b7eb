"""Trials trained together (trainer.vectorized) against the same trials run one by one (run_trial)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from hydra import compose, initialize_config_dir

from trainer.config import ConfigError, register_configs
from trainer.trial import run_trial
from trainer.vectorized import group_compatible, make_vectorized_step, run_trials

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
QUICK = ["train.total_steps=8", "eval.max_examples=24", "train.batch_size=8"]
# Three trials that differ in everything a group may differ in, one of them shorter.
TRIALS = [
    ["lr=2e-3", "warmup=0", "optim.b1=0.9", "optim.weight_decay=0.3", "ratio=0.5", "seed=0"],
    ["lr=1e-3", "warmup=3", "optim.b1=0.8", "optim.weight_decay=0.0", "ratio=1.0", "seed=1"],
    ["lr=5e-3", "warmup=2", "optim.b1=0.95", "optim.weight_decay=0.1", "ratio=0.7", "seed=2", "train.total_steps=5"],
]
DIVERGING = ["lr=1e8", "optim.clip_grad_norm=0"]
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _data(rt_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROTTEN_TOMATOES_DIR", str(rt_dir))
        patch.setenv("LLM_SWEEPER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


def trial_config(output_dir, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={output_dir}", *QUICK, *overrides])


class StepCompiles:
    """Counts XLA compilations of the vectorised step, through JAX's public monitoring hook."""

    def __init__(self):
        self.count, self.active = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._listener)

    def _listener(self, event, duration, fun_name="", **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration" and "vectorized_train_step" in fun_name:
            self.count += 1


COMPILES = StepCompiles()


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sequential")
    return [run_trial(trial_config(folder / str(k), *trial)) for k, trial in enumerate(TRIALS)]


@pytest.fixture(scope="module")
def vectorized(tmp_path_factory):
    """(results, step records per trial, compilations of the step) of the three trials as one group."""
    folder = tmp_path_factory.mktemp("vectorized")
    records = [[] for _ in TRIALS]
    make_vectorized_step.cache_clear()  # a fresh program, whatever ran before in this process
    COMPILES.count, COMPILES.active = 0, True
    try:
        results = run_trials(
            [trial_config(folder / str(k), *trial) for k, trial in enumerate(TRIALS)],
            [r.append for r in records],
        )
    finally:
        COMPILES.active = False
    return results, records, COMPILES.count


def assert_same_trial(alone, together):
    assert together.status == alone.status and together.message == alone.message
    assert [r.step for r in together.history] == [r.step for r in alone.history]
    for a, b in zip(alone.history, together.history):
        assert b.loss == pytest.approx(a.loss, rel=LOSS_RTOL, nan_ok=True)
        assert b.learning_rate == pytest.approx(a.learning_rate, rel=1e-6)
        assert b.tokens_seen == a.tokens_seen
    timing = {k for k in alone.metrics if k.endswith("_seconds") or k == "tokens_per_second"}
    assert set(together.metrics) == set(alone.metrics) | {"vectorized_trials"}
    for key in set(alone.metrics) - timing:
        if key == "final_loss":
            assert together.metrics[key] == pytest.approx(alone.metrics[key], rel=LOSS_RTOL, nan_ok=True)
        else:  # counts, accuracies, F1: equal, not close (the params differ by float rounding only)
            assert together.metrics[key] == alone.metrics[key], key
    assert set(together.reports) == set(alone.reports)
    for name, report in alone.reports.items():
        assert together.reports[name].confusion == report.confusion


def test_trials_trained_together_match_each_trained_alone(sequential, vectorized):
    results, _, _ = vectorized
    for alone, together in zip(sequential, results):
        assert_same_trial(alone, together)
        assert together.metrics["vectorized_trials"] == 3
    assert [r.metrics["steps"] for r in results] == [8, 8, 5]
    assert all("test_accuracy" in r.metrics and "before_test_accuracy" in r.metrics for r in results)


def test_each_trial_gets_its_own_step_records_and_predictions(vectorized):
    results, records, _ = vectorized
    assert [[r.step for r in trial] for trial in records] == [list(range(1, 9)), list(range(1, 9)), list(range(1, 6))]
    for result, trial in zip(results, records):
        assert trial == result.history
        assert all(r.tokens_per_second > 0 for r in trial)
        assert Path(result.artifacts["predictions_test"]).is_file()
    assert len({r.artifacts["predictions_test"] for r in results}) == 3


def test_the_group_compiles_its_step_once(vectorized):
    _, records, compiles = vectorized
    assert sum(len(trial) for trial in records) == 21  # 8 group steps, the short trial frozen after 5
    assert compiles == 1


def test_a_diverging_trial_stops_alone(tmp_path, sequential):
    diverging = trial_config(tmp_path / "alone", *DIVERGING)
    alone = run_trial(diverging)
    assert alone.status == "diverged"
    group = [trial_config(tmp_path / "0", *TRIALS[0]), trial_config(tmp_path / "1", *DIVERGING),
             trial_config(tmp_path / "2", *TRIALS[2])]
    first, diverged, last = run_trials(group)
    assert diverged.status == "diverged"
    assert diverged.message == alone.message and diverged.message.startswith("diverged at step")
    assert diverged.metrics["steps"] == alone.metrics["steps"] < 8
    assert math.isnan(diverged.metrics["final_loss"]) or math.isinf(diverged.metrics["final_loss"])
    assert "test_accuracy" not in diverged.metrics and "before_test_accuracy" in diverged.metrics
    assert_same_trial(sequential[0], first)
    assert_same_trial(sequential[2], last)


def test_incompatible_trials_fail_naming_the_key(tmp_path):
    base = trial_config(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"trial 2 has train\.batch_size=16 but trial 1 has train\.batch_size=8"):
        run_trials([base, trial_config(tmp_path / "b", "train.batch_size=16")])
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        run_trials([base, trial_config(tmp_path / "c", "lr=1e-2"), trial_config(tmp_path / "d", "data.seq_len=64")])
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_group_compatible_sorts_a_sweep_into_groups(tmp_path):
    cfgs = [
        trial_config(tmp_path, "lr=1e-3"),
        trial_config(tmp_path, "lr=2e-3", "ratio=0.5", "optim.b2=0.9"),
        trial_config(tmp_path, "train.batch_size=16"),
        trial_config(tmp_path, "seed=3", "warmup=5", "train.total_steps=20", "optim.clip_grad_norm=0"),
        trial_config(tmp_path, "model.hidden_size=32"),
        trial_config(tmp_path, "train.batch_size=16", "lr=5e-3"),
        trial_config(tmp_path, "eval.max_examples=8"),
    ]
    assert group_compatible(cfgs) == [[0, 1, 3], [2, 5], [4], [6]]


# --- on 2 simulated CPU devices (fsdp=2, gradient accumulation), in a child process -------------

SHARDED = ["train.mesh=[1,2,1]", "train.grad_accum=2", "train.total_steps=4", "eval.max_examples=16",
           "eval.before_training=false"]
RESULT_PREFIX = "VECTORIZED_SHARDED_REPORT "


def sharded_child(output_dir: Path) -> dict:
    """Two trials alone and together on the 2-device mesh: losses, accuracies, step compilations."""
    alone = [run_trial(trial_config(output_dir / f"a{k}", *SHARDED, *TRIALS[k][:2])) for k in range(2)]
    COMPILES.count, COMPILES.active = 0, True
    together = run_trials([trial_config(output_dir / f"t{k}", *SHARDED, *TRIALS[k][:2]) for k in range(2)])
    COMPILES.active = False
    return {
        "devices": jax.device_count(),
        "compilations": COMPILES.count,
        "alone": [[r.loss for r in result.history] for result in alone],
        "together": [[r.loss for r in result.history] for result in together],
        "accuracy": [[a.metrics["test_accuracy"], b.metrics["test_accuracy"]] for a, b in zip(alone, together)],
    }


@pytest.mark.slow
def test_a_group_on_a_two_device_mesh_matches_its_trials_alone(rt_dir, tmp_path):
    env = {**os.environ, "ROTTEN_TOMATOES_DIR": str(rt_dir), "JAX_PLATFORMS": "cpu",
           "LLM_SWEEPER_CACHE": os.environ["LLM_SWEEPER_CACHE"],
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    child = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert child.returncode == 0 and lines, f"2-device child failed:\n{child.stderr[-6000:]}"
    report = json.loads(lines[-1][len(RESULT_PREFIX):])
    assert report["devices"] == 2 and report["compilations"] == 1
    for alone, together in zip(report["alone"], report["together"]):
        assert together == pytest.approx(alone, rel=LOSS_RTOL)
    assert all(a == b for a, b in report["accuracy"])


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(sharded_child(Path(sys.argv[1]))), flush=True)
