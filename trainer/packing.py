"""Examples to training rows: tokenize (cached on disk), pack into fixed rows, serve batches.

The examples and their prompt format come from trainer/data.py.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from trainer.config import ConfigError
from trainer.data import LABEL_NAMES, DataError, Example, answer_text, prompt_text
from trainer.tokenizer import Tokenizer, expand_cache_dir

# Kept from the end of an over-long prompt, so the "\n[Sentiment]:" cue survives truncation.
PROMPT_TAIL_TOKENS = 8

# ---------------------------------------------------------------- tokenization


def answer_ids(tokenizer: Tokenizer, label: int) -> list[int]:
    """The ids of " <label name>" as the tokenizer splits it after a prompt.

    Encoded as the tail of `cue + " " + name` after `cue`, so the boundary is the tokenizer's
    own: sentencepiece puts the space in "▁Positive", byte-level BPE in "ĠPositive". The prompt
    and its answer, encoded apart, then give exactly the ids of the whole text.
    """
    cue = prompt_text("")  # what every prompt ends with
    cue_ids, full_ids = tokenizer.encode(cue), tokenizer.encode(cue + " " + answer_text(label))
    if full_ids[: len(cue_ids)] != cue_ids or len(full_ids) == len(cue_ids):
        raise DataError(
            f"tokenizer {tokenizer.source} merges the answer {answer_text(label)!r} into the prompt's last "
            f"tokens ({cue_ids[-3:]} vs {full_ids[-4:]}); prompt and answer cannot be scored apart with it"
        )
    return full_ids[len(cue_ids):]


@dataclass
class TokenizedSplit:
    """Per example: [BOS +] prompt ids and answer ids (encoded separately, so training and scoring agree)."""

    prompts: list[np.ndarray]
    answers: list[np.ndarray]
    labels: np.ndarray  # int32
    candidate_answers: list[np.ndarray]  # ids of " Negative", " Positive" after a prompt: index = label

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example as trained: prompt + answer + EOS, less the one that is never an input."""
        return np.array([len(p) + len(a) for p, a in zip(self.prompts, self.answers)], dtype=np.int64)


_TOKENIZED: dict[str, TokenizedSplit] = {}
_TOKENIZED_FORMAT = "v2 [BOS]+prompt | answer as continuation"  # bump when the layout below changes


def tokenize_examples(examples: Sequence[Example], tokenizer: Tokenizer, cache_dir: str) -> TokenizedSplit:
    """Token ids of the examples, cached on disk (`cache_dir`/tokenized) and in-process by content hash."""
    digest = hashlib.sha256(f"{_TOKENIZED_FORMAT}|{tokenizer.fingerprint}|{prompt_text('')}".encode())
    for example in examples:
        encoded = example.text.encode("utf-8")
        digest.update(f"{example.label}:{len(encoded)}:".encode())
        digest.update(encoded)
    key = digest.hexdigest()
    if key in _TOKENIZED:
        return _TOKENIZED[key]
    path = expand_cache_dir(cache_dir) / "tokenized" / f"{key}.npz"
    tokenized = _load_tokenized(path) if path.is_file() else None
    if tokenized is None or len(tokenized.labels) != len(examples):
        prompts = tokenizer.encode_batch([prompt_text(example.text) for example in examples])
        start = [tokenizer.bos_id] if tokenizer.add_bos else []
        candidates = [np.asarray(answer_ids(tokenizer, label), dtype=np.int32) for label in range(len(LABEL_NAMES))]
        tokenized = TokenizedSplit(
            prompts=[np.asarray([*start, *ids], dtype=np.int32) for ids in prompts],
            answers=[candidates[example.label] for example in examples],
            labels=np.asarray([example.label for example in examples], dtype=np.int32),
            candidate_answers=candidates,
        )
        _save_tokenized(path, tokenized)
    _TOKENIZED[key] = tokenized
    return tokenized


def _flatten(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return flat, offsets


def _unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[start:stop] for start, stop in zip(offsets[:-1], offsets[1:])]


def _save_tokenized(path: Path, tokenized: TokenizedSplit) -> None:
    arrays = {"labels": tokenized.labels}
    for name in ("prompts", "answers", "candidate_answers"):
        arrays[f"{name}_ids"], arrays[f"{name}_offsets"] = _flatten(getattr(tokenized, name))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic write: parallel trials tokenizing the same split never read half a file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)


def _load_tokenized(path: Path) -> TokenizedSplit | None:
    """The cached token ids, or None (the file removed, with a warning) when it is damaged."""
    try:
        with np.load(path) as saved:
            parts = {
                name: _unflatten(saved[f"{name}_ids"], saved[f"{name}_offsets"])
                for name in ("prompts", "answers", "candidate_answers")
            }
            return TokenizedSplit(labels=saved["labels"], **parts)
    except Exception as error:  # cut short, overwritten, not an npz: rebuild it
        print(f"warning: the cache file {path} is damaged ({type(error).__name__}: {error}); rebuilding it",
              flush=True)
        path.unlink(missing_ok=True)
        return None


# ---------------------------------------------------------------- packing and batches


@dataclass
class PackedRows:
    """Examples packed into fixed rows; every array is (num_rows, seq_len), padding has segment 0."""

    inputs: np.ndarray  # int32
    targets: np.ndarray  # int32
    segment_ids: np.ndarray  # int32: 1, 2, 3... per example within a row, 0 = padding
    positions: np.ndarray  # int32: restart at 0 for each example
    loss_mask: np.ndarray  # float32
    example_index: np.ndarray  # int32: which example of the split a token belongs to, -1 = padding
    num_truncated: int = 0  # examples whose review was cut to fit seq_len

    @property
    def num_rows(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(np.count_nonzero(self.segment_ids))

    @property
    def num_examples(self) -> int:
        return int(self.segment_ids.max(axis=1, initial=0).sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / max(self.segment_ids.size, 1)


def _fit_prompt(prompt: np.ndarray, answer_len: int, seq_len: int) -> tuple[np.ndarray, bool]:
    """The prompt, with the end of its review cut if prompt + answer + EOS exceeds seq_len + 1 tokens."""
    budget = seq_len - answer_len  # inputs are seq[:-1], so the EOS costs no input slot
    if len(prompt) <= budget:
        return prompt, False
    review_budget = budget - 1 - PROMPT_TAIL_TOKENS
    if review_budget < 0:
        raise ConfigError(
            f"data.seq_len={seq_len} cannot hold BOS, the last {PROMPT_TAIL_TOKENS} prompt tokens and a "
            f"{answer_len}-token answer; use e.g. data.seq_len=128"
        )
    return np.concatenate([prompt[: 1 + review_budget], prompt[-PROMPT_TAIL_TOKENS:]]), True


def pack(
    tokenized: TokenizedSplit, seq_len: int, loss_on: str, eos_id: int, pad_id: int = 0, seed: int = 0
) -> PackedRows:
    """Pack the examples into rows of seq_len by best-fit decreasing, so little compute goes to padding."""
    if loss_on not in ("all", "answer"):
        raise ConfigError(f"data.loss_on={loss_on!r}: expected 'all' or 'answer'")
    sequences, answer_starts, num_truncated = [], [], 0
    for prompt, answer in zip(tokenized.prompts, tokenized.answers):
        prompt, truncated = _fit_prompt(prompt, len(answer), seq_len)
        num_truncated += truncated
        sequences.append(np.concatenate([prompt, answer, [eos_id]]).astype(np.int32))
        answer_starts.append(len(prompt))
    lengths = np.array([len(sequence) - 1 for sequence in sequences], dtype=np.int64)

    # Longest first; the seeded shuffle only decides the order among equal lengths.
    shuffled = np.random.default_rng(seed).permutation(len(sequences))
    order = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
    # rows_with_room[r]: rows with exactly r free slots, so best fit is a scan over r, not over rows.
    rows_with_room: list[list[int]] = [[] for _ in range(seq_len + 1)]
    row_items: list[list[int]] = []
    for index in order:
        length = int(lengths[index])
        room = next((r for r in range(length, seq_len + 1) if rows_with_room[r]), None)
        if room is None:
            row, room = len(row_items), seq_len
            row_items.append([])
        else:
            row = rows_with_room[room].pop()
        row_items[row].append(int(index))
        rows_with_room[room - length].append(row)

    shape = (len(row_items), seq_len)
    inputs, targets = np.full(shape, pad_id, np.int32), np.full(shape, pad_id, np.int32)
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    loss_mask, example_index = np.zeros(shape, np.float32), np.full(shape, -1, np.int32)
    for row, items in enumerate(row_items):
        start = 0
        for segment, index in enumerate(items, start=1):
            sequence, stop = sequences[index], start + int(lengths[index])
            inputs[row, start:stop], targets[row, start:stop] = sequence[:-1], sequence[1:]
            segment_ids[row, start:stop], example_index[row, start:stop] = segment, index
            positions[row, start:stop] = np.arange(stop - start)
            # Target j is token j + 1: the answer and EOS are targets from answer_start - 1 on.
            first_loss = 0 if loss_on == "all" else answer_starts[index] - 1
            loss_mask[row, start + first_loss : stop] = 1.0
            start = stop
    return PackedRows(inputs, targets, segment_ids, positions, loss_mask, example_index, num_truncated)


_BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def steps_per_epoch(rows: PackedRows, batch_size: int) -> int:
    return math.ceil(rows.num_rows / batch_size)


def batches(rows: PackedRows, batch_size: int, seed: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless (batch_size, seq_len) batches, rows reshuffled each epoch; a short last batch wraps around.

    `start` skips that many batches (a resumed trial), drawing the same permutations on the way.
    """
    if rows.num_rows == 0:
        raise ValueError("no packed rows to batch; the training split is empty")
    rng = np.random.default_rng(seed)
    steps = steps_per_epoch(rows, batch_size)
    while True:
        # np.resize repeats the permutation, filling the last batch (or a batch larger than the data).
        order = np.resize(rng.permutation(rows.num_rows), steps * batch_size)
        for step in range(steps):
            if start > 0:
                start -= 1
                continue
            take = order[step * batch_size : (step + 1) * batch_size]
            yield {key: getattr(rows, key)[take] for key in _BATCH_KEYS}
