"""Preemption-safe trials: the train state checkpointed with Orbax, resumed by the next run.

A trial's checkpoints live in `<train.checkpoint_dir>/<digest>[-<label>]/`, where the digest is
the sha256 of every config value that changes what the trial computes and the label names the
run that owns them (the sweeper's MLflow run id; none for `python -m trainer`), so the next run of
the same trial (a re-run sweep resuming that run, a re-run `python -m trainer`) finds them and
no other trial does. What is
saved is everything in TrainState but the frozen weights (those are the base checkpoint's,
loaded again): the step, trained weights, optimizer state, hyperparameters, token count and
dropout key, as one flat list of arrays. Restoring it and skipping the batches already consumed
makes the resumed trial compute exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import jax

from trainer.config import TrialConfig, flatten

# Keys that don't change what a trial computes, left out of its digest.
UNHASHED = ("output_dir", "data.cache_dir", "train.checkpoint_dir", "train.checkpoint_every_steps",
            "train.checkpoint_every_minutes", "train.keep_checkpoint", "train.resume", "train.log_every",
            "eval.predictions")


def trial_digest(cfg: TrialConfig) -> str:
    """sha256 of the trial's config, without the keys that don't change its numbers."""
    flat = {k: v for k, v in flatten(dataclasses.asdict(cfg)).items() if k not in UNHASHED}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_folder(cfg: TrialConfig, label: str = "") -> Path:
    """Where this trial's checkpoints go: <train.checkpoint_dir or <data.cache_dir>/checkpoints>/<digest>[-<label>].

    The label (the sweeper's run id) keeps two runs of one config, e.g. sweeps on two different
    stores, from writing or resuming each other's checkpoints.
    """
    from trainer.tokenizer import expand_cache_dir

    base = cfg.train.checkpoint_dir or str(expand_cache_dir(cfg.data.cache_dir) / "checkpoints")
    return Path(base).expanduser() / (trial_digest(cfg)[:24] + (f"-{label}" if label else ""))


def _savable(state) -> list:
    """The leaves of the state without the frozen weights."""
    return jax.tree.leaves(state.replace(frozen=None))


class TrialCheckpoints:
    """Saves the state every N steps and/or minutes and when asked to stop; restores the latest."""

    def __init__(self, cfg: TrialConfig, label: str = "") -> None:
        self.folder = checkpoint_folder(cfg, label)
        self.every_steps = int(cfg.train.checkpoint_every_steps or 0)
        self.every_seconds = float(cfg.train.checkpoint_every_minutes or 0) * 60.0
        self.keep = bool(cfg.train.keep_checkpoint)
        self.label = label  # e.g. the tracking run that owns the trial; kept in the metadata
        self.digest = trial_digest(cfg)
        self._manager = None
        self._last_save = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_seconds > 0

    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            self.folder.mkdir(parents=True, exist_ok=True)
            self._manager = ocp.CheckpointManager(
                self.folder.resolve(),
                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False),
            )
        return self._manager

    def latest_step(self) -> Optional[int]:
        if not self.folder.is_dir():
            return None
        return self.manager().latest_step()

    def restore(self, state) -> tuple[Any, int, Optional[dict]]:
        """(the latest checkpoint's state, its step, its step's record), or (state, 0, None) without one.

        `state` is a fresh state of the same trial: its structure, shapes and shardings say how
        to read the arrays back; its frozen weights are kept as they are.
        """
        step = self.latest_step()
        if step is None:
            return state, 0, None
        import orbax.checkpoint as ocp

        skeleton = state.replace(frozen=None)
        leaves, treedef = jax.tree.flatten(skeleton)
        abstract = {str(i): ocp.utils.to_shape_dtype_struct(leaf) for i, leaf in enumerate(leaves)}
        try:
            restored = self.manager().restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        except Exception as error:  # damaged or from another version of the code: start over, say so
            print(f"warning: checkpoint {self.folder} step {step} could not be restored "
                  f"({type(error).__name__}: {error}); training from step 0", flush=True)
            self.remove()
            return state, 0, None
        if restored.meta.get("digest") != self.digest:
            raise RuntimeError(f"checkpoint {self.folder} belongs to another trial config; delete it")
        new_leaves = [restored.state[str(i)] for i in range(len(leaves))]
        resumed = jax.tree.unflatten(treedef, new_leaves).replace(frozen=state.frozen)
        return resumed, int(step), restored.meta.get("record")

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds) and time.monotonic() - self._last_save >= self.every_seconds

    def save(self, step: int, state, record=None) -> None:
        """Write the state after `step` updates and that step's StepRecord (blocking: it must be whole
        before the process may end)."""
        import orbax.checkpoint as ocp

        leaves = {str(i): leaf for i, leaf in enumerate(_savable(state))}
        meta = {"step": int(step), "label": self.label, "digest": self.digest, "saved_at": time.time(),
                "record": dataclasses.asdict(record) if record is not None else None}
        manager = self.manager()
        if manager.latest_step() == step:
            return
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
        self._last_save = time.monotonic()

    def finished(self) -> None:
        """The trial ended (finished or diverged): its checkpoints go, unless train.keep_checkpoint."""
        if not self.keep:
            self.remove()

    def remove(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["TrialCheckpoints", "checkpoint_folder", "trial_digest"]
