"""Rotten Tomatoes: load the splits, sample a ratio, format prompts (trainer/packing.py tokenizes,
packs and batches them).

Run `python -m trainer.data prepare --out DIR` to write the reference workflow's files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trainer.config import ConfigError, DataConfig

LABEL_NAMES = ("Negative", "Positive")  # index = label: 0 negative, 1 positive
SPLITS = ("train", "validation", "test")
_CORNELL_FILES = {1: "rt-polarity.pos", 0: "rt-polarity.neg"}  # positives first, as the README orders them
_LABELS_BY_NAME = {"negative": 0, "positive": 1}
# A line is not review text when more than this share of its characters are control characters.
MAX_CONTROL_SHARE = 0.1
# With data.on_bad_line=skip, a split where more than this share of lines is bad is not the data.
MAX_SKIPPED_SHARE = 0.05


class DataError(ValueError):
    """The data cannot be found or read; the message says where and what to do."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass
class Dataset:
    """The three splits, where they came from, and how many bad lines each split skipped."""

    splits: dict[str, list[Example]]
    source: str
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    origin: str = ""  # how the folder was found: data.path=..., $ROTTEN_TOMATOES_DIR=..., hub dataset ...
    folder: str = ""  # the resolved folder the files were read from
    data_format: str = ""  # cornell | jsonl | parquet
    files: tuple[str, ...] = ()  # the files read, relative to `folder`, sorted
    # `cd <folder> && sha256sum <files...> | sha256sum`: one digest of every file read, checkable by hand.
    sha256: str = ""


# ---------------------------------------------------------------- loading

_Parsed = tuple[dict[str, list[Example]], dict[str, int]]  # splits, bad lines skipped per split

# (content hash, on_bad_line) -> (splits, skipped counts), parsed once per process.
_PARSED: dict[tuple[str, str], _Parsed] = {}


def load_splits(cfg: DataConfig) -> dict[str, list[Example]]:
    """{"train", "validation", "test"} -> examples; see `load_dataset` for where they come from."""
    return load_dataset(cfg).splits


def load_dataset(cfg: DataConfig) -> Dataset:
    """The splits from `cfg.path`, else the folder in `$cfg.env_var`, else the hub dataset `cfg.hub_id`."""
    if cfg.on_bad_line not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_line={cfg.on_bad_line!r}: expected 'error' or 'skip'")
    if cfg.path:
        folder, origin = Path(os.path.expanduser(cfg.path)), f"data.path={cfg.path}"
    elif os.environ.get(cfg.env_var):
        folder, origin = Path(os.path.expanduser(os.environ[cfg.env_var])), f"${cfg.env_var}={os.environ[cfg.env_var]}"
    else:
        folder, origin = _download_from_hub(cfg), f"hub dataset {cfg.hub_id}"
    if not folder.is_dir():
        raise DataError(f"{origin}: {folder} is not a folder; point data.path at a folder with rt-polarity.pos/.neg")
    (splits, skipped), files, data_format, digest = _load_folder(folder, cfg.on_bad_line, origin)
    # Fresh lists, so a caller that shuffles or appends cannot change the memoised copy.
    fresh = {name: list(examples) for name, examples in splits.items()}
    return Dataset(fresh, f"{origin} ({folder})", dict(skipped), origin=origin, folder=str(folder.resolve()),
                   data_format=data_format, files=files, sha256=digest)


def _download_from_hub(cfg: DataConfig) -> Path:
    """A local snapshot of the hub dataset (its parquet or JSON split files)."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=cfg.hub_id, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl", "*.pos", "*.neg"]
        )
    except Exception as error:  # offline, gated or missing: the fix is the same local copy
        raise DataError(
            f"no local Rotten Tomatoes data and the hub dataset {cfg.hub_id!r} could not be downloaded "
            f"({type(error).__name__}: {error}). Point at a local copy: data.path=/path/to/rotten_tomatoes "
            f"or export {cfg.env_var}=/path/to/rotten_tomatoes (a folder with rt-polarity.pos and "
            "rt-polarity.neg, or train/validation/test.jsonl)"
        ) from error
    return Path(folder)


def _load_folder(folder: Path, on_bad_line: str, origin: str) -> tuple[_Parsed, tuple[str, ...], str, str]:
    """Parse a folder once per process (the memo is keyed by the hash of the files read); returns
    the parsed splits, the files read (relative names), the format and their `sha256sum` digest."""
    if all((folder / name).is_file() for name in _CORNELL_FILES.values()):
        files = {label: folder / name for label, name in _CORNELL_FILES.items()}
        data_format, reader = "cornell", _read_cornell
    elif all((folder / f"{split}.jsonl").is_file() for split in SPLITS):
        files = {split: folder / f"{split}.jsonl" for split in SPLITS}
        data_format, reader = "jsonl", _read_jsonl_splits
    elif all(_find_parquet(folder, split) for split in SPLITS):
        files = {split: _find_parquet(folder, split) for split in SPLITS}
        data_format, reader = "parquet", _read_parquet_splits
    else:
        raise DataError(
            f"{origin}: {folder} holds neither rt-polarity.pos + rt-polarity.neg nor "
            "train.jsonl + validation.jsonl + test.jsonl; point data.path at such a folder"
        )
    contents = {key: path.read_bytes() for key, path in files.items()}
    digest = hashlib.sha256(data_format.encode())
    for key in sorted(contents, key=str):
        digest.update(f"{key}:{len(contents[key])}:".encode())
        digest.update(contents[key])
    memo_key = (digest.hexdigest(), on_bad_line)
    if memo_key not in _PARSED:
        parsed = reader(files, contents, on_bad_line)
        _check_parsed(*parsed, files, data_format)
        _PARSED[memo_key] = parsed
    names = {key: path.relative_to(folder).as_posix() for key, path in files.items()}
    # What `sha256sum` prints for each file, in name order, digested once more.
    listing = "".join(f"{hashlib.sha256(contents[key]).hexdigest()}  {names[key]}\n"
                      for key in sorted(files, key=lambda k: names[k]))
    return _PARSED[memo_key], tuple(sorted(names.values())), data_format, hashlib.sha256(listing.encode()).hexdigest()


def text_problem(text: str) -> str | None:
    """Why `text` is not a review ("empty review", "not text: ..."), or None."""
    if not text:
        return "empty review"
    control = sum(1 for ch in text if (ord(ch) < 32 and ch != "\t") or 127 <= ord(ch) < 160)
    if control > MAX_CONTROL_SHARE * len(text):
        return f"not text ({control} of {len(text)} characters are control characters)"
    return None


def _check_parsed(splits: dict[str, list[Example]], skipped: dict[str, int], files: dict, data_format: str) -> None:
    """Stop on data that would train and score without error but mean nothing: a split that is
    mostly bad lines (skipped), or a split without one of the two classes."""
    for split in SPLITS:
        kept, bad = len(splits[split]), skipped[split]
        if bad and bad > MAX_SKIPPED_SHARE * (kept + bad):
            where = ", ".join(str(p) for p in files.values()) if data_format == "cornell" else str(files[split])
            raise DataError(
                f"{bad} of {kept + bad} lines of the {split} split ({where}) are not reviews and were skipped "
                f"(data.on_bad_line=skip allows at most {MAX_SKIPPED_SHARE:.0%}); this does not look like the "
                "data: check the file, or set data.on_bad_line=error to see the first bad line"
            )
        present = {e.label for e in splits[split]}
        for label, name in enumerate(LABEL_NAMES):
            if label not in present:
                where = files[label] if data_format == "cornell" else files[split]
                raise DataError(
                    f"the {split} split has no {name} examples (from {where}: is the file empty or cut short?); "
                    "accuracy on one class means nothing. Point data.path at the complete data"
                )


def _bad_line(path: Path, line_number: int, problem: str) -> DataError:
    return DataError(
        f"{path}:{line_number}: {problem}; fix the line, or set data.on_bad_line=skip to skip bad lines"
    )


def _read_cornell(files: dict[int, Path], contents: dict[int, bytes], on_bad_line: str) -> _Parsed:
    """The README's split rule: 80% / 10% / 10% of each file, positives then negatives."""
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    skipped = dict.fromkeys(SPLITS, 0)
    for label in (1, 0):
        # Split on b"\n" only: the files hold \x85, which str.splitlines would treat as a line break.
        lines = contents[label].split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        n = len(lines)
        bounds = {"train": (0, int(n * 0.8 + 0.5)), "validation": (int(n * 0.8 + 0.5), int(n * 0.9 + 0.5))}
        bounds["test"] = (bounds["validation"][1], n)
        for split, (start, stop) in bounds.items():
            for index in range(start, stop):
                text = lines[index].decode("latin-1").strip()
                problem = text_problem(text)
                if problem:
                    # Dropped after the index split, so one bad line never shifts the others.
                    if on_bad_line == "error":
                        raise _bad_line(files[label], index + 1, problem)
                    skipped[split] += 1
                    continue
                splits[split].append(Example(text, label))
    return splits, skipped


def _read_jsonl_splits(files: dict[str, Path], contents: dict[str, bytes], on_bad_line: str) -> _Parsed:
    splits: dict[str, list[Example]] = {}
    skipped = dict.fromkeys(SPLITS, 0)
    for split in SPLITS:
        splits[split] = []
        for line_number, raw in enumerate(contents[split].split(b"\n"), start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing one) are not records
            try:
                example = _parse_record(_decode_json_line(raw))
            except ValueError as problem:
                if on_bad_line == "error":
                    raise _bad_line(files[split], line_number, str(problem)) from None
                skipped[split] += 1
                continue
            splits[split].append(example)
    return splits, skipped


def _decode_json_line(raw: bytes) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"bytes that are not valid UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg} at column {error.colno})") from None


def _parse_record(record: Any) -> Example:
    """An Example from {"text": str, "label": 0 | 1 | "positive" | "negative"}; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("text", "label"):
        if key not in record:
            raise ValueError(f'missing field "{key}"')
    text, label = record["text"], record["label"]
    if not isinstance(text, str):
        raise ValueError(f'"text" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise ValueError('empty "text"')
    problem = text_problem(text.strip())
    if problem:
        raise ValueError(f'"text" is {problem}')
    if isinstance(label, str) and label.strip().lower() in _LABELS_BY_NAME:
        label = _LABELS_BY_NAME[label.strip().lower()]
    elif isinstance(label, (int, np.integer)) and not isinstance(label, bool) and int(label) in (0, 1):
        label = int(label)
    else:
        raise ValueError(f'unknown label {label!r}; expected 0, 1, "negative" or "positive"')
    return Example(text.strip(), label)


def _find_parquet(folder: Path, split: str) -> Path | None:
    """The parquet file of `split` in a hub snapshot (e.g. train.parquet, data/train-00000-of-00001.parquet)."""
    matches = sorted(
        path for path in folder.rglob("*.parquet") if path.stem == split or path.stem.startswith(f"{split}-")
    )
    return matches[0] if matches else None


def _read_parquet_splits(files: dict[str, Path], contents: dict[str, bytes], on_bad_line: str) -> _Parsed:
    import io

    import pandas as pd

    splits: dict[str, list[Example]] = {}
    skipped = dict.fromkeys(SPLITS, 0)
    for split in SPLITS:
        frame = pd.read_parquet(io.BytesIO(contents[split]))
        splits[split] = []
        for row_number, record in enumerate(frame.to_dict(orient="records"), start=1):
            try:
                splits[split].append(_parse_record(record))
            except ValueError as problem:
                if on_bad_line == "error":
                    raise _bad_line(files[split], row_number, f"row {row_number}: {problem}") from None
                skipped[split] += 1
    return splits, skipped


# ---------------------------------------------------------------- sampling and prompts


def sample_ratio(examples: Sequence[Example], ratio: float, seed: int) -> list[Example]:
    """A seeded subset of int(ratio * N + 0.5) examples with the classes in the original proportions."""
    if isinstance(ratio, bool) or not (isinstance(ratio, numbers.Real) and 0.0 < ratio <= 1.0):
        raise ConfigError(f"ratio={ratio} is outside (0, 1]; use e.g. ratio=0.9")
    if ratio == 1.0:
        return list(examples)
    total = int(ratio * len(examples) + 0.5)
    return [examples[index] for index in stratified_indices([e.label for e in examples], total, seed)]


def stratified_indices(labels: Sequence[int], total: int, seed: int) -> list[int]:
    """`total` of the indices of `labels` (all, if fewer), drawn with `seed`, each class in its
    original proportion (largest remainder), in their original order."""
    if total >= len(labels):
        return list(range(len(labels)))
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(index)
    classes = sorted(by_label)
    # Largest remainder: floor each class's exact share, then hand out the rest by largest fraction.
    shares = {label: total * len(by_label[label]) / len(labels) for label in classes}
    counts = {label: math.floor(shares[label]) for label in classes}
    by_fraction = sorted(classes, key=lambda label: (-(shares[label] - counts[label]), label))
    for label in by_fraction[: total - sum(counts.values())]:
        counts[label] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in classes:
        indices = np.asarray(by_label[label])
        chosen.extend(rng.permutation(indices)[: counts[label]].tolist())
    return sorted(chosen)


def prompt_text(review: str) -> str:
    """The reference study's prompt: the model continues it with the sentiment."""
    return f"[Text]: {review}\n[Sentiment]:"


def answer_text(label: int) -> str:
    return LABEL_NAMES[label]


def full_text(example: Example) -> str:
    return prompt_text(example.text) + " " + answer_text(example.label)


# ---------------------------------------------------------------- prepare command


def prepare(out: Path, cfg: DataConfig) -> tuple[dict[str, int], Dataset]:
    """Write the reference workflow's files (split JSONL, eval requests, labels); returns counts per file."""
    dataset = load_dataset(cfg)
    splits = dataset.splits
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    for split, examples in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for example in examples:
                handle.write(json.dumps({"text": full_text(example)}, ensure_ascii=False) + "\n")
        written[f"{split}.jsonl"] = len(examples)
    for split in ("test", "validation"):
        request = {"prefix_text": [prompt_text(example.text) for example in splits[split]]}
        (out / f"{split}_eval_request.json").write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
        (out / f"{split}_labels.json").write_text(json.dumps([example.label for example in splits[split]]))
        written[f"{split}_eval_request.json"] = written[f"{split}_labels.json"] = len(splits[split])
    return written, dataset


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="write split JSONL, eval requests and labels")
    prepare_parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    prepare_parser.add_argument("--data-path", help="folder with rt-polarity.pos/.neg or split JSONL files")
    prepare_parser.add_argument("--on-bad-line", choices=("error", "skip"), default="error")
    args = parser.parse_args(argv)
    cfg = DataConfig(path=args.data_path, on_bad_line=args.on_bad_line)
    try:
        written, dataset = prepare(args.out, cfg)
    except DataError as error:
        parser.exit(1, f"error: {error}\n")
    print(f"read {dataset.source}")
    for name, count in written.items():
        print(f"wrote {args.out / name}: {count} examples")
    if any(dataset.skipped.values()):
        print(f"skipped bad lines: {dataset.skipped}")


if __name__ == "__main__":
    main()
