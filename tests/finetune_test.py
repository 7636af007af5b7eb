"""Fine-tuning methods: LoRA adapters beside frozen weights, top layers only, full."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer import finetune
from trainer.config import ConfigError, FinetuneConfig, OptimConfig, TrialConfig, validate
from trainer.model import LlamaShape, LoRAParam, init_model
from trainer.optim import Hyperparams, Optimizer
from trainer.sharding import path_name
from trainer.train import all_params, create_state, make_train_step

SHAPE = LlamaShape(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, init_std=0.1, tied_embeddings=True,
)
ALL_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def batch(seed: int = 0, rows: int = 4, length: int = 32) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(0, SHAPE.vocab_size, (rows, length)).astype(np.int32),
        "targets": rng.integers(0, SHAPE.vocab_size, (rows, length)).astype(np.int32),
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32),
        "loss_mask": np.ones((rows, length), np.float32),
    }


def one_step(cfg: FinetuneConfig, seed: int = 0, lr: float = 1e-2):
    model, trainable = finetune.prepare(init_model(SHAPE, seed=0), cfg, seed)
    optimizer = Optimizer()
    hparams = Hyperparams.create(lr=lr, warmup=0, total_steps=10, cfg=OptimConfig(weight_decay=0.0))
    graphdef, state = create_state(model, optimizer, hparams, trainable, seed=seed)
    before = jax.tree.map(np.asarray, all_params(state))
    step = make_train_step(graphdef, optimizer, 1, None, cfg.method == "lora" and cfg.dropout > 0)
    state, metrics = step(state, jax.device_put(batch()))
    return graphdef, before, state, metrics


def flat(state) -> dict[str, np.ndarray]:
    return {path_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def test_lora_with_b_at_zero_gives_exactly_the_base_logits():
    tokens = jnp.asarray(batch()["inputs"])
    base = init_model(SHAPE, seed=0)
    expected = np.asarray(base(tokens))
    adapted, _ = finetune.prepare(init_model(SHAPE, seed=0), FinetuneConfig(method="lora", targets=ALL_TARGETS), 3)
    # The A matrices are random, so the adapters are really in the computation; only B is zero.
    a = adapted.layers[0].attention.adapters["q"].a_IxR[...]
    assert float(jnp.abs(a).max()) > 0
    np.testing.assert_array_equal(np.asarray(adapted(tokens)), expected)


def test_lora_trains_only_the_adapters_and_keeps_the_base_frozen():
    cfg = FinetuneConfig(method="lora", rank=4, targets=["q", "v", "down"])
    graphdef, before, state, metrics = one_step(cfg)
    trained = jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert trained and all(isinstance(v, LoRAParam) for v in trained)
    # 3 layers x (q, v, down) x (A, B): the optimizer holds moments for these and nothing else.
    assert len(jax.tree.leaves(state.params)) == 3 * 3 * 2
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if np.ndim(leaf) > 0]
    assert sum(m.size for m in moments) == 2 * sum(p.size for p in jax.tree.leaves(state.params))
    after = flat(all_params(state))
    changed = {name for name, value in flat(before).items() if not np.array_equal(value, after[name])}
    assert changed and all("adapters" in name for name in changed)
    assert any("b_RxO" in name for name in changed)  # B left zero: the update reached the adapters
    assert np.isfinite(float(metrics["loss"]))


def test_top_layers_train_only_the_top_blocks_and_the_final_norm():
    graphdef, before, state, _ = one_step(FinetuneConfig(method="top_layers", layers=1))
    after = flat(all_params(state))
    changed = {name for name, value in flat(before).items() if not np.array_equal(value, after[name])}
    assert changed
    assert all(name.startswith(("layers/2/", "final_norm/")) for name in changed), sorted(changed)
    assert not any(name.startswith("embed") for name in changed)  # the tied head/embedding is frozen


def test_full_fine_tuning_trains_everything_and_freezes_nothing():
    _, before, state, _ = one_step(FinetuneConfig(method="full"))
    assert jax.tree.leaves(state.frozen) == []
    after = flat(all_params(state))
    assert all(not np.array_equal(value, after[name]) for name, value in flat(before).items())


def test_lora_dropout_is_seeded_and_changes_the_update():
    with_dropout = FinetuneConfig(method="lora", dropout=0.5, targets=ALL_TARGETS)
    runs = [flat(one_step(with_dropout, seed=seed)[2].params) for seed in (1, 1)]
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])
    no_dropout = flat(one_step(FinetuneConfig(method="lora", dropout=0.0, targets=ALL_TARGETS), seed=1)[2].params)
    assert any(not np.array_equal(runs[0][name], no_dropout[name]) for name in no_dropout)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "adapters"}, "finetune.method='adapters'"),
        ({"method": "lora", "rank": 0}, "finetune.rank=0"),
        ({"method": "lora", "targets": ["q", "qkv"]}, r"finetune.targets=\['q', 'qkv'\]"),
        ({"method": "lora", "dropout": 1.0}, "finetune.dropout=1.0"),
        ({"method": "top_layers", "layers": 0}, "finetune.layers=0"),
    ],
)
def test_bad_finetune_values_name_the_value(overrides, message):
    cfg = TrialConfig()
    for key, value in overrides.items():
        setattr(cfg.finetune, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
