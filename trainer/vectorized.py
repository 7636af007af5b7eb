"""Several trials of one model trained together: the train step vmapped over trials, jitted once.

`run_trials(cfgs) -> [TrialResult]` gives each trial the result `run_trial` gives it alone (to
float tolerance), but trains the K trials in one program: their states are stacked along a
leading axis and each step takes one batch per trial. Trials may differ only in what rides in
the state or the data (lr, warmup, betas, weight decay, schedule, clipping, length; ratio and
seed); `group_compatible` sorts a sweep's configs into such groups.

A group runs until its longest trial is done. A trial that has finished (or diverged) keeps its
state through an `active` mask, but its lane of the vmapped step is still computed: a group of
trials with steps S_1..S_K costs K * max(S) trial-steps for sum(S) useful ones. Group trials of
equal length where that matters. Memory grows the same way: K train states (weights, Adam
moments) live on the device at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trainer import packing
from trainer import sharding as sharding_lib
from trainer.config import ConfigError, TrialConfig, to_trial_config, validate
from trainer.export import save_trial_model
from trainer.optim import Optimizer
from trainer.train import (
    Batch, StepRecord, TrainOutcome, TrainState, all_params, build_train_step, max_loss_positions,
)
from trainer.trial import (
    Evaluation, TrialData, TrialResult, enable_compilation_cache, initial_state, load_model, prepare_data,
    trial_result, trial_total_steps, uses_dropout,
)

# Keys in which the trials of one group may differ; every other key must be equal.
PER_TRIAL_KEYS = (
    "lr", "warmup", "ratio", "seed", "output_dir",
    "optim.b1", "optim.b2", "optim.weight_decay", "optim.end_lr", "optim.decay_steps", "optim.clip_grad_norm",
    "train.epochs", "train.total_steps", "train.log_every",
)


def _flat(cfg: TrialConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(values: dict, prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(dataclasses.asdict(cfg), "")
    return flat


def shared_part(cfg: Any) -> dict[str, Any]:
    """The config's keys that every trial of a group must share, flattened."""
    return {key: value for key, value in _flat(to_trial_config(cfg)).items() if key not in PER_TRIAL_KEYS}


def group_compatible(cfgs: Sequence[Any]) -> list[list[int]]:
    """Indices of `cfgs` in groups that can train together, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, cfg in enumerate(cfgs):
        if to_trial_config(cfg).model.kind != "llama":  # nothing to vmap: each goes alone, as run_trial runs it
            groups[f"alone {index}"] = [index]
            continue
        key = json.dumps(shared_part(cfg), sort_keys=True, default=str)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def check_compatible(cfgs: Sequence[TrialConfig]) -> None:
    """Raise ConfigError naming the first key in which a trial differs from trial 1 where it may not."""
    first = shared_part(cfgs[0])
    for number, cfg in enumerate(cfgs[1:], start=2):
        other = shared_part(cfg)
        for key in first:
            if first[key] != other[key]:
                raise ConfigError(
                    f"trial {number} has {key}={other[key]!r} but trial 1 has {key}={first[key]!r}: vectorised "
                    f"trials may differ only in {', '.join(k for k in PER_TRIAL_KEYS if k != 'output_dir')}; "
                    f"run it in another group (trainer.vectorized.group_compatible sorts configs into groups)"
                )


@functools.lru_cache(maxsize=None)
def make_vectorized_step(
    graphdef: nnx.GraphDef, optimizer: Optimizer, grad_accum: int, loss_positions: Optional[int] = None,
    dropout: bool = False,
) -> Callable:
    """`vectorized_train_step(states, alive, batches, limits) -> (states, alive, metrics)`, jitted once.

    Every leaf of `states` and `batches` has a leading trial axis K. Trial k takes its step when
    it is `alive` (no non-finite loss yet) and has done fewer than `limits[k]` steps; otherwise it
    keeps its state. A non-finite loss clears `alive`, so a diverged trial stays as it was at the
    step that diverged and never disturbs the others.
    """
    train_step = build_train_step(graphdef, optimizer, grad_accum, loss_positions, dropout)

    def trial_step(state: TrainState, alive: jax.Array, batch: Batch, limit: jax.Array):
        active = alive & (state.step < limit)
        new_state, metrics = train_step(state, batch)
        kept = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
        return kept, alive & (jnp.isfinite(metrics["loss"]) | ~active), metrics

    def vectorized_train_step(states: TrainState, alive: jax.Array, batches: Batch, limits: jax.Array):
        return jax.vmap(trial_step)(states, alive, batches, limits)

    return jax.jit(vectorized_train_step, donate_argnums=(0, 1))


@jax.jit
def stack(trees: Sequence[Any]) -> Any:
    """One pytree whose leaves are the trees' leaves stacked along a new leading axis (one program)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def trial_slice(tree: Any, index: int) -> Any:
    return jax.tree.map(lambda leaf: leaf[index], tree)


def stacked_state_shardings(state: TrainState, mesh) -> Any:
    """A single trial's state shardings (trainer.sharding) with an unsplit trial axis in front."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, P(None, *s.spec)), sharding_lib.state_shardings(state, mesh),
    )


def put_batches(batches: Sequence[Batch], mesh) -> Batch:
    """K host batches of (B, T) arrays as one (K, B, T) batch, rows split over the data axes."""
    stacked = {key: np.stack([np.asarray(batch[key]) for batch in batches]) for key in batches[0]}
    return jax.device_put(stacked, NamedSharding(mesh, P(None, sharding_lib.BATCH_AXES, None)))


def vectorized_loop(
    step_fn: Callable,
    states: TrainState,
    batch_streams: Sequence[Iterator[Batch]],
    total_steps: Sequence[int],
    *,
    put_batches: Callable[[Sequence[Batch]], Batch],
    callbacks: Sequence[Optional[Callable[[StepRecord], None]]],
    replicated: Any = None,
) -> tuple[TrainState, list[TrainOutcome]]:
    """`train_loop` for K stacked trials: (final stacked states, one outcome per trial).

    Runs max(total_steps) steps, or until every trial has finished or diverged. Metrics are read
    one step late, as in train_loop. A trial's tokens/s is its own tokens over the group's step
    time: its share of the throughput. An outcome's `state` is None: slice `states` instead.
    """
    count = len(total_steps)
    limits = jax.device_put(np.asarray(total_steps, np.int32), replicated)
    alive = jax.device_put(np.ones((count,), bool), replicated)
    histories: list[list[StepRecord]] = [[] for _ in range(count)]
    status = ["running"] * count
    ended_at = [0.0] * count  # perf_counter when the trial's last step was read back
    compile_seconds = 0.0
    start = last_time = time.perf_counter()
    last_batches: list[Batch] = [next(stream) for stream in batch_streams]
    next_batch = put_batches(last_batches)
    pending: Optional[tuple[int, dict]] = None

    def settle(record_step: int, metrics: dict) -> None:
        nonlocal last_time
        values = jax.device_get(metrics)
        now = time.perf_counter()
        elapsed = compile_seconds if record_step == 1 else max(now - last_time, 1e-9)
        last_time = now
        for k in range(count):
            if status[k] != "running":
                continue
            record = StepRecord.from_metrics(record_step, {name: v[k] for name, v in values.items()}, elapsed)
            histories[k].append(record)
            if callbacks[k] is not None:
                callbacks[k](record)
            if not math.isfinite(record.loss):
                status[k], ended_at[k] = "diverged", now
            elif record_step == total_steps[k]:
                status[k], ended_at[k] = "finished", now

    longest = max(total_steps)
    for step in range(1, longest + 1):
        if "running" not in status:
            break  # the rest diverged or finished (known one step late)
        launched = time.perf_counter()
        states, alive, metrics = step_fn(states, alive, next_batch, limits)
        if step == 1:
            jax.block_until_ready(metrics["loss"])
            compile_seconds = time.perf_counter() - launched
            start = last_time = time.perf_counter()
        if step < longest:
            # A trial past its last step gets its last batch again: its lane is computed, not kept.
            last_batches = [
                next(stream) if step < total_steps[k] and status[k] == "running" else last_batches[k]
                for k, stream in enumerate(batch_streams)
            ]
            next_batch = put_batches(last_batches)
        if pending is not None:
            settle(*pending)
        pending = (step, metrics)
    if pending is not None:
        settle(*pending)
    jax.block_until_ready(states.step)
    outcomes = []
    for k in range(count):
        history = histories[k]
        diverged = status[k] == "diverged"
        outcomes.append(TrainOutcome(
            state=None,
            status="diverged" if diverged else "finished",
            steps_done=history[-1].step if diverged else total_steps[k],
            history=history,
            message=f"diverged at step {history[-1].step}: loss is {history[-1].loss}" if diverged else "",
            compile_seconds=compile_seconds,
            train_seconds=(ended_at[k] or time.perf_counter()) - start,
        ))
    return states, outcomes


def run_trials(
    cfgs: Sequence[Any], callbacks: Optional[Sequence[Optional[Callable[[StepRecord], None]]]] = None
) -> list[TrialResult]:
    """Train compatible trials together; each TrialResult is what run_trial(cfgs[k]) returns.

    Timings: data_seconds, model_seconds and the eval seconds are each trial's own; compile_seconds
    and train_seconds are the group's (train_seconds up to the trial's last step); wall_seconds
    is the group's wall time over K, the trial's share, so a sweep's wall times still add up.
    The metric vectorized_trials records K.
    """
    wall_start = time.perf_counter()
    trial_cfgs = [to_trial_config(cfg) for cfg in cfgs]
    if not trial_cfgs:
        return []
    callbacks = list(callbacks) if callbacks is not None else [None] * len(trial_cfgs)
    if len(callbacks) != len(trial_cfgs):
        raise ValueError(f"{len(callbacks)} callbacks for {len(trial_cfgs)} configs; pass one per config, or None")
    for cfg in trial_cfgs:
        validate(cfg)
        if cfg.model.kind != "llama":
            raise ConfigError(f"model.kind={cfg.model.kind!r} trials don't train as vectorised LLaMAs; run them with run_trial")
    check_compatible(trial_cfgs)
    enable_compilation_cache(trial_cfgs[0])
    for cfg in trial_cfgs:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    first = trial_cfgs[0]

    datas: list[TrialData] = []
    timings: list[dict[str, float]] = []
    for cfg in trial_cfgs:
        datas.append(prepare_data(cfg))
        timings.append({"data_seconds": datas[-1].seconds})
    mesh = sharding_lib.make_mesh(first.train.mesh)
    sharding_lib.check_batch_size(first.train.batch_size, mesh)

    shapes, states, evaluations, total_steps = [], [], [], []
    for cfg, data, timing in zip(trial_cfgs, datas, timings):
        t0 = time.perf_counter()
        shape, graphdef, base_params = load_model(cfg, data.tokenizer)
        timing["model_seconds"] = time.perf_counter() - t0
        total_steps.append(trial_total_steps(cfg, data.rows))
        # No copy: stacking copies, and only the stacked state is donated.
        optimizer, graphdef, state = initial_state(cfg, graphdef, base_params, total_steps[-1], copy=False)
        shapes.append(shape)
        states.append(state)
        evaluations.append(Evaluation(cfg, data, graphdef))
        timing["eval_before_seconds"] = (
            evaluations[-1].before_training(all_params(state)) if cfg.eval.before_training else 0.0
        )

    # One static bound for the group: the largest any trial's rows need (None: the full head).
    bounds = [max_loss_positions(data.rows.loss_mask, first.data.seq_len) for data in datas]
    loss_positions = None if None in bounds else max(bounds)
    stacked = stack(states)
    del states
    replicated = NamedSharding(mesh, P())
    # Placed as sharding.shard_state places one trial's state, with the trial axis unsplit.
    shardings = stacked_state_shardings(jax.eval_shape(lambda s: trial_slice(s, 0), stacked), mesh)
    stacked = jax.device_put(stacked, shardings)
    step_fn = make_vectorized_step(graphdef, optimizer, first.train.grad_accum, loss_positions, uses_dropout(first))
    if len(mesh.devices.flat) > 1:
        # As sharding.pin_state_shardings does for one trial: the planned layout in and out.
        step_fn = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(shardings, replicated, None))
    streams = [packing.batches(data.rows, cfg.train.batch_size, cfg.seed) for cfg, data in zip(trial_cfgs, datas)]
    stacked, outcomes = vectorized_loop(
        step_fn, stacked, streams, total_steps,
        put_batches=functools.partial(put_batches, mesh=mesh), callbacks=callbacks,
        replicated=replicated,
    )

    model_dirs: list[Optional[str]] = [None] * len(trial_cfgs)
    for k, (outcome, timing) in enumerate(zip(outcomes, timings)):
        timing["eval_seconds"] = timing["save_seconds"] = 0.0
        if outcome.status == "finished":
            params = all_params(trial_slice(stacked, k))
            timing["eval_seconds"] = evaluations[k](params, "")
            t0 = time.perf_counter()
            model_dirs[k] = save_trial_model(trial_cfgs[k], evaluations[k].graphdef, params, datas[k].tokenizer,
                                             evaluations[k].reports)
            timing["save_seconds"] = time.perf_counter() - t0
    del stacked
    share = (time.perf_counter() - wall_start) / len(trial_cfgs)
    results = []
    for k, timing in enumerate(timings):
        timing["wall_seconds"] = share
        result = trial_result(shapes[k], datas[k], outcomes[k], total_steps[k], evaluations[k], timing)
        result.metrics["vectorized_trials"] = float(len(trial_cfgs))
        result.model_dir = model_dirs[k]
        results.append(result)
    return results
