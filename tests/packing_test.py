"""trainer.packing: the tokenization cache, packed rows (every example once, intact, masked) and batches."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import data
from trainer import packing
from trainer.config import ConfigError
from trainer.data import Example


# ---------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenized_train(rt_splits, tiny_tokenizer, tmp_path_factory):
    return packing.tokenize_examples(rt_splits["train"], tiny_tokenizer, str(tmp_path_factory.mktemp("tok")))


def test_tokenized_layout(rt_splits, tiny_tokenizer, tokenized_train):
    assert len(tokenized_train) == 8530
    first = rt_splits["train"][0]
    assert tokenized_train.prompts[0].dtype == np.int32
    assert tokenized_train.prompts[0][0] == tiny_tokenizer.bos_id
    assert tokenized_train.prompts[0][1:].tolist() == tiny_tokenizer.encode(data.prompt_text(first.text))
    assert tokenized_train.answers[0].tolist() == tiny_tokenizer.encode("Positive")
    assert [a.tolist() for a in tokenized_train.candidate_answers] == [
        tiny_tokenizer.encode("Negative"),
        tiny_tokenizer.encode("Positive"),
    ]
    assert tokenized_train.labels.dtype == np.int32
    assert tokenized_train.labels.tolist() == [e.label for e in rt_splits["train"]]
    for label in (0, 1):
        index = int(np.flatnonzero(tokenized_train.labels == label)[0])
        assert tokenized_train.answers[index].tolist() == tokenized_train.candidate_answers[label].tolist()


def test_tokenization_cache_in_process_and_on_disk(rt_splits, tiny_tokenizer, tmp_path, monkeypatch):
    examples = rt_splits["validation"]
    first = packing.tokenize_examples(examples, tiny_tokenizer, str(tmp_path))
    assert packing.tokenize_examples(examples, tiny_tokenizer, str(tmp_path)) is first
    (cached,) = (tmp_path / "tokenized").glob("*.npz")
    # A new process: the in-process memo is empty, so the file on disk must serve it.
    monkeypatch.setattr(packing, "_TOKENIZED", {})
    monkeypatch.setattr(tiny_tokenizer, "encode_batch", lambda texts: pytest.fail("cache missed"))
    again = packing.tokenize_examples(examples, tiny_tokenizer, str(tmp_path))
    assert again is not first
    assert all(np.array_equal(a, b) for a, b in zip(again.prompts, first.prompts))
    assert all(np.array_equal(a, b) for a, b in zip(again.answers, first.answers))
    assert np.array_equal(again.labels, first.labels)
    assert list((tmp_path / "tokenized").iterdir()) == [cached]


def test_tokenization_cache_key_changes_with_labels(rt_splits, tiny_tokenizer, tmp_path):
    examples = rt_splits["test"][:20]
    flipped = [Example(e.text, 1 - e.label) for e in examples]
    packing.tokenize_examples(examples, tiny_tokenizer, str(tmp_path))
    packing.tokenize_examples(flipped, tiny_tokenizer, str(tmp_path))
    assert len(list((tmp_path / "tokenized").glob("*.npz"))) == 2


# ---------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def packed_all(tokenized_train, tiny_tokenizer):
    return packing.pack(tokenized_train, 128, "all", tiny_tokenizer.eos_id, seed=0)


def _segments(rows: packing.PackedRows):
    """(row, start, stop, example index) of every packed example."""
    for row in range(rows.num_rows):
        for segment in range(1, int(rows.segment_ids[row].max()) + 1):
            where = np.flatnonzero(rows.segment_ids[row] == segment)
            yield row, int(where[0]), int(where[-1]) + 1, int(rows.example_index[row, where[0]])


def test_padding_under_five_percent(packed_all):
    assert packed_all.inputs.shape[1] == 128
    assert packed_all.padding_fraction < 0.05
    assert packed_all.num_truncated == 0


def test_every_example_packed_once_and_intact(packed_all, tokenized_train, tiny_tokenizer):
    assert packed_all.num_examples == len(tokenized_train)
    seen = []
    for row, start, stop, index in _segments(packed_all):
        seen.append(index)
        expected = np.concatenate(
            [tokenized_train.prompts[index], tokenized_train.answers[index], [tiny_tokenizer.eos_id]]
        )
        assert np.array_equal(packed_all.inputs[row, start:stop], expected[:-1])
        assert np.array_equal(packed_all.targets[row, start:stop], expected[1:])
        assert np.array_equal(packed_all.positions[row, start:stop], np.arange(stop - start))
        # Targets are the next inputs within a segment.
        assert np.array_equal(packed_all.targets[row, start : stop - 1], packed_all.inputs[row, start + 1 : stop])
    assert sorted(seen) == list(range(len(tokenized_train)))
    assert packed_all.num_tokens == int(tokenized_train.lengths.sum())


def test_segments_are_contiguous_and_padding_is_masked(packed_all):
    for row_segments in packed_all.segment_ids:
        real = row_segments[row_segments > 0]
        assert np.all(np.diff(real) >= 0) and real[0] == 1
        assert np.all(np.diff(np.unique(real)) == 1)
        # Padding only at the end of a row.
        assert np.all(row_segments[len(real) :] == 0)
    padding = packed_all.segment_ids == 0
    assert np.all(packed_all.loss_mask[padding] == 0)
    assert np.all(packed_all.inputs[padding] == 0) and np.all(packed_all.example_index[padding] == -1)
    assert np.all(packed_all.loss_mask[~padding] == 1)  # loss_on="all"
    for name, dtype in [("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                        ("positions", np.int32), ("loss_mask", np.float32)]:
        assert getattr(packed_all, name).dtype == dtype, name


def test_loss_on_answer_masks_only_answer_and_eos(tokenized_train, tiny_tokenizer):
    rows = packing.pack(tokenized_train, 128, "answer", tiny_tokenizer.eos_id, seed=0)
    answer_ids = {int(a[0]) for a in tokenized_train.candidate_answers}
    for row, start, stop, index in _segments(rows):
        masked_targets = rows.targets[row, start:stop][rows.loss_mask[row, start:stop] == 1]
        expected = [*tokenized_train.answers[index].tolist(), tiny_tokenizer.eos_id]
        assert masked_targets.tolist() == expected
    assert rows.loss_mask.sum() == 2 * len(tokenized_train)  # one-piece answers + EOS
    assert set(rows.targets[rows.loss_mask == 1].tolist()) == answer_ids | {tiny_tokenizer.eos_id}


def test_pack_is_deterministic_given_seed(tokenized_train, tiny_tokenizer, packed_all):
    again = packing.pack(tokenized_train, 128, "all", tiny_tokenizer.eos_id, seed=0)
    assert np.array_equal(again.inputs, packed_all.inputs)
    other = packing.pack(tokenized_train, 128, "all", tiny_tokenizer.eos_id, seed=1)
    assert other.num_examples == packed_all.num_examples


def test_long_examples_keep_bos_prompt_tail_and_answer(tiny_tokenizer, tmp_path):
    long_review = " ".join(["wonderful"] * 200)
    tokenized = packing.tokenize_examples([Example(long_review, 1), Example("short .", 0)], tiny_tokenizer, str(tmp_path))
    rows = packing.pack(tokenized, 32, "answer", tiny_tokenizer.eos_id)
    assert rows.num_truncated == 1 and rows.num_examples == 2
    (row, start, stop, _), = [s for s in _segments(rows) if s[3] == 0]
    assert stop - start == 32
    inputs = rows.inputs[row, start:stop].tolist()
    prompt = tokenized.prompts[0].tolist()
    assert inputs[0] == tiny_tokenizer.bos_id
    assert inputs[-1 - packing.PROMPT_TAIL_TOKENS : -1] == prompt[-packing.PROMPT_TAIL_TOKENS :]
    assert tiny_tokenizer.decode(prompt[-packing.PROMPT_TAIL_TOKENS :]).endswith("\n[Sentiment]:")
    assert rows.targets[row, stop - 2 : stop].tolist() == [*tokenized.answers[0].tolist(), tiny_tokenizer.eos_id]
    assert rows.loss_mask[row, start:stop].sum() == 2


def test_pack_rejects_unknown_loss_on(tokenized_train):
    with pytest.raises(ConfigError, match="data.loss_on='prompt'"):
        packing.pack(tokenized_train, 128, "prompt", eos_id=2)


# ---------------------------------------------------------------- batches


def test_batches_shapes_epochs_and_wrap_around(packed_all):
    steps = packing.steps_per_epoch(packed_all, 32)
    assert steps == -(-packed_all.num_rows // 32)
    stream = packing.batches(packed_all, 32, seed=0)
    epoch = [next(stream) for _ in range(steps)]
    for batch in epoch:
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
        assert all(array.shape == (32, 128) for array in batch.values())
    # Every row once per epoch (the short last batch wraps around to rows seen already).
    rows_seen = {tuple(row) for batch in epoch for row in batch["inputs"]}
    assert len(rows_seen) == len({tuple(row) for row in packed_all.inputs})
    next_epoch_first = next(stream)
    assert not np.array_equal(next_epoch_first["inputs"], epoch[0]["inputs"])  # reshuffled
    again = next(packing.batches(packed_all, 32, seed=0))
    assert np.array_equal(again["inputs"], epoch[0]["inputs"])


def test_batches_with_fewer_rows_than_batch_size(tokenized_train, tiny_tokenizer):
    small = packing.TokenizedSplit(tokenized_train.prompts[:5], tokenized_train.answers[:5],
                                tokenized_train.labels[:5], tokenized_train.candidate_answers)
    rows = packing.pack(small, 128, "all", tiny_tokenizer.eos_id)
    assert packing.steps_per_epoch(rows, 8) == 1
    batch = next(packing.batches(rows, 8, seed=0))
    assert batch["inputs"].shape == (8, 128)
