"""trainer.plan: the planner's per-device figures equal a real compile's, and its verdicts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from trainer.config import ConfigError
from trainer.plan import mesh_devices, parse_bytes, plan, split_arguments, tpu_devices

REPO = Path(__file__).resolve().parents[1]


def tiny(tmp_path, *overrides):
    from trainer.distributed import compose_trial

    return compose_trial(["model=tiny", "train.batch_size=8", *overrides], str(tmp_path))


def real_compile(cfg):
    """The tiny preset's step compiled with real weights and a real batch, as run_trial builds them."""
    from flax import nnx

    from trainer import sharding
    from trainer.config import to_trial_config
    from trainer.model import LlamaShape, init_model
    from trainer.train import make_train_step
    from trainer.trial import initial_state

    cfg = to_trial_config(cfg)
    graphdef, params = nnx.split(init_model(LlamaShape.from_config(cfg.model), cfg.seed), nnx.Param)
    optimizer, graphdef, state = initial_state(cfg, graphdef, params, 1000)
    mesh = sharding.make_mesh(cfg.train.mesh)
    state = sharding.shard_state(state, mesh)
    rows = (cfg.train.batch_size, cfg.data.seq_len)
    batch = {key: np.ones(rows, np.int32) for key in ("inputs", "targets", "segment_ids", "positions")}
    batch = sharding.put_batch({**batch, "loss_mask": np.ones(rows, np.float32)}, mesh)
    step = make_train_step(graphdef, optimizer, cfg.train.grad_accum)
    analysis = step.lower(state, batch).compile().memory_analysis()
    weights = sum(x.nbytes for x in jax.tree.leaves((state.params, state.frozen)))
    return analysis, weights, sum(x.nbytes for x in jax.tree.leaves(state)) - weights


@pytest.mark.slow
def test_the_plan_of_the_tiny_preset_equals_a_real_compile(tmp_path):
    cfg = tiny(tmp_path)
    planned = plan(cfg, device_memory=parse_bytes("1GiB"))
    analysis, weights, optimizer = real_compile(cfg)
    assert planned.devices == 1 and planned.fits
    assert planned.params == weights > 0 and planned.optimizer == optimizer > planned.params  # Adam: 2 moments
    assert planned.temporaries == analysis.temp_size_in_bytes > 0
    assert planned.arguments == analysis.argument_size_in_bytes
    assert planned.outputs == analysis.output_size_in_bytes and planned.aliased == analysis.alias_size_in_bytes
    assert planned.batch == 8 * 128 * 4 * 5  # five (8, 128) arrays of 4 bytes
    assert planned.peak == (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes
                            + analysis.generated_code_size_in_bytes)


def figure(out: str, name: str) -> float:
    value, unit = re.search(rf"{name}\s+([0-9.]+) (GiB|MiB|KiB|B)", out).groups()
    return float(value) * {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[unit]


@pytest.mark.slow
def test_the_command_splits_weights_over_simulated_devices_and_says_whether_they_fit(sweeper_env):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "trainer.plan", "model=tiny", "train.batch_size=8", *args],
                              cwd=REPO, env=sweeper_env, capture_output=True, text=True, timeout=300)

    one, four = run("train.mesh=[1,1,1]", "plan.device_memory=1GiB"), run("train.mesh=[1,4,1]", "plan.device_memory=1MiB")
    assert one.returncode == 0 and "-> fits" in one.stdout, one.stderr
    assert four.returncode == 1 and "4 devices" in four.stdout and "does NOT fit" in four.stdout, four.stderr
    # fsdp=4 splits every matrix's hidden dimension: a quarter of the weights, plus the replicated norm scales.
    ratio = figure(four.stdout, "parameters") / figure(one.stdout, "parameters")
    assert ratio == pytest.approx(0.25, abs=0.005)  # the table prints 3 significant digits


def test_bad_planner_options_name_the_value_and_the_fix():
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("32GB") == 32 * 10**9 and parse_bytes("1024") == 1024
    with pytest.raises(ConfigError, match=r"plan\.device_memory='lots'.*16GiB"):
        parse_bytes("lots")
    with pytest.raises(ConfigError, match=r"plan\.memory is not a planner option.*plan\.device_memory"):
        split_arguments(["model=tiny", "plan.memory=16GiB"])
    assert split_arguments(["model=tiny", "plan.devices=8"]) == ({"devices": "8"}, ["model=tiny"])
    with pytest.raises(ConfigError, match=r"train\.mesh=\[1, -1, 1\].*plan\.devices=8"):
        mesh_devices([1, -1, 1], None)
    assert mesh_devices([1, 4, 2], None) == 8 and mesh_devices([1, -1, 1], "8") == 8


def test_a_tpu_target_without_libtpu_says_how_to_get_it():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"plan\.tpu=v4-8 .*pip install libtpu"):
            tpu_devices("v4-8")
    else:
        pytest.skip("libtpu is installed here; the README's TPU figures exercise it")
