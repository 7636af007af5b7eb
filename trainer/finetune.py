"""Which weights train (`finetune.method`): all of them, LoRA adapters beside frozen weights, or
the top N blocks.

The choice is an nnx filter over the model's parameters; `train.create_state` splits the model
by it, so frozen weights sit in the state without gradients or optimizer moments.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from trainer.config import FinetuneConfig
from trainer.model import LoRA, LoRAParam, Llama


def add_adapters(model: Llama, cfg: FinetuneConfig, seed: int) -> Llama:
    """`model` with a LoRA adapter (B at zero) on each target projection of every block, in place."""
    rngs = nnx.Rngs(params=seed)
    for block in model.layers:
        for module in (block.attention, block.mlp):
            for name, weight in module.weights().items():
                if name not in cfg.targets:
                    continue
                shape = weight.get_value().shape
                in_dims = 2 if name == "o" else 1
                module.adapters[name] = LoRA(
                    shape[:in_dims], shape[in_dims:], cfg.rank, cfg.alpha, cfg.dropout,
                    rngs=rngs, dtype=weight.get_value().dtype,
                )
    return model


def trainable(cfg: FinetuneConfig, num_layers: int) -> Any:
    """The nnx filter of the parameters that train."""
    if cfg.method == "full":
        return nnx.Param
    if cfg.method == "lora":
        return LoRAParam
    first = num_layers - min(cfg.layers, num_layers)

    def top_layers(path: tuple, value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        if path[0] == "final_norm":
            return True
        return path[0] == "layers" and int(path[1]) >= first

    return top_layers


def prepare(model: Llama, cfg: FinetuneConfig, seed: int) -> tuple[Llama, Any]:
    """The model to train (with adapters under lora) and the filter of its trainable parameters."""
    if cfg.method == "lora":
        model = add_adapters(model, cfg, seed)
    return model, trainable(cfg, len(model.layers))
