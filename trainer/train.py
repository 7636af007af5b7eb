"""One pure jitted train step and the loop that drives it.

`train_step(state, batch) -> (state, metrics)` is compiled once per (model shape, optimizer
structure, gradient accumulation); the sweepable numbers ride in `state.hparams`, so a second
trial that changes only lr / warmup / betas / weight decay reuses the compiled program.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from trainer import interrupt
from trainer.model import Llama, gather_positions, head_losses
from trainer.optim import Hyperparams, Optimizer

Batch = dict  # inputs, targets, segment_ids, positions, loss_mask: (B, T) arrays


@struct.dataclass
class TrainState:
    step: jax.Array  # updates applied so far
    params: nnx.State  # the weights that train (all, or adapters, or the top layers)
    opt_state: object  # over `params` only
    hparams: Hyperparams
    tokens_seen: jax.Array  # real (non-padding) training tokens consumed so far
    frozen: nnx.State  # the weights that don't train (empty under full fine-tuning)
    dropout_key: jax.Array  # raw uint32 key; step s draws its adapter dropout from fold_in(key, s)


def create_state(
    model: Llama, optimizer: Optimizer, hparams: Hyperparams, trainable: Any = nnx.Param, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState]:
    """A fresh state: the parameters that `trainable` (an nnx filter) selects train, the rest are frozen."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        hparams=hparams,
        tokens_seen=jnp.zeros((), jnp.float32),
        frozen=frozen,
        dropout_key=jax.random.PRNGKey(seed),
    )
    return graphdef, state


def all_params(state: TrainState) -> nnx.State:
    """Trained and frozen weights together: what evaluation merges with the graphdef."""
    return nnx.merge_state(state.params, state.frozen)


def loss_sums(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: Batch,
    loss_positions: Optional[int] = None,
    frozen: Optional[nnx.State] = None,
    dropout_key: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, number of loss tokens) for one micro-batch.

    With `loss_positions=K`, the output head runs only on the first K loss-bearing positions
    of each row; the caller guarantees no row has more (see `max_loss_positions`).
    """
    model = nnx.merge(graphdef, params, frozen) if frozen is not None else nnx.merge(graphdef, params)
    hidden_BxTxD = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key)
    mask_BxT, targets_BxT = batch["loss_mask"].astype(jnp.float32), batch["targets"]
    if loss_positions is not None and loss_positions < mask_BxT.shape[1]:
        _, (mask_BxT, targets_BxT, hidden_BxTxD) = gather_positions(
            loss_positions, mask_BxT, targets_BxT, hidden_BxTxD
        )
    losses_BxT = head_losses(model, hidden_BxTxD, targets_BxT)
    return jnp.sum(losses_BxT * mask_BxT), jnp.sum(mask_BxT)


def max_loss_positions(loss_mask: np.ndarray, seq_len: int) -> Optional[int]:
    """A static bound on loss tokens per row (a power of two), or None when most tokens carry one."""
    most = int((np.asarray(loss_mask) > 0).sum(axis=1).max()) if len(loss_mask) else 0
    bound = max(8, 1 << max(most - 1, 0).bit_length())
    return bound if bound <= seq_len // 2 else None


@functools.lru_cache(maxsize=None)
def make_train_step(
    graphdef: nnx.GraphDef, optimizer: Optimizer, grad_accum: int, loss_positions: Optional[int] = None,
    dropout: bool = False,
) -> Callable:
    """The jitted step for one model structure; cached so every trial in a process shares it."""
    return jax.jit(build_train_step(graphdef, optimizer, grad_accum, loss_positions, dropout), donate_argnums=0)


def build_train_step(
    graphdef: nnx.GraphDef, optimizer: Optimizer, grad_accum: int, loss_positions: Optional[int] = None,
    dropout: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The pure, un-jitted `train_step(state, batch)`: what make_train_step jits and trainer.vectorized vmaps.

    Gradients are taken over `state.params` only; `state.frozen` is a constant of the step, so
    no weight gradient (and no optimizer state) is computed for it. `dropout` turns on the
    adapters' dropout, drawn from the state's key and the step number.
    """

    def micro_grads(state, micro, index):
        key = jax.random.fold_in(jax.random.fold_in(state.dropout_key, state.step), index) if dropout else None
        (loss_sum, count), grads = jax.value_and_grad(
            lambda p: loss_sums(graphdef, p, micro, loss_positions, state.frozen, key), has_aux=True
        )(state.params)
        return grads, loss_sum, count

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        if grad_accum == 1:
            grads, loss_sum, count = micro_grads(state, batch, 0)
        else:
            micro_batches = jax.tree.map(
                lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
            )

            def accumulate(carry, indexed):
                index, micro = indexed
                grads, loss_sum, count = micro_grads(state, micro, index)
                acc_grads, acc_loss, acc_count = carry
                return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss_sum, acc_count + count), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss_sum, count), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), (jnp.arange(grad_accum), micro_batches)
            )
        # Mean over every loss token of the whole update, however it was split.
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state, lr, grad_norm = optimizer.update(
            grads, state.opt_state, state.params, step=state.step, h=state.hparams
        )
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
        tokens = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, tokens_seen=state.tokens_seen + tokens
        )
        metrics = {
            "loss": loss_sum / denom,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_seen": new_state.tokens_seen,
        }
        return new_state, metrics

    return train_step


@dataclass
class StepRecord:
    step: int  # 1-based index of the update
    loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_second: float
    tokens_seen: float

    @classmethod
    def from_metrics(cls, step: int, values: dict, seconds: float) -> "StepRecord":
        """The record of one update from its host-side step metrics and the time it took."""
        return cls(
            step=step,
            loss=float(values["loss"]),
            learning_rate=float(values["learning_rate"]),
            grad_norm=float(values["grad_norm"]),
            tokens_per_second=float(values["tokens"]) / seconds,
            tokens_seen=float(values["tokens_seen"]),
        )


@dataclass
class TrainOutcome:
    state: Optional[TrainState]  # None for a trial of a vectorised group (trainer/vectorized.py)
    status: str  # "finished" | "diverged" | "pruned" (stopped by the `evaluate` hook)
    steps_done: int
    history: list[StepRecord] = field(default_factory=list)
    message: str = ""
    compile_seconds: float = 0.0
    train_seconds: float = 0.0


def train_loop(
    step_fn: Callable,
    state: TrainState,
    batches: Iterator[Batch],
    total_steps: int,
    *,
    put_batch: Callable[[Batch], Batch] = lambda b: b,
    callback: Optional[Callable[[StepRecord], None]] = None,
    start_step: int = 0,
    checkpoints: Any = None,
    history: Optional[list[StepRecord]] = None,
    evaluate: Optional[Callable[[int, TrainState], Optional[str]]] = None,
    evaluate_every: int = 0,
) -> TrainOutcome:
    """Run updates start_step+1..total_steps; stop early with status "diverged" on a non-finite loss.

    `evaluate(step, state)` runs after every `evaluate_every`-th step but the last (trainer/periodic_eval.py);
    when it returns a reason, training stops there with status "pruned" and that message.

    Metrics are read one step late so the host never waits on the step it just launched.
    `checkpoints` (trainer.resume.TrialCheckpoints) saves the state when due and when SIGTERM or
    SIGINT arrives; the signal is then raised (trainer.interrupt) between two steps.
    """
    history = list(history or [])
    pending: Optional[tuple[int, dict]] = None
    compile_seconds = 0.0
    start = time.perf_counter()
    last_time = start
    first_step = start_step + 1
    next_batch = put_batch(next(batches)) if first_step <= total_steps else None

    def settle(record_step: int, metrics: dict) -> StepRecord:
        nonlocal last_time
        values = jax.device_get(metrics)
        now = time.perf_counter()
        # The first step's time is its compilation plus its run.
        elapsed = compile_seconds if record_step == first_step else max(now - last_time, 1e-9)
        last_time = now
        record = StepRecord.from_metrics(record_step, values, elapsed)
        history.append(record)
        if callback is not None:
            callback(record)
        return record

    with interrupt.deferred():
        for step in range(first_step, total_steps + 1):
            batch = next_batch
            launched = time.perf_counter()
            state, metrics = step_fn(state, batch)
            if step == first_step:
                # The first call compiles; time it apart from training throughput.
                jax.block_until_ready(metrics["loss"])
                compile_seconds = time.perf_counter() - launched
                last_time = time.perf_counter()
                start = last_time
            if step < total_steps:
                next_batch = put_batch(next(batches))  # prepared while the step runs
            if pending is not None:
                record = settle(*pending)
                if not math.isfinite(record.loss):
                    return _diverged(state, record, history, compile_seconds, start)
            pending = (step, metrics)
            stopping = interrupt.requested() is not None
            if checkpoints is not None and (stopping or (step < total_steps and checkpoints.due(step))):
                record = settle(*pending)  # the saved step's record is sent before the process may end
                pending = None
                if not math.isfinite(record.loss):
                    return _diverged(state, record, history, compile_seconds, start)
                checkpoints.save(step, state, record)
            if evaluate is not None and evaluate_every > 0 and step % evaluate_every == 0 and step < total_steps:
                if pending is not None:
                    record = settle(*pending)
                    pending = None
                    if not math.isfinite(record.loss):
                        return _diverged(state, record, history, compile_seconds, start)
                evaluated = time.perf_counter()
                reason = evaluate(step, state)
                last_time = time.perf_counter()
                start += last_time - evaluated  # train_seconds counts training only
                if reason:
                    return TrainOutcome(
                        state=state, status="pruned", steps_done=step, history=history, message=reason,
                        compile_seconds=compile_seconds, train_seconds=last_time - start,
                    )
            interrupt.check()
    record = settle(*pending) if pending is not None else None
    if record is not None and not math.isfinite(record.loss):
        return _diverged(state, record, history, compile_seconds, start)
    jax.block_until_ready(state.step)
    return TrainOutcome(
        state=state,
        status="finished",
        steps_done=total_steps,
        history=history,
        compile_seconds=compile_seconds,
        train_seconds=time.perf_counter() - start,
    )


def _diverged(state, record: StepRecord, history, compile_seconds, start) -> TrainOutcome:
    return TrainOutcome(
        state=state,
        status="diverged",
        steps_done=record.step,
        history=history,
        message=f"diverged at step {record.step}: loss is {record.loss}",
        compile_seconds=compile_seconds,
        train_seconds=time.perf_counter() - start,
    )


def total_steps_for(train_cfg, steps_per_epoch: int) -> int:
    if train_cfg.total_steps is not None:
        return int(train_cfg.total_steps)
    return max(1, int(math.ceil(train_cfg.epochs * steps_per_epoch)))


def as_device_batch(batch: Batch, sharding=None) -> Batch:
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    if sharding is None:
        return jax.device_put(arrays)
    return jax.device_put(arrays, sharding)
