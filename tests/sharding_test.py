"""Sharding: the same losses on 8 simulated CPU devices as on one, the table's layouts, mesh errors.

XLA fixes the CPU device count when JAX initialises, and the rest of the suite runs in this
process on one device, so the 8-device part runs this file as a script in a child process
(`python tests/sharding_test.py`) and the tests assert on the JSON it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from trainer.config import ConfigError, OptimConfig
from trainer.model import LlamaShape, init_model
from trainer.optim import Hyperparams, Optimizer
from trainer.sharding import make_mesh, param_spec, path_name, state_shardings
from trainer.train import create_state

REPO = Path(__file__).resolve().parents[1]
DEVICE_COUNT = 8
RESULT_PREFIX = "SHARDING_RESULT "
LOSS_RTOL = 1e-5

SHAPE = LlamaShape(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
)
BATCH, LENGTH, STEPS = 8, 32, 3
# name -> (mesh, grad_accum, pin_state_shardings?); 1,2,4 puts mp=4 over 2 kv heads (the
# replication fallback); the plain runs check that jit follows the input shardings by itself.
SHARDED_RUNS = {
    "1,4,2": ("1,4,2", 1, False),
    "2,2,2": ("2,2,2", 1, False),
    "1,2,4": ("1,2,4", 1, False),
    "1,4,2 accum2 pinned": ("1,4,2", 2, True),
}


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens in packed rows: two segments per row, then padding that carries no loss."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, SHAPE.vocab_size, (BATCH, LENGTH + 1)).astype(np.int32)
    segment_ids = np.zeros((BATCH, LENGTH), np.int32)
    positions = np.zeros((BATCH, LENGTH), np.int32)
    for row in range(BATCH):
        first, second = 12 + row, 24 + row // 2  # row-dependent boundaries
        segment_ids[row, :first], segment_ids[row, first:second] = 1, 2
        positions[row, :first] = np.arange(first)
        positions[row, first:second] = np.arange(second - first)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


def new_state(optimizer: Optimizer):
    hparams = Hyperparams.create(lr=3e-3, warmup=0, total_steps=100, cfg=OptimConfig())
    return create_state(init_model(SHAPE, seed=0), optimizer, hparams)


def _spec_json(spec: P) -> list:
    """A spec as JSON, trailing Nones dropped: jit reports P('fsdp','mp') for P('fsdp','mp',None)."""
    entries = [list(e) if isinstance(e, tuple) else e for e in spec]
    while entries and entries[-1] is None:
        entries.pop()
    return entries


def simulated_devices_report() -> dict:
    """Runs in the child with 8 CPU devices: train on each mesh, describe where arrays ended up."""
    from trainer.sharding import pin_state_shardings, put_batch, shard_state
    from trainer.train import make_train_step

    assert jax.device_count() == DEVICE_COUNT, jax.devices()
    optimizer = Optimizer(weight_decay_mask="no_norms_or_embeddings")
    batch = packed_batch()
    compilations = [0]

    def count_compilation(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compilations[0] += 1

    jax.monitoring.register_event_duration_secs_listener(count_compilation)

    def train(mesh, grad_accum: int, pin: bool = False):
        """(final state, loss per step, compilations per step)."""
        graphdef, state = new_state(optimizer)
        state = shard_state(state, mesh)
        step_fn = make_train_step(graphdef, optimizer, grad_accum)
        if pin:
            step_fn = pin_state_shardings(step_fn, state, mesh)
        losses, compiled = [], []
        for _ in range(STEPS):
            before = compilations[0]
            state, metrics = step_fn(state, put_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
            compiled.append(compilations[0] - before)
        return state, losses, compiled

    def describe(array) -> dict:
        shard_shape = list(array.addressable_shards[0].data.shape)
        return {"spec": _spec_json(array.sharding.spec), "shard_shape": shard_shape}

    report = {"device_count": jax.device_count()}
    _, report["reference_losses"], _ = train(make_mesh([1, 1, 1], jax.devices()[:1]), 1)
    report["runs"] = {}
    for name, (sizes, grad_accum, pin) in SHARDED_RUNS.items():
        mesh = make_mesh(sizes)
        state, losses, compiled = train(mesh, grad_accum, pin)
        expected = jax.tree_util.tree_flatten_with_path(state_shardings(state, mesh))[0]
        actual = jax.tree.leaves(state)
        attention = state.params["layers"][1]["attention"]
        mu = state.opt_state.inner_state[0].mu
        report["runs"][name] = {
            "mesh": dict(mesh.shape),
            "losses": losses,
            "compilations": compiled,
            "not_as_planned": [
                path_name(path) for (path, want), array in zip(expected, actual)
                if not array.sharding.is_equivalent_to(want, array.ndim)
            ],
            "q": describe(attention["q_DxNxH"][...]),
            "k": describe(attention["k_DxKxH"][...]),
            "o": describe(attention["o_NxHxD"][...]),
            "embed": describe(state.params["embed_VxD"][...]),
            "mu_q": describe(mu["layers"][1]["attention"]["q_DxNxH"][...]),
            "mu_down": describe(mu["layers"][1]["mlp"]["down_FxD"][...]),
            "step": describe(state.step),
        }
    report["inferred"] = {sizes: dict(make_mesh(sizes).shape) for sizes in ("1,-1,2", "-1,2,2", "[2, 4, -1]")}
    report["errors"] = {}
    for label, attempt in {
        "mesh_3x1x2": lambda: make_mesh([3, 1, 2]),
        "mesh_1x-1x3": lambda: make_mesh([1, -1, 3]),
        "batch_6": lambda: put_batch({"inputs": np.zeros((6, LENGTH), np.int32)}, make_mesh([1, 4, 2])),
    }.items():
        try:
            attempt()
            report["errors"][label] = None
        except ConfigError as error:
            report["errors"][label] = str(error)
    return report


@pytest.fixture(scope="module")
def report() -> dict:
    """The child's JSON report; about 30 s of compiling and training on 8 simulated devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICE_COUNT}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert child.returncode == 0 and lines, f"8-device child failed:\n{child.stderr[-6000:]}"
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def max_relative_difference(losses, reference) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("run", list(SHARDED_RUNS))
def test_sharded_losses_match_one_device(report, run):
    losses, reference = report["runs"][run]["losses"], report["reference_losses"]
    assert len(losses) == STEPS
    assert reference[-1] < reference[0]  # the steps really train
    assert max_relative_difference(losses, reference) <= LOSS_RTOL, (losses, reference)


@pytest.mark.slow
@pytest.mark.parametrize("run", list(SHARDED_RUNS))
def test_whole_state_keeps_planned_shardings_after_steps(report, run):
    assert report["runs"][run]["not_as_planned"] == []


@pytest.mark.slow
@pytest.mark.parametrize("run", list(SHARDED_RUNS))
def test_step_compiles_once_per_mesh(report, run):
    # A later compilation would mean the step returned a state laid out unlike its input.
    assert report["runs"][run]["compilations"] == [1] + [0] * (STEPS - 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "run, q_spec, q_shard, k_spec, k_shard",
    [
        ("1,4,2", ["fsdp", "mp"], [16, 2, 16], ["fsdp", "mp"], [16, 1, 16]),
        ("2,2,2", ["fsdp", "mp"], [32, 2, 16], ["fsdp", "mp"], [32, 1, 16]),
        # 2 kv heads cannot split 4 ways: k and v keep fsdp and replicate their head dimension.
        ("1,2,4", ["fsdp", "mp"], [32, 1, 16], ["fsdp"], [32, 2, 16]),
    ],
)
def test_attention_weights_are_really_split(report, run, q_spec, q_shard, k_spec, k_shard):
    described = report["runs"][run]
    assert described["q"] == {"spec": q_spec, "shard_shape": q_shard}
    assert described["k"] == {"spec": k_spec, "shard_shape": k_shard}
    assert described["mu_q"] == described["q"]


@pytest.mark.slow
def test_other_weights_and_moments_on_mesh_1x4x2(report):
    described = report["runs"]["1,4,2"]
    assert described["mesh"] == {"dp": 1, "fsdp": 4, "mp": 2}
    assert described["o"] == {"spec": ["mp", None, "fsdp"], "shard_shape": [2, 16, 16]}
    assert described["embed"] == {"spec": ["mp", "fsdp"], "shard_shape": [128, 16]}
    assert described["mu_down"] == {"spec": ["mp", "fsdp"], "shard_shape": [64, 16]}
    assert described["step"] == {"spec": [], "shard_shape": []}


@pytest.mark.slow
def test_minus_one_is_inferred_from_eight_devices(report):
    assert report["device_count"] == DEVICE_COUNT
    assert report["inferred"] == {
        "1,-1,2": {"dp": 1, "fsdp": 4, "mp": 2},
        "-1,2,2": {"dp": 2, "fsdp": 2, "mp": 2},
        "[2, 4, -1]": {"dp": 2, "fsdp": 4, "mp": 1},
    }


@pytest.mark.slow
def test_mesh_and_batch_errors_on_eight_devices(report):
    errors = report["errors"]
    for label in ("mesh_3x1x2", "mesh_1x-1x3"):
        assert errors[label] is not None
        assert "8 device" in errors[label] and "train.mesh=[1,-1,1]" in errors[label]
    assert "[3, 1, 2]" in errors["mesh_3x1x2"]
    assert "[1, -1, 3]" in errors["mesh_1x-1x3"]
    assert errors["batch_6"] is not None and "batch_size=6" in errors["batch_6"] and "dp*fsdp=4" in errors["batch_6"]


# One-device checks, run in this process.


def test_make_mesh_parses_strings_and_infers_on_one_device():
    devices = jax.devices()[:1]
    assert dict(make_mesh("1,-1,1", devices).shape) == {"dp": 1, "fsdp": 1, "mp": 1}
    assert make_mesh([-1, 1, 1], devices).axis_names == ("dp", "fsdp", "mp")


@pytest.mark.parametrize(
    "sizes, fragment",
    [
        ([2, 2, 2], "[2, 2, 2]"),
        ([1, -1, -1], "more than one -1"),
        ([1, 1], "three sizes"),
        ("1,x,1", "three integers"),
        ([1, 0, 1], "each >= 1"),
    ],
)
def test_bad_mesh_is_a_config_error(sizes, fragment):
    with pytest.raises(ConfigError, match="train.mesh") as caught:
        make_mesh(sizes, jax.devices()[:1])
    assert fragment in str(caught.value)
    assert "train.mesh=[1,-1,1]" in str(caught.value)


def test_unknown_parameter_names_its_path():
    mesh = AbstractMesh((1, 4, 2), ("dp", "fsdp", "mp"))
    with pytest.raises(ValueError, match="layers/0/attention/bias_N"):
        param_spec("layers/0/attention/bias_N", (4,), mesh)


def test_indivisible_dimension_is_replicated():
    mesh = AbstractMesh((1, 4, 4), ("dp", "fsdp", "mp"))
    assert param_spec("layers/0/attention/k_DxKxH", (64, 2, 16), mesh) == P("fsdp", None, None)
    assert param_spec("layers/0/attention/q_DxNxH", (64, 4, 16), mesh) == P("fsdp", "mp", None)
    assert param_spec("embed_VxD", (250, 64), mesh) == P(None, "fsdp")


def test_every_weight_has_a_rule_and_moments_mirror_it():
    _, state = new_state(Optimizer(weight_decay_mask="no_norms_or_embeddings"))
    shardings = state_shardings(state, make_mesh([1, 1, 1], jax.devices()[:1]))
    params = {path_name(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings.params)[0]}
    assert params["layers/1/attention/q_DxNxH"] == P("fsdp", "mp", None)
    assert params["layers/1/mlp/gate_DxF"] == P("fsdp", "mp")
    assert params["final_norm/scale"] == P(None)
    assert params["head_DxV"] == P("fsdp", "mp")
    moments = 0
    for path, sharding in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]:
        name = path_name(path)
        if "/mu/" in name or "/nu/" in name:
            moments += 1
            assert sharding.spec == params[name.split("/mu/")[-1].split("/nu/")[-1]], name
        else:
            assert sharding.spec == P(), name  # counts and injected hyperparameters
    assert moments == 2 * len(params)
    for leaf in (shardings.step, shardings.tokens_seen, *jax.tree.leaves(shardings.hparams)):
        assert leaf.spec == P()


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(simulated_devices_report()), flush=True)
