"""Hugging Face export (trainer/export.py) against transformers and peft: logits, tokenizers, adapters."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer import finetune
from trainer.checkpoint import load_llama
from trainer.config import ConfigError, FinetuneConfig, TrainConfig, TrialConfig, validate
from trainer.export import ADAPTER_DIR, METADATA_FILE, save_hf
from trainer.model import LlamaShape, init_model
from trainer.tokenizer import from_file

ALL_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés", "9 ½ weeks"]


def shape_for(vocab_size: int, tied: bool, param_dtype: str = "float32") -> LlamaShape:
    # GQA: 4 query heads share 2 key/value heads.
    return LlamaShape(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, init_std=0.15, tied_embeddings=tied,
        param_dtype=param_dtype,
    )


def random_model(shape: LlamaShape, seed: int):
    """Weights large enough that logits are O(1), norms away from 1, so every mapping shows."""
    model = init_model(shape, seed)
    rng = np.random.default_rng(seed)
    for block in model.layers:
        for norm in (block.attention_norm, block.mlp_norm):
            norm.scale.set_value(jnp.asarray(1 + 0.2 * rng.standard_normal(shape.hidden_size), norm.scale[...].dtype))
    return model


def byte_level_tokenizer(texts):
    """A small byte-level BPE (as SmolLM2's), trained here in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from trainer.tokenizer_files import HFTokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer)
    return HFTokenizer(raw, "byte-level test BPE", bos_id=0, eos_id=1, add_bos=True)


@pytest.fixture(scope="module")
def hf_tokenizer(rt_splits):
    return byte_level_tokenizer([e.text for e in rt_splits["train"][:2000]])


def hf_logits(folder, tokens: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def tokens_for(vocab_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(2, 24))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_exported_model_gives_transformers_our_logits(hf_tokenizer, tmp_path, tied):
    shape = shape_for(hf_tokenizer.vocab_size, tied)
    model = random_model(shape, seed=1)
    folder = save_hf(model, hf_tokenizer, tmp_path / "model", max_positions=256)
    tokens = tokens_for(shape.vocab_size)
    ours = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(ours).max() > 1.0  # the tolerance below is meaningful
    np.testing.assert_allclose(hf_logits(folder, tokens), ours, rtol=0, atol=1e-4)

    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["num_key_value_heads"] == 2
    assert config["max_position_embeddings"] == 256
    # Our loader reads the folder back to the very same weights.
    again = load_llama(folder)
    assert dataclasses.replace(again.shape, init_std=shape.init_std) == shape
    written, read = (nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (model, again))
    for (path, a), (_, b) in zip(written, read):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_bfloat16_weights_are_written_and_read_back_exactly(hf_tokenizer, tmp_path):
    from safetensors import safe_open

    from trainer.config import ModelConfig

    model = random_model(shape_for(hf_tokenizer.vocab_size, tied=True, param_dtype="bfloat16"), seed=2)
    folder = save_hf(model, hf_tokenizer, tmp_path / "model", max_positions=128)
    with safe_open(folder / "model.safetensors", framework="flax") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == jnp.bfloat16
    again = load_llama(folder, ModelConfig(param_dtype="bfloat16"))
    np.testing.assert_array_equal(np.asarray(again.layers[1].attention.o_NxHxD[...]),
                                  np.asarray(model.layers[1].attention.o_NxHxD[...]))


def lora_model(shape: LlamaShape, seed: int):
    """A model with adapters on every projection and random (non-zero) B matrices."""
    cfg = FinetuneConfig(method="lora", rank=4, alpha=8.0, targets=ALL_TARGETS)
    model, _ = finetune.prepare(random_model(shape, seed), cfg, seed)
    key = jax.random.key(seed)
    for block in model.layers:
        for module in (block.attention, block.mlp):
            for adapter in module.adapters.values():
                key, sub = jax.random.split(key)
                adapter.b_RxO.set_value(0.3 * jax.random.normal(sub, adapter.b_RxO[...].shape))
    return model, cfg


# peft calls a transformers method that transformers 5 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_exports_merged_weights_and_a_peft_adapter(hf_tokenizer, tmp_path):
    from peft import PeftModel

    shape = shape_for(hf_tokenizer.vocab_size, tied=True)
    base_folder = save_hf(random_model(shape, seed=3), hf_tokenizer, tmp_path / "base", max_positions=128)
    model, cfg = lora_model(shape, seed=3)
    tokens = tokens_for(shape.vocab_size, seed=1)
    ours = np.asarray(model(jnp.asarray(tokens)))
    base_logits = np.asarray(random_model(shape, seed=3)(jnp.asarray(tokens)))
    assert np.abs(ours - base_logits).max() > 0.1  # the adapters change the model

    folder = save_hf(model, hf_tokenizer, tmp_path / "tuned", max_positions=128, finetune_cfg=cfg,
                     base_model=str(base_folder))
    np.testing.assert_allclose(hf_logits(folder, tokens), ours, rtol=0, atol=1e-4)  # merged

    adapter = folder / ADAPTER_DIR
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0
    assert adapter_config["base_model_name_or_path"] == str(base_folder)
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        peft_logits = peft_model(torch.tensor(tokens)).logits.float().numpy()
    np.testing.assert_allclose(peft_logits, ours, rtol=0, atol=1e-4)


def test_a_model_without_adapters_writes_no_adapter_folder(hf_tokenizer, tmp_path):
    model = random_model(shape_for(hf_tokenizer.vocab_size, tied=True), seed=4)
    folder = save_hf(model, hf_tokenizer, tmp_path / "model", max_positions=128,
                     finetune_cfg=FinetuneConfig(method="lora"), metadata={"metrics": {"validation_accuracy": 0.5}})
    assert not (folder / ADAPTER_DIR).exists()
    assert json.loads((folder / METADATA_FILE).read_text())["metrics"] == {"validation_accuracy": 0.5}
    assert not list(tmp_path.glob(".*partial*"))  # the temporary folder was renamed into place


def test_byte_level_tokenizer_round_trips_and_transformers_reads_it(hf_tokenizer, tmp_path):
    folder = save_hf(random_model(shape_for(hf_tokenizer.vocab_size, tied=True), 5), hf_tokenizer,
                     tmp_path / "model", max_positions=128)
    again = from_file(folder / "tokenizer.json")
    assert (again.bos_id, again.eos_id, again.add_bos) == (hf_tokenizer.bos_id, hf_tokenizer.eos_id, True)
    theirs = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert again.encode(text) == hf_tokenizer.encode(text)
        # transformers adds BOS as ours does (add_bos_token), then the same ids.
        assert theirs(text).input_ids == [hf_tokenizer.bos_id, *hf_tokenizer.encode(text)]


def test_sentencepiece_tokenizer_round_trips(tiny_tokenizer, tmp_path):
    folder = save_hf(random_model(shape_for(tiny_tokenizer.vocab_size, tied=False), 6), tiny_tokenizer,
                     tmp_path / "model", max_positions=128)
    again = from_file(folder / "tokenizer.model")
    assert again.fingerprint == tiny_tokenizer.fingerprint  # the same model proto, byte for byte
    assert [again.encode(t) for t in TEXTS] == [tiny_tokenizer.encode(t) for t in TEXTS]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["bos_token"] == tiny_tokenizer.id_to_piece(tiny_tokenizer.bos_id)
    assert config["eos_token"] == tiny_tokenizer.id_to_piece(tiny_tokenizer.eos_id)
    theirs = AutoTokenizer.from_pretrained(folder)  # transformers converts the sentencepiece model
    for text in TEXTS:
        assert theirs(text).input_ids == [tiny_tokenizer.bos_id, *tiny_tokenizer.encode(text)]


def test_save_model_policy_is_validated():
    validate(TrialConfig(train=TrainConfig(save_model="all")))
    with pytest.raises(ConfigError, match=r"train.save_model='some'.*none, best or all"):
        validate(TrialConfig(train=TrainConfig(save_model="some")))
