"""Write a trained model as a Hugging Face LLaMA folder (`train.save_model`), without torch.

The folder holds config.json, model.safetensors (safetensors' numpy API), the tokenizer files,
generation_config.json and `llm_sweeper.json` (how the model was trained, evaluated and
prompted), so `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it and
`model.checkpoint=<folder>` trains or evaluates it here again. A LoRA model is written with
its adapters merged into the weights, and (`train.save_adapter`) the adapters alone in PEFT's
layout in `adapter/`. Every matrix is the inverse of trainer/checkpoint.py's mapping.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

from trainer.data import LABEL_NAMES, prompt_text
from trainer.model import Llama, LlamaShape

MODEL_DIR = "model"  # the saved model's folder inside a trial's output_dir
ADAPTER_DIR = "adapter"  # the PEFT adapter's folder inside the saved model's folder
METADATA_FILE = "llm_sweeper.json"
# PEFT's module names for our projections.
HF_PROJECTIONS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


def _host(param) -> np.ndarray:
    """A parameter's value as a host numpy array in its stored dtype (bfloat16 as ml_dtypes')."""
    value = param.get_value() if isinstance(param, nnx.Variable) else param
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        # A trial over several processes (trainer/distributed.py): each holds some shards. A
        # collective, so every process exports too, in the same order (the others into scratch).
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def _merged(weight: np.ndarray, adapter, in_dims: int) -> np.ndarray:
    """`weight` (in..., out...) plus its LoRA update A @ B * alpha / rank, computed in float32."""
    if adapter is None:
        return weight
    a = _host(adapter.a_IxR).astype(np.float32).reshape(math.prod(weight.shape[:in_dims]), -1)
    b = _host(adapter.b_RxO).astype(np.float32).reshape(a.shape[1], -1)
    delta = (a @ b * np.float32(adapter.scale)).reshape(weight.shape)
    return (weight.astype(np.float32) + delta).astype(weight.dtype)


def hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """Every weight by its Hugging Face name in HF's (out, in) layout, adapters merged in."""
    shape = model.shape
    d = shape.hidden_size

    def hf_in(w: np.ndarray) -> np.ndarray:  # (D, heads, H) or (D, F) -> (heads*H or F, D)
        return np.ascontiguousarray(w.reshape(d, -1).T)

    tensors = {
        "model.embed_tokens.weight": _host(model.embed_VxD),
        "model.norm.weight": _host(model.final_norm.scale),
    }
    if not shape.tied_embeddings:
        tensors["lm_head.weight"] = np.ascontiguousarray(_host(model.head_DxV).T)
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        attention, mlp = block.attention, block.mlp
        for name in ("q", "k", "v"):
            tensors[p + HF_PROJECTIONS[name] + ".weight"] = hf_in(
                _merged(_host(attention.weights()[name]), attention.adapters.get(name), 1))
        o = _merged(_host(attention.o_NxHxD), attention.adapters.get("o"), 2)
        tensors[p + "self_attn.o_proj.weight"] = np.ascontiguousarray(o.reshape(-1, d).T)
        for name in ("gate", "up", "down"):
            w = _merged(_host(mlp.weights()[name]), mlp.adapters.get(name), 1)
            tensors[p + HF_PROJECTIONS[name] + ".weight"] = np.ascontiguousarray(w.T)
        tensors[p + "input_layernorm.weight"] = _host(block.attention_norm.scale)
        tensors[p + "post_attention_layernorm.weight"] = _host(block.mlp_norm.scale)
    return tensors


def adapter_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The LoRA adapters in PEFT's layout: lora_A (rank, in) and lora_B (out, rank) per projection."""
    tensors = {}
    for i, block in enumerate(model.layers):
        for module in (block.attention, block.mlp):
            for name, adapter in module.adapters.items():
                a = _host(adapter.a_IxR)
                rank = a.shape[-1]
                key = f"base_model.model.model.layers.{i}.{HF_PROJECTIONS[name]}"
                tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
                tensors[key + ".lora_B.weight"] = np.ascontiguousarray(_host(adapter.b_RxO).reshape(rank, -1).T)
    return tensors


def hf_config(shape: LlamaShape, max_positions: int, bos_id: Optional[int], eos_id: int) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM with this shape (rope_theta both where transformers 4 and 5 read it)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "rope_scaling": None,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": shape.tied_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": shape.param_dtype,
        "dtype": shape.param_dtype,
    }


def write_tokenizer(tokenizer, folder: Path, max_positions: int) -> list[str]:
    """The tokenizer's own files (tokenizer.model or tokenizer.json) and tokenizer_config.json.

    What `trainer.tokenizer.from_file` reads back to the same ids and special tokens.
    """
    from trainer.tokenizer import SentencePieceTokenizer
    from trainer.tokenizer_files import HFTokenizer

    config: dict[str, Any] = {"add_bos_token": bool(tokenizer.add_bos), "add_eos_token": False,
                              "model_max_length": max_positions, "clean_up_tokenization_spaces": False}
    if isinstance(tokenizer, SentencePieceTokenizer):
        # The model proto itself: byte-identical ids, whatever trained or converted it.
        (folder / "tokenizer.model").write_bytes(tokenizer._sp.serialized_model_proto())
        unk = tokenizer._sp.unk_id()
        config.update(tokenizer_class="LlamaTokenizer", legacy=True, unk_token=tokenizer.id_to_piece(unk))
        written = ["tokenizer.model"]
    elif isinstance(tokenizer, HFTokenizer):
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers.processors import TemplateProcessing

        raw = RawTokenizer.from_str(tokenizer._tok.to_str())  # a copy: the trial's tokenizer stays as it is
        if tokenizer.add_bos and raw.post_processor is None:
            # transformers then starts a prompt with BOS as data.py does (ours encodes without it).
            bos = tokenizer.id_to_piece(tokenizer.bos_id)
            raw.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                    special_tokens=[(bos, tokenizer.bos_id)])
        raw.save(str(folder / "tokenizer.json"))
        config.update(tokenizer_class="PreTrainedTokenizerFast")
        written = ["tokenizer.json"]
    else:
        raise TypeError(f"cannot write the files of a {type(tokenizer).__name__}; expected sentencepiece or tokenizers")
    config["bos_token"] = tokenizer.id_to_piece(tokenizer.bos_id)
    config["eos_token"] = tokenizer.id_to_piece(tokenizer.eos_id)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return [*written, "tokenizer_config.json"]


def write_adapter(model: Llama, folder: Path, finetune_cfg, base_model: Optional[str]) -> Path:
    """adapter_config.json and adapter_model.safetensors, as PEFT's `save_pretrained` lays them out."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": finetune_cfg.rank,
        "lora_alpha": finetune_cfg.alpha,
        "lora_dropout": finetune_cfg.dropout,
        "target_modules": sorted(HF_PROJECTIONS[t].split(".")[-1] for t in finetune_cfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(adapter_tensors(model), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    _readable(folder / "adapter_model.safetensors")
    return folder


def _readable(path: Path) -> None:
    """As the user's umask makes other files (safetensors creates its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def save_hf(
    model: Llama,
    tokenizer,
    folder: str | Path,
    *,
    max_positions: int,
    max_new_tokens: int = 4,
    metadata: Optional[dict[str, Any]] = None,
    finetune_cfg=None,
    base_model: Optional[str] = None,
) -> Path:
    """`model` (adapters merged) as a Hugging Face LLaMA folder, written whole or not at all.

    With `finetune_cfg` of a LoRA model, the adapters alone also go to `adapter/` in PEFT's
    layout, naming `base_model` as their base. An existing folder is replaced.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        bos_id = tokenizer.bos_id if tokenizer.add_bos else None
        config = hf_config(model.shape, max_positions, bos_id, tokenizer.eos_id)
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(hf_tensors(model), str(partial / "model.safetensors"), metadata={"format": "pt"})
        _readable(partial / "model.safetensors")
        write_tokenizer(tokenizer, partial, max_positions)
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": tokenizer.eos_id,
                      "pad_token_id": tokenizer.eos_id, "do_sample": False, "max_new_tokens": max_new_tokens}
        (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        has_adapters = any(len(b.attention.adapters) or len(b.mlp.adapters) for b in model.layers)
        if finetune_cfg is not None and has_adapters:
            write_adapter(model, partial / ADAPTER_DIR, finetune_cfg, base_model)
        # Last: a folder with this file is complete (the sweeper looks for it).
        (partial / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, default=str) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The `llm_sweeper.json` of a saved model ({} for a folder written elsewhere)."""
    path = Path(folder) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _base_model_name(cfg) -> Optional[str]:
    """What a PEFT adapter names as its base: the checkpoint as resolved here (a folder, a GGUF file, the
    hub download's folder)."""
    checkpoint = cfg.model.checkpoint
    if checkpoint is None:
        return None
    from trainer.trial import _checkpoint_path

    return _checkpoint_path(checkpoint, cfg.model.checkpoint_sha256, cfg.data.cache_dir)


def _max_positions(cfg) -> int:
    if not cfg.model.checkpoint:
        return cfg.model.max_position_embeddings
    from trainer.checkpoint import model_config_values

    values = model_config_values(_base_model_name(cfg))
    return int(values.get("max_position_embeddings", cfg.model.max_position_embeddings))


def save_trial_model(cfg, graphdef: nnx.GraphDef, params: nnx.State, tokenizer, reports: dict) -> Optional[str]:
    """A finished trial's model in `<output_dir>/model` unless train.save_model=none; its path or None.

    `reports`: the trial's EvalReports by name ("test", "before/test", ...), kept in the metadata.
    Under a sweep with train.save_model=best, the sweeper keeps only the best trial's folder.
    """
    if cfg.train.save_model == "none":
        return None
    model = nnx.merge(graphdef, params)
    trial = dataclasses.asdict(cfg)
    metrics = {}
    for name, report in reports.items():
        metrics.update({k: v for k, v in report.metrics(name.replace("/", "_") + "_").items() if math.isfinite(v)})
    metadata = {
        "format": 1,
        "prompt": prompt_text("{review}"),
        "labels": list(LABEL_NAMES),
        "eval": trial["eval"],
        "save_model": cfg.train.save_model,
        "base_checkpoint": cfg.model.checkpoint,
        "metrics": {k: v for k, v in metrics.items() if k.endswith(("accuracy", "f1_macro", "invalid_rate"))},
        "trial": {k: v for k, v in trial.items() if k != "output_dir"},
    }
    folder = save_hf(
        model, tokenizer, Path(cfg.output_dir) / MODEL_DIR,
        max_positions=_max_positions(cfg), max_new_tokens=cfg.eval.max_new_tokens, metadata=metadata,
        finetune_cfg=cfg.finetune if cfg.finetune.method == "lora" and cfg.train.save_adapter else None,
        base_model=_base_model_name(cfg),
    )
    return str(folder)
