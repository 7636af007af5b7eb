"""A sentencepiece tokenizer: LLaMA's own, or a small BPE model trained on the train split.

BOS and EOS are handled as LLaMA does: `encode` adds neither; data.py prepends BOS to each
prompt and appends EOS after each answer.
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
    """A sentencepiece model with LLaMA's special ids; padding uses id 0 (unk), always masked."""

    def __init__(self, model_proto: bytes, source: str = "") -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.source = source
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = 0
        self.vocab_size: int = self._sp.get_piece_size()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a `tokenizer.model` file."""
        return cls(Path(path).read_bytes(), source=str(path))

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

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r}, fingerprint={self.fingerprint[:12]})"


def load_tokenizer(model_cfg: ModelConfig, train_texts: Sequence[str], cache_dir: str) -> Tokenizer:
    """The tokenizer of `model_cfg`: a given model file, the checkpoint's, or a BPE trained on `train_texts`.

    `train_texts` are the formatted training examples (`data.full_text`); pass the whole train
    split, not a sampled subset, so trials with different ratios share one tokenizer.
    """
    path = _pretrained_tokenizer_path(model_cfg)
    if path is not None:
        tokenizer = Tokenizer.from_file(path)
    else:
        tokenizer = _trained_bpe(train_texts, model_cfg.vocab_size, expand_cache_dir(cache_dir) / "tokenizers")
    if tokenizer.vocab_size != model_cfg.vocab_size:
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


def _pretrained_tokenizer_path(model_cfg: ModelConfig) -> Path | None:
    """The `tokenizer.model` that `model_cfg` names, or None to train one."""
    if model_cfg.tokenizer:
        path = Path(os.path.expanduser(model_cfg.tokenizer))
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise ConfigError(
                f"model.tokenizer={model_cfg.tokenizer!r}: no sentencepiece model at {path}; "
                "point it at a tokenizer.model file (or its folder), or set model.tokenizer=null to train one"
            )
        return path
    if not model_cfg.checkpoint:
        return None
    local = Path(os.path.expanduser(model_cfg.checkpoint))
    if local.is_dir():
        if (local / "tokenizer.model").is_file():
            return local / "tokenizer.model"
        raise ConfigError(
            f"model.checkpoint={model_cfg.checkpoint!r} has no tokenizer.model; set model.tokenizer=PATH"
        )
    # A hub id: a pretrained checkpoint must use its own tokenizer, never a freshly trained one.
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=model_cfg.checkpoint, filename="tokenizer.model"))
    except Exception as error:  # any hub failure (offline, missing repo) has the same fix
        raise ConfigError(
            f"could not fetch tokenizer.model of model.checkpoint={model_cfg.checkpoint!r} from the "
            f"Hugging Face hub ({type(error).__name__}: {error}); download it and set model.tokenizer=PATH"
        ) from error


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
        return Tokenizer.from_file(path)
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
    return Tokenizer(model.getvalue(), source=str(path))
