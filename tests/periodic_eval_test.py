"""Validation while training: train_loop's evaluate hook (cadence, stopping) and the validation subset."""

from __future__ import annotations

from collections import Counter, namedtuple

import jax.numpy as jnp
import pytest

from trainer.config import ConfigError, EvalConfig, TrialConfig, validate
from trainer.periodic_eval import validation_subset
from trainer.train import train_loop

FakeState = namedtuple("FakeState", "step")


def counting_step(calls: list):
    """A step function that only counts: each call returns the next state and finite metrics."""

    def step_fn(state, batch):
        calls.append(int(state.step) + 1)
        metrics = {name: jnp.float32(1.0) for name in ("loss", "learning_rate", "grad_norm", "tokens", "tokens_seen")}
        return FakeState(state.step + 1), metrics

    return step_fn


def endless_batches():
    while True:
        yield {}


def test_evaluate_runs_every_n_steps_on_the_state_after_that_step():
    seen = []
    outcome = train_loop(
        counting_step([]), FakeState(jnp.int32(0)), endless_batches(), 10,
        evaluate=lambda step, state: seen.append((step, int(state.step))), evaluate_every=3,
    )
    # Steps 3, 6, 9; never after the last step (the final evaluation covers it).
    assert seen == [(3, 3), (6, 6), (9, 9)]
    assert outcome.status == "finished" and outcome.steps_done == 10
    assert [r.step for r in outcome.history] == list(range(1, 11))


def test_a_reason_from_evaluate_stops_training_there_and_keeps_the_curve():
    calls: list[int] = []
    outcome = train_loop(
        counting_step(calls), FakeState(jnp.int32(0)), endless_batches(), 20,
        evaluate=lambda step, state: "behind the others" if step == 6 else None, evaluate_every=2,
    )
    assert outcome.status == "pruned" and outcome.message == "behind the others"
    assert outcome.steps_done == 6 and calls == list(range(1, 7))  # no step after the decision
    assert [r.step for r in outcome.history] == list(range(1, 7))  # every step up to it was recorded
    assert int(outcome.state.step) == 6


def test_without_every_steps_evaluate_is_never_called():
    seen = []
    train_loop(counting_step([]), FakeState(jnp.int32(0)), endless_batches(), 5,
               evaluate=lambda step, state: seen.append(step), evaluate_every=0)
    assert seen == []


def test_validation_subset_is_class_stratified_seeded_and_sized(rt_splits, tiny_tokenizer, tmp_path):
    def subset(examples: int, seed: int):
        cfg = TrialConfig(seed=seed, eval=EvalConfig(every_examples=examples))
        cfg.data.cache_dir = str(tmp_path)
        return validation_subset(cfg, rt_splits, tiny_tokenizer)

    first = subset(100, seed=0)
    whole = Counter(e.label for e in rt_splits["validation"])
    assert len(first) == 100
    # The split's class shares, to the example (the Hugging Face validation split is 533 / 533).
    assert Counter(first.labels.tolist()) == {label: round(100 * n / sum(whole.values())) for label, n in whole.items()}
    again, other = subset(100, seed=0), subset(100, seed=1)
    assert [p.tolist() for p in again.prompts] == [p.tolist() for p in first.prompts]
    assert [p.tolist() for p in other.prompts] != [p.tolist() for p in first.prompts]
    assert len(subset(10_000, seed=0)) == len(rt_splits["validation"])  # asking for more takes the split


@pytest.mark.parametrize("key, value", [("every_steps", -1), ("every_examples", 0)])
def test_bad_periodic_settings_fail_validation_naming_the_key(key, value):
    cfg = TrialConfig()
    setattr(cfg.eval, key, value)
    with pytest.raises(ConfigError, match=f"eval.{key}={value}"):
        validate(cfg)
