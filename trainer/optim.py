"""AdamW with a warmup + cosine schedule whose hyperparameters are inputs of the compiled step.

The learning rate, warmup, betas and weight decay live in the train state as float32 scalars
(`Hyperparams`), not in the traced program, so a sweep over them compiles the step once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from trainer.config import OptimConfig


@struct.dataclass
class Hyperparams:
    """The sweepable optimizer settings, as traced scalars."""

    lr: jax.Array
    warmup: jax.Array
    end_lr: jax.Array
    decay_steps: jax.Array
    b1: jax.Array
    b2: jax.Array
    weight_decay: jax.Array
    clip_grad_norm: jax.Array

    @classmethod
    def create(cls, *, lr: float, warmup: int, total_steps: int, cfg: OptimConfig) -> "Hyperparams":
        end_lr = lr if cfg.end_lr is None else cfg.end_lr
        decay_steps = total_steps if cfg.decay_steps is None else cfg.decay_steps
        f32 = lambda v: jnp.asarray(v, dtype=jnp.float32)  # noqa: E731
        return cls(
            lr=f32(lr),
            warmup=f32(warmup),
            end_lr=f32(end_lr),
            decay_steps=f32(decay_steps),
            b1=f32(cfg.b1),
            b2=f32(cfg.b2),
            weight_decay=f32(cfg.weight_decay),
            clip_grad_norm=f32(cfg.clip_grad_norm),
        )


def learning_rate(step: jax.Array, h: Hyperparams) -> jax.Array:
    """Linear warmup from 0 to lr over `warmup` updates, then cosine to end_lr at decay_steps.

    `step` counts the updates already applied, so the first update uses learning_rate(0).
    """
    s = jnp.asarray(step, jnp.float32)
    warm = h.lr * s / jnp.maximum(h.warmup, 1.0)
    progress = jnp.clip((s - h.warmup) / jnp.maximum(h.decay_steps - h.warmup, 1.0), 0.0, 1.0)
    cosine = h.end_lr + (h.lr - h.end_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(s < h.warmup, warm, cosine)


def reference_learning_rate(step: int, *, lr: float, warmup: int, end_lr: float, decay_steps: int) -> float:
    """The same schedule built from optax's own pieces, for tests."""
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, max(warmup, 1)),
            optax.cosine_decay_schedule(lr, max(decay_steps - warmup, 1), alpha=end_lr / lr if lr else 0.0),
        ],
        boundaries=[warmup],
    )
    return float(schedule(step))


def decay_mask(kind: str) -> Callable[[Any], Any] | None:
    """Which parameters weight decay touches: all, or all but norm scales and embeddings."""
    if kind == "all":
        return None

    def mask(params):
        def keep(path, _):
            names = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
            return not ("norm" in names or "embed" in names)

        return jax.tree_util.tree_map_with_path(keep, params)

    return mask


@dataclass(frozen=True)
class Optimizer:
    """Static optimizer structure (hashable); the numbers come from Hyperparams at run time."""

    weight_decay_mask: str = "all"
    mu_dtype: str = "float32"
    eps: float = 1e-8

    @classmethod
    def from_config(cls, cfg: OptimConfig) -> "Optimizer":
        return cls(weight_decay_mask=cfg.weight_decay_mask, mu_dtype=cfg.mu_dtype, eps=cfg.eps)

    def transform(self) -> optax.GradientTransformation:
        mu_dtype = jnp.bfloat16 if self.mu_dtype == "bfloat16" else None
        return optax.inject_hyperparams(optax.adamw, static_args=("mu_dtype", "mask", "eps"))(
            learning_rate=0.0,
            b1=0.9,
            b2=0.95,
            eps=self.eps,
            weight_decay=0.0,
            mu_dtype=mu_dtype,
            mask=decay_mask(self.weight_decay_mask),
        )

    def init(self, params) -> optax.OptState:
        return self.transform().init(params)

    def update(self, grads, opt_state, params, *, step: jax.Array, h: Hyperparams):
        """Clip, then one AdamW update at the scheduled rate; returns (updates, state, lr, grad_norm)."""
        grad_norm = optax.tree.norm(grads)
        # clip_grad_norm == 0 disables clipping without changing the compiled program.
        limit = jnp.where(h.clip_grad_norm > 0, h.clip_grad_norm, jnp.inf)
        scale = jnp.minimum(1.0, limit / jnp.maximum(grad_norm, 1e-12))
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        lr = learning_rate(step, h)
        hyper = dict(opt_state.hyperparams)
        hyper.update(learning_rate=lr, b1=h.b1, b2=h.b2, weight_decay=h.weight_decay)
        opt_state = opt_state._replace(hyperparams=hyper)
        updates, opt_state = self.transform().update(grads, opt_state, params)
        return updates, opt_state, lr, grad_norm
