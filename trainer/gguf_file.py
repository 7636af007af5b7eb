"""GGUF checkpoints (llama.cpp's format), read with the `gguf` package: shape, weights, vocabulary.

The shape comes from the file's `llama.*` metadata. Every tensor is dequantized with
`gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, the K-quants and whatever
else that package can read) and handed out under its Hugging Face name, in Hugging Face's
(out, in) layout, so `trainer.checkpoint` maps it into `Llama` like a safetensors tensor.

llama.cpp's converter permutes the rows of the query and key projections so that rotary
embeddings pair adjacent dimensions (GPT-J style) instead of the two halves of each head
(rotate-half, ours and Hugging Face's); `_unpermute` undoes it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file that this LLaMA cannot load; the message names the file and the key."""


def is_gguf(path: str | Path) -> bool:
    """A file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # a truncated or damaged file fails in many ways inside the reader
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(error).__name__}: {error}); the file may be "
            f"truncated or damaged: download it again"
        ) from error


def reader(path: str | Path):
    """A memory-mapped `gguf.GGUFReader`, opened once per process (and again if the file changes)."""
    stat = Path(path).stat()
    return _reader(str(path), stat.st_mtime_ns, stat.st_size)


def metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value of the file's header, as Python values (arrays as lists)."""
    return {key: field.contents() for key, field in reader(path).fields.items()}


def _architecture(path: Path, meta: dict) -> str:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{path}: general.architecture={arch!r} is not supported; this trainer loads LLaMA-architecture "
            f"models ('llama')"
        )
    return arch


def model_config_from_gguf(path: str | Path) -> dict:
    """ModelConfig field values from a LLaMA GGUF file's metadata; other architectures fail here."""
    path = Path(path)
    meta = metadata(path)
    arch = _architecture(path, meta)

    def get(key: str, default: Any = None, required: bool = True):
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise GGUFError(f"{path} lacks {arch}.{key}; is this a complete LLaMA GGUF file?")
        if isinstance(value, list):
            raise GGUFError(f"{path}: {arch}.{key} differs per layer ({value[:4]}...); not supported")
        return value

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or any(t.name == "rope_freqs.weight" for t in reader(path).tensors):
        raise GGUFError(
            f"{path}: rope scaling ({scaling!r}, or a rope_freqs tensor) is not supported; only plain rotary "
            f"embeddings are implemented"
        )
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    tensors = {t.name: t for t in reader(path).tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path} has no token_embd.weight tensor")
    vocab = get("vocab_size", required=False) or int(tensors["token_embd.weight"].shape[-1])
    values = {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_layers": int(get("block_count")),
        "num_heads": heads,
        "num_kv_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tied_embeddings": "output.weight" not in tensors,
    }
    key_length = get("attention.key_length", required=False)
    if key_length is not None and int(key_length) != hidden // heads:
        values["head_dim"] = int(key_length)
    return values


# GGUF tensor name (per block: blk.{i}.) -> Hugging Face name (per layer: model.layers.{i}.)
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor; unknown names come back unchanged."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return name


def _unpermute(rows_x_in: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's query/key row order: within each head, (pairs, 2) back to (2, halves)."""
    out, fan_in = rows_x_in.shape
    return rows_x_in.reshape(heads, out // heads // 2, 2, fan_in).swapaxes(1, 2).reshape(out, fan_in)


def tensor_readers(path: str | Path) -> dict[str, Callable[[], np.ndarray]]:
    """Hugging Face tensor name -> a function that dequantizes that one tensor to float32 (out, in)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(path)
    values = model_config_from_gguf(path)
    heads = {"attn_q.weight": values["num_heads"], "attn_k.weight": values["num_kv_heads"]}

    def read_one(tensor) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            try:
                array = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as error:
                kind = GGMLQuantizationType(tensor.tensor_type).name
                raise GGUFError(
                    f"{path}: tensor {tensor.name} is stored as {kind}, which the gguf package cannot "
                    f"dequantize ({error}); use a file quantized as F16, Q8_0, Q4_K or similar"
                ) from error
            array = np.asarray(array, dtype=np.float32)
            suffix = tensor.name.split(".", 2)[-1]
            if suffix in heads:
                array = _unpermute(array, heads[suffix])
            return array

        return read

    return {hf_name(t.name): read_one(t) for t in reader(path).tensors}
