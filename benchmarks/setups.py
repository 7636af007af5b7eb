"""The setups that benchmarks.throughput times, the model FLOPs counted for each, and their synthetic batches.

Both sides' worker processes (benchmarks/throughput_worker.py) build their setup and batches from
here, from the same seed, so they train on the same tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from benchmarks.common import data_config, model_preset, optim_preset, train_preset, trial_preset
from trainer.config import FinetuneConfig, OptimConfig
from trainer.model import LlamaShape

SETUP_NAMES = ("easylm_debug", "tiny", "smollm2_full", "smollm2_lora")
BATCH_COUNT = 4  # distinct batches each side cycles through
# steps=None: as many steps as fill a timed window of --min-seconds (benchmarks.throughput).
DEFAULT_TIMING = dict(steps=None, repeats=5, warmup=3)
QUICK_TIMING = dict(steps=None, repeats=2, warmup=1)
# A SmolLM2-135M step takes seconds on 2 cores: fewer repeats keep its two setups to a few minutes.
SMOLLM2_TIMING = dict(steps=None, repeats=3, warmup=1)

# The synthetic examples that the answer-loss setups pack, sized like the preset's data: the
# rotten_tomatoes train split has 8,530 reviews of 10-87 tokens with SmolLM2's tokenizer (prompt +
# answer; mean 34.3, median 33), the answer " Positive" / " Negative" is one token, and EOS follows.
TRAIN_EXAMPLES = 8530
EXAMPLE_TOKENS_MEAN, EXAMPLE_TOKENS_STD, EXAMPLE_TOKENS_RANGE = 34.0, 11.0, (10, 87)
ANSWER_TOKENS = 1


@dataclass(frozen=True)
class Setup:
    """One timed configuration: model shape, row length and batch size, optimizer, fine-tuning and loss."""

    name: str
    shape: LlamaShape
    seq_len: int
    batch_size: int
    source: str  # where the sizes come from
    optim: OptimConfig  # both sides' AdamW settings and gradient clipping
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(method="full"))
    loss_on: str = "all"  # as data.loss_on: every token of uniform random rows, or the answers of packed rows
    examples: int = 0  # loss_on=answer: synthetic examples packed into rows (an epoch's worth)
    timing: Optional[dict] = None  # steps, repeats, warmup when the flags leave them unset


def easylm_debug_shape(vocab_size: int = 1024) -> LlamaShape:
    """EasyLM's `debug` LLaMA: hidden 128, ffn 256, 2 layers, 4 heads without GQA."""
    return LlamaShape(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=4, head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0,
    )


def smollm2_135m_shape() -> LlamaShape:
    """SmolLM2-135M's shape (the GGUF file gives the same to a trial): 30 layers, 9 query / 3 kv heads, tied."""
    return LlamaShape(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tied_embeddings=True,
    )


def smollm2_setups(quick: bool) -> dict[str, Setup]:
    """Full fine-tuning and LoRA as conf/model/smollm2_135m.yaml trains them, on random weights of its shape."""
    setups = {}
    for name, overrides in (("smollm2_full", ["finetune=full"]), ("smollm2_lora", [])):
        cfg = trial_preset("model=smollm2_135m", *overrides)
        if cfg.train.grad_accum != 1:
            raise ValueError(f"train.grad_accum={cfg.train.grad_accum} in the smollm2_135m preset: this benchmark "
                             "times one micro-batch per update; model the accumulation on both sides first")
        common = dict(optim=cfg.optim, finetune=cfg.finetune, loss_on=cfg.data.loss_on)
        if quick:  # the same structure on a sliver of the work: 2 of its 30 layers, a smaller vocabulary, short rows
            setups[name] = Setup(
                name, dataclasses.replace(smollm2_135m_shape(), num_layers=2, vocab_size=8192), seq_len=32,
                batch_size=2, examples=200, source="SmolLM2-135M shape cut to 2 layers and vocab 8192, random "
                "weights, quick sizes", **common,
            )
        else:
            setups[name] = Setup(
                name, smollm2_135m_shape(), seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size,
                examples=TRAIN_EXAMPLES, timing=SMOLLM2_TIMING,
                source="SmolLM2-135M shape with random weights (the GGUF checkpoint is not loaded: a step's speed "
                       "does not depend on the values); conf/model/smollm2_135m.yaml's finetune, optim, "
                       "data.seq_len and loss_on, conf/train/cpu_smollm2.yaml's batch_size",
                **common,
            )
    return setups


def make_setups(quick: bool, layers: Optional[int] = None) -> dict[str, Setup]:
    """Every setup; `layers` rebuilds each shape with that many layers (a faster smoke test of the same code)."""
    tiny = LlamaShape.from_config(model_preset("tiny"))
    adamw = optim_preset()
    if quick:  # the same structures on a sliver of the work
        setups = {
            "easylm_debug": Setup("easylm_debug", easylm_debug_shape(), 32, 2, "EasyLM debug, quick sizes", adamw),
            "tiny": Setup("tiny", tiny, 32, 2, "conf/model/tiny.yaml, quick sizes", adamw),
        }
    else:
        setups = {
            "easylm_debug": Setup("easylm_debug", easylm_debug_shape(), 256, 8, "EasyLM debug LLaMA, vocab 1024", adamw),
            "tiny": Setup(
                "tiny", tiny, data_config().seq_len, train_preset("cpu").batch_size,
                "conf/model/tiny.yaml, data.seq_len, conf/train/cpu.yaml batch_size", adamw,
            ),
        }
    setups.update(smollm2_setups(quick))
    if layers is not None:
        setups = {
            name: dataclasses.replace(
                s, shape=dataclasses.replace(s.shape, num_layers=layers),
                source=f"{s.source}; scaled down to {layers} layers by --layers (not the real shape)",
            )
            for name, s in setups.items()
        }
    return setups


def timing(setup: Setup, args) -> dict:
    """steps, repeats and warmup of one setup: the flags where given, else the setup's or the run's defaults."""
    defaults = QUICK_TIMING if args.quick else (setup.timing or DEFAULT_TIMING)
    return {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}


# --- model FLOPs -----------------------------------------------------------------------------


def body_matmul_params(shape: LlamaShape) -> int:
    """The layers' projection weights: q, k, v, o and gate, up, down."""
    d, h = shape.hidden_size, shape.head_dim
    attention = d * h * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    return shape.num_layers * (attention + 3 * d * shape.intermediate_size)


def matmul_params(shape: LlamaShape) -> int:
    """Weights that take part in a matmul: the layers' projections and the output head.

    The input embedding is a gather; with tied embeddings the head is its transpose, so the same
    weights count once, as the head. Norm scales are not matmuls.
    """
    return body_matmul_params(shape) + shape.vocab_size * shape.hidden_size


def adapter_params(shape: LlamaShape, finetune: FinetuneConfig) -> int:
    """Parameters of the LoRA adapters (rank x (fan-in + fan-out) per target projection); 0 without LoRA."""
    if finetune.method != "lora":
        return 0
    d, f = shape.hidden_size, shape.intermediate_size
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    fans = {"q": (d, q_width), "k": (d, kv_width), "v": (d, kv_width), "o": (q_width, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}
    return shape.num_layers * sum(finetune.rank * sum(fans[target]) for target in finetune.targets)


def weight_flops_factor(finetune: Optional[FinetuneConfig]) -> float:
    """FLOPs per matmul weight per token of an update: 6 when it trains, 4 when it is frozen under LoRA.

    Forward 2, backward 2 for the input's gradient and 2 for the weight's; a frozen weight gets
    no weight gradient (the layers still pass gradients down to the adapters below them).
    """
    if finetune is None or finetune.method == "full":
        return 6.0
    if finetune.method == "lora":
        return 4.0
    raise ValueError(f"finetune.method={finetune.method!r}: this benchmark models 'full' and 'lora'")


def flops_per_token(
    shape: LlamaShape, seq_len: int, finetune: Optional[FinetuneConfig] = None, loss_share: float = 1.0
) -> float:
    """Model FLOPs of one update per token slot (PaLM's appendix B estimate, generalised).

    Weight FLOPs (`weight_flops_factor`) of the layers at every token and of the output head at
    the `loss_share` of the tokens that carry a loss (no other logit is needed), 6 per adapter
    weight, and 12 * L * T * D for attention scores and values (no causal saving).
    """
    factor = weight_flops_factor(finetune)
    adapters = adapter_params(shape, finetune) if finetune is not None else 0
    head = shape.vocab_size * shape.hidden_size
    attention = 12.0 * shape.num_layers * seq_len * shape.num_heads * shape.head_dim
    return factor * body_matmul_params(shape) + factor * head * loss_share + 6.0 * adapters + attention


def flops_formula(setup: Setup, loss_share: float) -> str:
    """How FLOPs/token was counted, with the setup's numbers."""
    s = setup.shape
    attention = f"12*{s.num_layers}*{setup.seq_len}*{s.num_heads * s.head_dim}"
    if setup.finetune.method == "full" and loss_share == 1.0:
        return f"6*{matmul_params(s):,} + {attention}"
    factor = weight_flops_factor(setup.finetune)
    text = f"{factor:.0f}*{body_matmul_params(s):,} (layers) + {factor:.0f}*{s.vocab_size * s.hidden_size:,} (head)"
    text += f" x {loss_share:.4f} (loss tokens)" if loss_share != 1.0 else ""
    adapters = adapter_params(s, setup.finetune)
    text += f" + 6*{adapters:,} (adapters)" if adapters else ""
    text += f" + {attention}"
    if factor == 4.0:
        text += "; frozen weights count 4 (no weight gradient), not 6"
    return text


# --- the batches -----------------------------------------------------------------------------


def packed_rows(setup: Setup, seed: int = 0):
    """An epoch of synthetic examples packed by trainer.packing.pack, as a trial of the preset packs its split.

    Random token ids; lengths drawn like the preset's tokenized reviews; loss on each example's
    answer token and EOS (data.loss_on=answer).
    """
    from trainer.packing import TokenizedSplit, pack

    rng = np.random.default_rng(seed)
    vocab = setup.shape.vocab_size
    low, high = EXAMPLE_TOKENS_RANGE
    lengths = np.clip(np.rint(rng.normal(EXAMPLE_TOKENS_MEAN, EXAMPLE_TOKENS_STD, setup.examples)), low, high)
    # Ids 0-2 stay out of the text: pad (0) and, as in SmolLM2's vocabulary, the special tokens.
    candidates = [rng.integers(3, vocab, ANSWER_TOKENS, dtype=np.int32) for _ in range(2)]
    labels = rng.integers(0, 2, setup.examples)
    prompts = [rng.integers(3, vocab, int(n) - ANSWER_TOKENS, dtype=np.int32) for n in lengths]
    tokenized = TokenizedSplit(prompts, [candidates[label] for label in labels], labels, candidates)
    return pack(tokenized, setup.seq_len, setup.loss_on, eos_id=2, pad_id=0, seed=seed)


def token_batches(setup: Setup, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` batches (inputs, targets, segment_ids, positions, loss_mask), shared by both sides.

    loss_on=all: uniform random rows, one segment each, every token with a loss. loss_on=answer:
    packed rows (`packed_rows`), batched as trainer.packing.batches serves them to a trial.
    """
    if setup.loss_on == "answer":
        from trainer.packing import batches

        served = batches(packed_rows(setup, seed), setup.batch_size, seed)
        return [next(served) for _ in range(count)]
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, setup.shape.vocab_size, (count, setup.batch_size, setup.seq_len + 1), dtype=np.int32)
    shape_BxT = (setup.batch_size, setup.seq_len)
    return [
        {
            "inputs": t[:, :-1], "targets": t[:, 1:], "segment_ids": np.ones(shape_BxT, np.int32),
            "positions": np.broadcast_to(np.arange(setup.seq_len, dtype=np.int32), shape_BxT).copy(),
            "loss_mask": np.ones(shape_BxT, np.float32),
        }
        for t in tokens
    ]


def loss_positions(setup: Setup) -> Optional[int]:
    """Our step's static bound on loss tokens per row, as trainer.trial takes it over the epoch's rows."""
    from trainer.train import max_loss_positions

    if setup.loss_on != "answer":
        return None
    return max_loss_positions(packed_rows(setup).loss_mask, setup.seq_len)
