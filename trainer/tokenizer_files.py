"""Pretrained tokenizers besides sentencepiece files: Hugging Face `tokenizer.json` (with the
`tokenizers` library) and the vocabulary that a GGUF file embeds (`tokenizer.ggml.*`).

GGUF holds two kinds: `gpt2` (byte-level BPE: tokens, merges and a pre-tokenizer name) is
rebuilt as a `tokenizers` BPE; `llama` (sentencepiece: pieces, scores, types) is rebuilt as a
sentencepiece model proto, so it tokenizes exactly as the model it was converted from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from trainer.config import ConfigError
from trainer.tokenizer import SentencePieceTokenizer, Tokenizer

# GGUF pre-tokenizer names (tokenizer.ggml.pre) this loader rebuilds, as `tokenizers` pre-tokenizers.
# gpt2's split pattern is what ByteLevel(use_regex=True) applies; smollm splits every digit first.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SUPPORTED_PRE = ("default", "gpt2", "smollm", "llama-bpe", "llama3")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with the special ids and BOS setting of its checkpoint."""

    def __init__(self, tokenizer, source: str, *, bos_id: int | None, eos_id: int | None, add_bos: bool) -> None:
        if eos_id is None:
            raise ConfigError(f"tokenizer {source} names no EOS token; answers end with EOS, so one is needed")
        if add_bos and bos_id is None:
            raise ConfigError(f"tokenizer {source} asks for a BOS token but names none")
        self._tok = tokenizer
        self.source = source
        self.bos_id = bos_id if bos_id is not None else eos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        spec = json.dumps([tokenizer.to_str(), bos_id, eos_id, add_bos])
        self.fingerprint = hashlib.sha256(spec.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def from_tokenizer_json(path: str | Path) -> HFTokenizer:
    """`tokenizer.json`, with BOS/EOS and add_bos_token from the tokenizer_config.json beside it."""
    from tokenizers import Tokenizer as RawTokenizer

    path = Path(path)
    try:
        raw = RawTokenizer.from_file(str(path))
    except Exception as error:  # the library's errors name neither the file nor the fix
        raise ConfigError(
            f"{path} is not a Hugging Face tokenizer.json ({type(error).__name__}: {error}); point "
            f"model.tokenizer at a valid tokenizer.json, tokenizer.model or .gguf file"
        ) from error
    config_path = path.with_name("tokenizer_config.json")
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{config_path} is not valid JSON ({error}); fix or remove it") from error

    def special_id(key: str) -> int | None:
        text = _token_text(config.get(key))
        return raw.token_to_id(text) if text is not None else None

    bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
    # Without a config, whether BOS comes first is what the tokenizer's own post-processor does.
    default_bos = bos_id is not None and raw.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    add_bos = bool(config.get("add_bos_token", default_bos)) and bos_id is not None
    return HFTokenizer(raw, str(path), bos_id=bos_id, eos_id=eos_id, add_bos=add_bos)


def from_gguf(path: str | Path) -> Tokenizer:
    """The vocabulary embedded in a GGUF file, with its BOS/EOS ids and add_bos_token flag."""
    from trainer.gguf_file import GGUFError, metadata

    path = Path(path)
    try:
        meta = metadata(path)
    except GGUFError as error:  # truncated or damaged: a bad model.tokenizer / model.checkpoint, not a crash
        raise ConfigError(str(error)) from error
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ConfigError(f"{path} carries no vocabulary (tokenizer.ggml.tokens); set model.tokenizer=PATH")
    if kind == "gpt2":
        return _gguf_bpe(path, meta)
    if kind == "llama":
        return _gguf_sentencepiece(path, meta)
    raise ConfigError(
        f"{path}: tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2' (byte-level BPE) or 'llama' "
        f"(sentencepiece); set model.tokenizer to the model's tokenizer.json or tokenizer.model"
    )


def _gguf_bpe(path: Path, meta: dict) -> HFTokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE:
        raise ConfigError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not supported (known: {', '.join(SUPPORTED_PRE)}); "
            f"set model.tokenizer to the model's tokenizer.json"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    raw = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("llama-bpe", "llama3"))
    if pre == "smollm":
        raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated")
        raw.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        raw.pre_tokenizer = byte_level
    raw.decoder = decoders.ByteLevel()
    # Control and user-defined tokens (<|im_start|> and the like) match as whole tokens in text.
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, kind in enumerate(types) if kind in (3, 4)]
    raw.add_special_tokens(special)
    return HFTokenizer(
        raw, str(path),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


def _gguf_sentencepiece(path: Path, meta: dict) -> SentencePieceTokenizer:
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=float(score), type=int(kind))
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = 6 in types
    spec.unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
    spec.bos_id = int(meta.get("tokenizer.ggml.bos_token_id", 1))
    spec.eos_id = int(meta.get("tokenizer.ggml.eos_token_id", 2))
    spec.pad_id = -1
    spec.unk_piece, spec.bos_piece, spec.eos_piece = (tokens[spec.unk_id], tokens[spec.bos_id], tokens[spec.eos_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    return SentencePieceTokenizer(proto.SerializeToString(), source=str(path), add_bos=add_bos)
