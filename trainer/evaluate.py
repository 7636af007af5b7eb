"""Test-set evaluation: label scoring or generation, then accuracy, per-class scores, confusion.

`score` compares the log-likelihood of each label continuation (label tokens + EOS) after the
prompt: deterministic. `generate` samples a short answer at `temperature` (0 is greedy), one
prefill over the prompts then one KV-cached decode step per token, and parses it; an answer that
is neither label is invalid and counts as wrong.

`python -m trainer.evaluate model.checkpoint=<folder> ...` evaluates a saved model (trainer/rescore.py).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer.data import LABEL_NAMES
from trainer.model import token_losses

INVALID = -1
# A trial whose predictions are at least this share one class is flagged as degenerate.
DEGENERATE_SHARE = 0.95
_LENGTH_BUCKET = 16


def _bucket(length: int) -> int:
    return -(-length // _LENGTH_BUCKET) * _LENGTH_BUCKET


@functools.lru_cache(maxsize=None)
def _continuation_logprob_fn(graphdef: nnx.GraphDef):
    @jax.jit
    def logprob(params, prompts_BxL, lengths_B, targets_CxM, mask_CxM):
        """(B, C) summed log-probabilities of each candidate's M tokens (masked) after each prompt.

        One prefill over the prompts; each candidate then continues from the same KV cache with
        one decode step per token but its last, so a prompt is read once however many candidates.
        """
        model = nnx.merge(graphdef, params)
        rows_B = jnp.arange(prompts_BxL.shape[0])
        hidden_BxLxD, prompt_cache = model.prefill(prompts_BxL)
        # The prompt's last position predicts every candidate's first token: one head for all.
        first_BxV = model.logits(hidden_BxLxD[rows_B, lengths_B - 1])
        scores = []
        for targets_M, mask_M in zip(targets_CxM, mask_CxM):
            logits_BxV, cache, total_B = first_BxV, prompt_cache, jnp.zeros(lengths_B.shape, jnp.float32)
            for j in range(targets_M.shape[0]):
                target_B = jnp.broadcast_to(targets_M[j], lengths_B.shape)
                total_B = total_B - mask_M[j] * token_losses(logits_BxV, target_B)
                if j + 1 < targets_M.shape[0]:
                    # Decode writes each slot before attending to it; later slots are masked.
                    hidden_BxD, cache = model.decode(target_B, lengths_B + j, cache)
                    logits_BxV = model.logits(hidden_BxD)
            scores.append(total_B)
        return jnp.stack(scores, axis=1)

    return logprob


def score_candidates(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[np.ndarray],
    candidates: Sequence[np.ndarray],
    eos_id: Optional[int],
    batch_size: int,
) -> np.ndarray:
    """Log-likelihood (N, C) of each candidate continuation (+ EOS unless eos_id is None) after each prompt."""
    ends = [] if eos_id is None else [eos_id]
    longest = max(len(c) for c in candidates) + len(ends)
    targets = np.zeros((len(candidates), longest), np.int32)
    mask = np.zeros((len(candidates), longest), np.float32)
    for c, cand in enumerate(candidates):
        targets[c, : len(cand) + len(ends)] = [*cand, *ends]
        mask[c, : len(cand) + len(ends)] = 1.0
    fn = _continuation_logprob_fn(graphdef)
    # Sort by length so each padded batch wastes little; buckets bound the compiled shapes.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    scores = np.zeros((len(prompts), len(candidates)), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        # Room in the cache for every candidate's tokens after the longest prompt.
        width = _bucket(max(len(prompts[i]) for i in idx) + longest - 1)
        buffer = np.zeros((batch_size, width), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for row, i in enumerate(idx):
            buffer[row, : len(prompts[i])] = prompts[i]
            lengths[row] = len(prompts[i])
        logprobs = np.asarray(fn(params, buffer, lengths, targets, mask))
        scores[idx] = logprobs[: len(idx)]
    return scores


@functools.lru_cache(maxsize=None)
def _generate_fn(graphdef: nnx.GraphDef, max_new_tokens: int):
    @jax.jit
    def generate(params, buffer_BxL, lengths_B, temperature, key):
        model = nnx.merge(graphdef, params)
        rows_B = jnp.arange(buffer_BxL.shape[0])

        def write_next(buffer_BxL, hidden_BxD, position_B, key):
            """Samples each row's token after position_B from its hidden state, into the buffer."""
            logits_BxV = model.logits(hidden_BxD)  # the head runs only where a token is sampled
            key, sub = jax.random.split(key)
            sampled_B = jax.random.categorical(sub, logits_BxV / jnp.maximum(temperature, 1e-6))
            token_B = jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1))
            return buffer_BxL.at[rows_B, position_B + 1].set(token_B.astype(buffer_BxL.dtype)), key

        # One pass over the prompts fills the KV cache. The slots after a row's prompt get the
        # padding's keys, but decode writes each slot before attending to it and masks later ones.
        hidden_BxLxD, cache = model.prefill(buffer_BxL)
        buffer_BxL, key = write_next(buffer_BxL, hidden_BxLxD[rows_B, lengths_B - 1], lengths_B - 1, key)

        def one_token(t, carry):
            buffer_BxL, cache, key = carry
            position_B = lengths_B + t - 1  # where the last generated token sits
            hidden_BxD, cache = model.decode(buffer_BxL[rows_B, position_B], position_B, cache)
            buffer_BxL, key = write_next(buffer_BxL, hidden_BxD, position_B, key)
            return buffer_BxL, cache, key

        buffer_BxL, _, _ = jax.lax.fori_loop(1, max_new_tokens, one_token, (buffer_BxL, cache, key))
        return buffer_BxL

    return generate


def generate_answers(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
) -> list[list[int]]:
    """Up to max_new_tokens sampled after each prompt (the caller decodes and parses them)."""
    fn = _generate_fn(graphdef, max_new_tokens)
    key = jax.random.key(seed)
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = _bucket(max(len(prompts[i]) for i in idx) + max_new_tokens)
        buffer = np.zeros((batch_size, width), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for row, i in enumerate(idx):
            buffer[row, : len(prompts[i])] = prompts[i]
            lengths[row] = len(prompts[i])
        key, sub = jax.random.split(key)
        result = np.asarray(fn(params, buffer, lengths, jnp.float32(temperature), sub))
        for row, i in enumerate(idx):
            outputs[i] = result[row, lengths[row] : lengths[row] + max_new_tokens].tolist()
    return outputs


def parse_answer(text: str) -> int:
    """The label a generated answer names, or INVALID."""
    words = text.strip().split()
    if not words:
        return INVALID
    first = words[0].strip(".,!:;\"'").lower()
    for label, name in enumerate(LABEL_NAMES):
        if first == name.lower():
            return label
    return INVALID


@dataclass
class EvalReport:
    split: str
    accuracy: float
    invalid_rate: float
    majority_share: float
    degenerate: bool
    precision: list[float]  # per class, index = label
    recall: list[float]
    f1: list[float]
    confusion: list[list[int]]  # rows: true label; columns: predicted Negative, Positive, invalid
    num_examples: int

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}invalid_rate": self.invalid_rate,
            f"{prefix}majority_share": self.majority_share,
            f"{prefix}f1_macro": float(np.mean(self.f1)),
        }
        for label, name in enumerate(LABEL_NAMES):
            n = name.lower()
            out[f"{prefix}precision_{n}"] = self.precision[label]
            out[f"{prefix}recall_{n}"] = self.recall[label]
            out[f"{prefix}f1_{n}"] = self.f1[label]
        return out


def classification_report(split: str, labels: np.ndarray, predictions: np.ndarray) -> EvalReport:
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    n = len(labels)
    confusion = np.zeros((len(LABEL_NAMES), len(LABEL_NAMES) + 1), dtype=int)
    for y, p in zip(labels, predictions):
        confusion[y, p if p != INVALID else len(LABEL_NAMES)] += 1
    precision, recall, f1 = [], [], []
    for c in range(len(LABEL_NAMES)):
        tp = confusion[c, c]
        predicted = confusion[:, c].sum()
        actual = confusion[c].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(float(p))
        recall.append(float(r))
        f1.append(float(2 * p * r / (p + r)) if p + r else 0.0)
    counts = np.bincount(np.where(predictions == INVALID, len(LABEL_NAMES), predictions), minlength=3)
    majority_share = float(counts.max() / n) if n else 0.0
    return EvalReport(
        split=split,
        accuracy=float(np.mean(labels == predictions)) if n else 0.0,
        invalid_rate=float(np.mean(predictions == INVALID)) if n else 0.0,
        majority_share=majority_share,
        degenerate=majority_share >= DEGENERATE_SHARE,
        precision=precision,
        recall=recall,
        f1=f1,
        confusion=confusion.tolist(),
        num_examples=n,
    )


def evaluate_split(
    split: str,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokenized,
    tokenizer,
    eval_cfg,
    *,
    seed: int,
    prompt_texts: Optional[Sequence[str]] = None,
    predictions_path: Optional[Path] = None,
) -> EvalReport:
    """Evaluate one tokenized split (eval.max_examples: a seeded stratified subset of it); optionally
    write predictions JSONL."""
    prompts = list(tokenized.prompts)
    labels = np.asarray(tokenized.labels)
    if eval_cfg.max_examples is not None:
        # A seeded class-stratified subset: the first N rows of a split can be all one class.
        from trainer.data import stratified_indices

        keep = stratified_indices(labels.tolist(), eval_cfg.max_examples, seed)
        prompts, labels = [prompts[i] for i in keep], labels[keep]
        if prompt_texts is not None:
            prompt_texts = [prompt_texts[i] for i in keep]
    scores = None
    if eval_cfg.mode == "score":
        scores = score_candidates(
            graphdef, params, prompts, tokenized.candidate_answers,
            tokenizer.eos_id if eval_cfg.score_eos else None, eval_cfg.batch_size,
        )
        predictions = np.argmax(scores, axis=1)
        outputs = [LABEL_NAMES[p] for p in predictions]
    else:
        generated = generate_answers(
            graphdef,
            params,
            prompts,
            max_new_tokens=eval_cfg.max_new_tokens,
            temperature=eval_cfg.temperature,
            batch_size=eval_cfg.batch_size,
            seed=seed,
        )
        outputs = [tokenizer.decode(_until_eos(ids, tokenizer.eos_id)) for ids in generated]
        predictions = np.array([parse_answer(o) for o in outputs])
    report = classification_report(split, labels, predictions)
    if predictions_path is not None:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        with predictions_path.open("w", encoding="utf-8") as f:
            for i, (label, pred, output) in enumerate(zip(labels, predictions, outputs)):
                record = {
                    "prompt": prompt_texts[i] if prompt_texts is not None else tokenizer.decode(prompts[i][int(tokenizer.add_bos):]),
                    "output": output,
                    "label": LABEL_NAMES[int(label)],
                    "correct": bool(pred == label),
                }
                if scores is not None:
                    record["scores"] = {name: float(s) for name, s in zip(LABEL_NAMES, scores[i])}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return report


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


if __name__ == "__main__":  # python -m trainer.evaluate model.checkpoint=<folder> ...: see trainer/rescore.py
    from trainer.rescore import main

    main()
