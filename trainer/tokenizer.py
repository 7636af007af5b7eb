"""Tokenizers: a sentencepiece model (LLaMA's own, or a small BPE trained on the train split), a
Hugging Face `tokenizer.json`, or the vocabulary inside a GGUF file (trainer/tokenizer_files.py).

`encode` adds no special tokens; data.py prepends BOS to each prompt where the tokenizer's
metadata asks for it (`add_bos`) and appends EOS after each answer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from trainer.config import ConfigError, ModelConfig

# LLaMA's tokenizer settings, so the tiny trained model behaves like the real one:
# byte fallback instead of unknown pieces, no text normalization, digits split one by one.
_BPE_OPTIONS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "character_coverage": 1.0,
    "num_threads": 2,
}


# The one resolver `DataConfig.cache_dir` uses, resolved here when no Hydra run did it.
_OC_ENV = re.compile(r"\$\{oc\.env:([^,}]+)(?:,([^}]*))?\}")


class Tokenizer:
    """What every tokenizer offers: ids without special tokens, the special ids, a fingerprint.

    `fingerprint` identifies the exact mapping (cache keys depend on it); padding uses id 0,
    always masked.
    """

    source: str
    fingerprint: str
    bos_id: int
    eos_id: int
    pad_id: int = 0
    vocab_size: int
    add_bos: bool = True  # data.py starts every prompt with BOS

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, source={self.source!r}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with LLaMA's special ids."""

    def __init__(self, model_proto: bytes, source: str = "", add_bos: bool = True) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.source = source
        self.fingerprint = hashlib.sha256(model_proto + (b"" if add_bos else b"|no-bos")).hexdigest()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.vocab_size: int = self._sp.get_piece_size()
        self.add_bos = add_bos

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Load a `tokenizer.model` file."""
        data = Path(path).read_bytes()
        try:
            return cls(data, source=str(path))
        except RuntimeError as error:  # sentencepiece's own message ("ParseFromArray failed") names no file
            raise ConfigError(
                f"{path} is not a sentencepiece model ({error}); point model.tokenizer at a tokenizer.model, "
                f"a tokenizer.json or a .gguf file"
            ) from error

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (faster than a Python loop over `encode`)."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def load_tokenizer(
    model_cfg: ModelConfig, train_texts: Sequence[str], cache_dir: str, checkpoint: Path | None = None
) -> Tokenizer:
    """The tokenizer of `model_cfg`: model.tokenizer, else the checkpoint's own, else a BPE trained on `train_texts`.

    `checkpoint` is the resolved local checkpoint (folder or GGUF file); None resolves model.checkpoint.
    `train_texts` are the formatted training examples (`data.full_text`); pass the whole train
    split, not a sampled subset, so trials with different ratios share one tokenizer.
    """
    if checkpoint is None and model_cfg.checkpoint:
        from trainer.checkpoint import resolve_checkpoint

        checkpoint = resolve_checkpoint(model_cfg.checkpoint, model_cfg.checkpoint_sha256, expand_cache_dir(cache_dir))
    path = _pretrained_tokenizer_path(model_cfg, checkpoint)
    if path is not None:
        tokenizer = from_file(path)
    else:
        tokenizer = _trained_bpe(train_texts, model_cfg.vocab_size, expand_cache_dir(cache_dir) / "tokenizers")
    # A checkpoint's own shape is checked against the tokenizer where the model is built (trial.load_model).
    if checkpoint is None and tokenizer.vocab_size != model_cfg.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={model_cfg.vocab_size}; set model.vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer


def expand_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """`cache_dir` with `~` expanded and `${oc.env:NAME,default}` resolved (for configs built without Hydra)."""

    def env_or_default(match: re.Match) -> str:
        default = (match.group(2) or "").strip().strip("'\"")
        return os.environ.get(match.group(1).strip(), default)

    return Path(os.path.expanduser(_OC_ENV.sub(env_or_default, str(cache_dir))))


# In a checkpoint folder, in this order: LLaMA's sentencepiece model, then a Hugging Face tokenizer.json.
_FOLDER_FILES = ("tokenizer.model", "tokenizer.json")


def from_file(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a `tokenizer.model`, a `tokenizer.json` or a GGUF file's vocabulary."""
    from trainer import tokenizer_files
    from trainer.gguf_file import is_gguf

    path = Path(path)
    if is_gguf(path):
        return tokenizer_files.from_gguf(path)
    if path.suffix == ".json":
        return tokenizer_files.from_tokenizer_json(path)
    return SentencePieceTokenizer.from_file(path)


def _pretrained_tokenizer_path(model_cfg: ModelConfig, checkpoint: Path | None) -> Path | None:
    """The tokenizer file that `model_cfg` names or its checkpoint brings, or None to train one."""
    if model_cfg.tokenizer:
        path = Path(os.path.expanduser(model_cfg.tokenizer))
        if path.is_dir():
            path = next((path / name for name in _FOLDER_FILES if (path / name).is_file()), path / "tokenizer.model")
        if not path.is_file():
            raise ConfigError(
                f"model.tokenizer={model_cfg.tokenizer!r}: no tokenizer at {path}; point it at a tokenizer.model, "
                "a tokenizer.json or a .gguf file (or their folder), or set model.tokenizer=null"
            )
        return path
    if checkpoint is None:
        return None
    # A pretrained checkpoint must use its own tokenizer, never a freshly trained one.
    if checkpoint.is_file():
        return checkpoint  # a GGUF file carries its vocabulary
    for name in _FOLDER_FILES:
        if (checkpoint / name).is_file():
            return checkpoint / name
    raise ConfigError(
        f"model.checkpoint={model_cfg.checkpoint!r} ({checkpoint}) has neither tokenizer.model nor tokenizer.json; "
        f"set model.tokenizer=PATH"
    )


def bpe_cache_key(train_texts: Sequence[str], vocab_size: int) -> str:
    """sha256 over the training texts, the vocab size and the trainer options."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"vocab_size": vocab_size, **_BPE_OPTIONS}, sort_keys=True).encode())
    for text in train_texts:
        encoded = text.encode("utf-8")
        # Length-prefixed so that ["ab", "c"] and ["a", "bc"] hash differently.
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _trained_bpe(train_texts: Sequence[str], vocab_size: int, folder: Path) -> Tokenizer:
    """Train (or load the cached) BPE model; the cache file is the only thing written."""
    if not train_texts:
        raise ValueError("cannot train a tokenizer on no texts; pass the formatted train split")
    path = folder / f"bpe-{vocab_size}-{bpe_cache_key(train_texts, vocab_size)[:20]}.model"
    if path.is_file():
        try:
            return SentencePieceTokenizer.from_file(path)
        except Exception as error:  # damaged in the cache: train it again
            print(f"warning: the cached tokenizer {path} is damaged ({type(error).__name__}: {error}); "
                  "training it again", flush=True)
            path.unlink(missing_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_texts),
        model_writer=model,
        vocab_size=vocab_size,
        minloglevel=2,  # the trainer's progress log would drown the trial's own output
        **_BPE_OPTIONS,
    )
    folder.mkdir(parents=True, exist_ok=True)
    # Atomic write: parallel trials training the same model never read half a file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return SentencePieceTokenizer(model.getvalue(), source=str(path))
