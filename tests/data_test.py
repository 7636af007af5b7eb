"""Rotten Tomatoes loading, sampling, prompts and `prepare` (tests/packing_test.py: what follows)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trainer import data
from trainer.config import ConfigError, DataConfig
from trainer.data import DataError, Example

REPO = Path(__file__).resolve().parents[1]
FIRST_TEST_TEXT = (
    "lovingly photographed in the manner of a golden book sprung to life , "
    "stuart little 2 manages sweetness largely without stickiness ."
)


# ---------------------------------------------------------------- loading


def test_standard_split_sizes_and_order(rt_splits):
    assert {name: len(examples) for name, examples in rt_splits.items()} == {
        "train": 8530,
        "validation": 1066,
        "test": 1066,
    }
    assert rt_splits["test"][0] == Example(FIRST_TEST_TEXT, 1)
    assert rt_splits["train"][0].text.startswith("the rock is destined to be the 21st century's new")
    # All positives of a split, then all negatives.
    for name, half in (("train", 4265), ("validation", 533), ("test", 533)):
        labels = [example.label for example in rt_splits[name]]
        assert labels == [1] * half + [0] * half, name


def test_latin1_text_and_nel_byte_are_not_line_breaks(rt_splits):
    texts = [example.text for split in rt_splits.values() for example in split]
    assert any("é" in text for text in texts)
    # The files hold \x85 inside lines: splitting on it would have shifted every split.
    assert any("\x85" in text for text in texts)
    assert all(text == text.strip() and text for text in texts)


def test_load_is_memoised_and_returns_fresh_lists(rt_dir, monkeypatch):
    cfg = DataConfig(path=str(rt_dir))
    first = data.load_splits(cfg)
    first["train"].clear()
    calls = []
    monkeypatch.setattr(data, "_read_cornell", lambda *args: calls.append(args))
    second = data.load_splits(cfg)
    assert len(second["train"]) == 8530 and calls == []


def test_env_var_is_used_when_no_path(rt_dir, monkeypatch):
    monkeypatch.setenv("MY_RT_DIR", str(rt_dir))
    dataset = data.load_dataset(DataConfig(env_var="MY_RT_DIR"))
    assert len(dataset.splits["test"]) == 1066 and "MY_RT_DIR" in dataset.source


def test_offline_without_local_copy_says_how_to_point_at_one(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("the hub is unreachable")

    monkeypatch.delenv("ROTTEN_TOMATOES_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match=r"data\.path=.*ROTTEN_TOMATOES_DIR") as raised:
        data.load_splits(DataConfig())
    assert isinstance(raised.value, ValueError)


def test_hub_snapshot_with_parquet_files(rt_splits, tmp_path, monkeypatch):
    import pandas as pd

    (tmp_path / "data").mkdir()
    for split in data.SPLITS:
        rows = rt_splits[split][:5] + rt_splits[split][-5:]  # both classes (the Cornell order: positives first)
        frame = pd.DataFrame({"text": [e.text for e in rows], "label": [e.label for e in rows]})
        frame.to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    monkeypatch.delenv("ROTTEN_TOMATOES_DIR", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(tmp_path))
    splits = data.load_splits(DataConfig())
    assert splits["train"] == rt_splits["train"][:5] + rt_splits["train"][-5:]
    assert splits["test"][0].text == FIRST_TEST_TEXT


def test_path_without_data_files(tmp_path):
    with pytest.raises(DataError, match="rt-polarity.pos"):
        data.load_splits(DataConfig(path=str(tmp_path)))


def _write_jsonl(folder: Path, train_lines: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_bytes(b"\n".join(train_lines) + b"\n")
    (folder / "validation.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": "flat", "label": 0}\n')
    (folder / "test.jsonl").write_text('{"text": "dull", "label": "NEGATIVE"}\n{"text": "warm", "label": 1}\n')


def test_jsonl_folder(tmp_path):
    _write_jsonl(
        tmp_path,
        [
            b'{"text": "a joy", "label": 1}',
            b'{"text": " a bore ", "label": 0}',
            b'{"text": "lovely", "label": "Positive"}',
            b"",
            b'{"text": "caf\xc3\xa9 dull", "label": "negative", "extra": 3}',
        ],
    )
    splits = data.load_splits(DataConfig(path=str(tmp_path)))
    assert splits["train"] == [
        Example("a joy", 1),
        Example("a bore", 0),
        Example("lovely", 1),
        Example("café dull", 0),
    ]
    assert splits["validation"] == [Example("fine", 1), Example("flat", 0)]
    assert splits["test"] == [Example("dull", 0), Example("warm", 1)]


BAD_LINES = {
    "invalid JSON": b'{"text": "a joy", "label": 1',
    'missing field "text"': b'{"label": 1}',
    'missing field "label"': b'{"text": "a joy"}',
    "unknown label": b'{"text": "a joy", "label": "meh"}',
    "not valid UTF-8": b'{"text": "caf\xe9", "label": 1}',
    'empty "text"': b'{"text": "  ", "label": 1}',
}


@pytest.mark.parametrize("problem", sorted(BAD_LINES))
def test_bad_line_names_file_line_problem_and_fix(tmp_path, problem):
    _write_jsonl(tmp_path, [b'{"text": "a joy", "label": 1}', b'{"text": "meh", "label": 0}', BAD_LINES[problem]])
    with pytest.raises(DataError) as raised:
        data.load_splits(DataConfig(path=str(tmp_path)))
    message = str(raised.value)
    assert f"{tmp_path / 'train.jsonl'}:3:" in message
    assert problem in message
    assert "data.on_bad_line=skip" in message


GOOD_LINES = [b'{"text": "review %d", "label": %d}' % (i, i % 2) for i in range(200)]


def test_skip_mode_counts_bad_lines(tmp_path):
    _write_jsonl(tmp_path, [*GOOD_LINES[:100], *BAD_LINES.values(), *GOOD_LINES[100:]])
    dataset = data.load_dataset(DataConfig(path=str(tmp_path), on_bad_line="skip"))
    assert [e.text for e in dataset.splits["train"]] == [f"review {i}" for i in range(200)]
    assert dataset.skipped == {"train": len(BAD_LINES), "validation": 0, "test": 0}


def test_skip_mode_refuses_a_file_that_is_mostly_bad_lines(tmp_path):
    _write_jsonl(tmp_path, [*GOOD_LINES[:20], *(list(BAD_LINES.values()) * 3)])
    with pytest.raises(DataError, match=r"18 of 38 lines of the train split .*train\.jsonl.* are not reviews"):
        data.load_dataset(DataConfig(path=str(tmp_path), on_bad_line="skip"))


def test_random_bytes_are_not_reviews_even_when_skipping(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("rt-polarity.pos", "rt-polarity.neg"):
        (tmp_path / name).write_bytes(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="not text"):
        data.load_splits(DataConfig(path=str(tmp_path)))
    with pytest.raises(DataError, match="are not reviews"):
        data.load_splits(DataConfig(path=str(tmp_path), on_bad_line="skip"))


def test_a_missing_class_is_an_error_naming_the_file(rt_dir, tmp_path):
    (tmp_path / "rt-polarity.neg").write_bytes((rt_dir / "rt-polarity.neg").read_bytes())
    (tmp_path / "rt-polarity.pos").write_bytes(b"")
    with pytest.raises(DataError, match=r"no Positive examples \(from .*rt-polarity\.pos"):
        data.load_splits(DataConfig(path=str(tmp_path)))


def test_stratified_indices_keep_class_shares_and_order():
    labels = [1] * 50 + [0] * 50  # the Cornell order: every first row Positive
    keep = data.stratified_indices(labels, 10, seed=0)
    assert len(keep) == 10 and keep == sorted(keep)
    assert sum(labels[i] for i in keep) == 5
    assert data.stratified_indices(labels, 10, seed=0) == keep
    assert data.stratified_indices(labels, 10, seed=1) != keep
    assert data.stratified_indices(labels, 500, seed=0) == list(range(100))


def test_bool_and_out_of_range_labels_are_unknown(tmp_path):
    for label in (b"true", b"2", b"1.5", b"null"):
        _write_jsonl(tmp_path, [b'{"text": "x", "label": ' + label + b"}"])
        with pytest.raises(DataError, match="unknown label"):
            data.load_splits(DataConfig(path=str(tmp_path)))


def test_cornell_empty_line_does_not_shift_splits(tmp_path):
    pos = [f"good {i}" for i in range(40)]
    neg = [f"bad {i}" for i in range(40)]
    neg[3] = "   "
    (tmp_path / "rt-polarity.pos").write_text("\n".join(pos) + "\n", encoding="latin-1")
    (tmp_path / "rt-polarity.neg").write_text("\n".join(neg) + "\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"rt-polarity\.neg:4: empty review"):
        data.load_splits(DataConfig(path=str(tmp_path)))
    dataset = data.load_dataset(DataConfig(path=str(tmp_path), on_bad_line="skip"))
    assert dataset.skipped == {"train": 1, "validation": 0, "test": 0}
    assert [e.text for e in dataset.splits["validation"]] == [f"good {i}" for i in range(32, 36)] + [
        f"bad {i}" for i in range(32, 36)]


# ---------------------------------------------------------------- sampling and prompts


@pytest.mark.parametrize("ratio, size", [(0.5, 4265), (0.7, 5971), (0.9, 7677), (1.0, 8530)])
def test_ratio_sizes_and_class_balance(rt_splits, ratio, size):
    subset = data.sample_ratio(rt_splits["train"], ratio, seed=0)
    assert len(subset) == size
    counts = Counter(example.label for example in subset)
    assert abs(counts[0] - counts[1]) <= 1
    assert len(set(subset)) == size and set(subset) <= set(rt_splits["train"])


def test_ratio_is_seeded(rt_splits):
    train = rt_splits["train"]
    assert data.sample_ratio(train, 0.7, seed=3) == data.sample_ratio(train, 0.7, seed=3)
    assert data.sample_ratio(train, 0.7, seed=3) != data.sample_ratio(train, 0.7, seed=4)


def test_ratio_keeps_unbalanced_proportions():
    examples = [Example(f"p{i}", 1) for i in range(30)] + [Example(f"n{i}", 0) for i in range(70)]
    counts = Counter(example.label for example in data.sample_ratio(examples, 0.55, seed=0))
    assert counts == {1: 16, 0: 39}  # 16.5 and 38.5 of 55: the tie goes to the lower label


@pytest.mark.parametrize("ratio", [0, 0.0, 1.5, -0.1, float("nan")])
def test_ratio_outside_unit_interval(rt_splits, ratio):
    with pytest.raises(ConfigError, match=rf"ratio={ratio} is outside \(0, 1\]; use e\.g\. ratio=0\.9"):
        data.sample_ratio(rt_splits["train"], ratio, seed=0)


def test_prompt_format():
    example = Example("a gem .", 1)
    assert data.prompt_text(example.text) == "[Text]: a gem .\n[Sentiment]:"
    assert data.full_text(example) == "[Text]: a gem .\n[Sentiment]: Positive"
    assert data.answer_text(0) == "Negative" and data.LABEL_NAMES == ("Negative", "Positive")


# ---------------------------------------------------------------- prepare command


def test_prepare_command_writes_reference_files(rt_dir, tmp_path):
    out = tmp_path / "prepared"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.data", "prepare", "--out", str(out), "--data-path", str(rt_dir)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert "train.jsonl: 8530" in result.stdout
    with open(out / "train.jsonl", encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    assert first["text"].startswith("[Text]: the rock is destined")
    assert first["text"].endswith("\n[Sentiment]: Positive")
    test_line = json.loads((out / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert test_line == {"text": f"[Text]: {FIRST_TEST_TEXT}\n[Sentiment]: Positive"}
    request = json.loads((out / "test_eval_request.json").read_text(encoding="utf-8"))
    assert request["prefix_text"][0] == f"[Text]: {FIRST_TEST_TEXT}\n[Sentiment]:"
    labels = json.loads((out / "test_labels.json").read_text())
    assert len(request["prefix_text"]) == len(labels) == 1066 and labels[0] == 1 and labels[-1] == 0
    assert len(json.loads((out / "validation_eval_request.json").read_text())["prefix_text"]) == 1066
    assert len(json.loads((out / "validation_labels.json").read_text())) == 1066
    assert sum(1 for _ in open(out / "validation.jsonl", encoding="utf-8")) == 1066


def test_prepare_command_reports_missing_data(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.data", "prepare", "--out", str(tmp_path / "o"), "--data-path", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 1 and "rt-polarity.pos" in result.stderr


# ---------------------------------------------------------------- provenance


def _sha256sum_of_sha256sums(folder: Path, names: list[str]) -> str:
    """What `cd folder && sha256sum names... | sha256sum` prints, computed here independently."""
    import hashlib

    listing = "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in sorted(names))
    return hashlib.sha256(listing.encode()).hexdigest()


def test_a_dataset_says_where_it_was_found_which_files_it_read_and_their_digest(rt_dir, monkeypatch):
    monkeypatch.setenv("ROTTEN_TOMATOES_DIR", str(rt_dir))
    dataset = data.load_dataset(DataConfig())
    assert dataset.origin == f"$ROTTEN_TOMATOES_DIR={rt_dir}"
    assert dataset.folder == str(rt_dir.resolve()) and dataset.data_format == "cornell"
    assert dataset.files == ("rt-polarity.neg", "rt-polarity.pos")
    assert dataset.sha256 == _sha256sum_of_sha256sums(rt_dir, ["rt-polarity.pos", "rt-polarity.neg"])


def test_the_digest_changes_with_the_files(tmp_path):
    _write_jsonl(tmp_path, [b'{"text": "a joy", "label": 1}', b'{"text": "a bore", "label": 0}'])
    first = data.load_dataset(DataConfig(path=str(tmp_path)))
    assert first.data_format == "jsonl" and first.files == ("test.jsonl", "train.jsonl", "validation.jsonl")
    assert first.sha256 == _sha256sum_of_sha256sums(tmp_path, ["train.jsonl", "validation.jsonl", "test.jsonl"])
    _write_jsonl(tmp_path, [b'{"text": "a joy", "label": 1}', b'{"text": "a bore!", "label": 0}'])  # one byte more
    assert data.load_dataset(DataConfig(path=str(tmp_path))).sha256 != first.sha256


