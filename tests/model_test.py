"""The LLaMA model and its checkpoint loader against transformers' LlamaForCausalLM, plus masking behaviour."""

from __future__ import annotations

import json
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from flax import nnx

from trainer import checkpoint
from trainer.checkpoint import CheckpointError, load_into, load_llama, model_config_from_hf
from trainer.config import ModelConfig
from trainer.model import LlamaShape, init_model
from trainer.tensor_files import load_hf_weights

BATCH, LENGTH = 2, 24


def tiny_hf_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    values.update(overrides)
    return LlamaConfig(**values)


def random_hf_model(seed: int, **overrides) -> LlamaForCausalLM:
    """Weights large enough that logits are O(1), and norms away from 1, so every mapping shows."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


@nnx.jit
def forward(model, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    return model(tokens_BxT, positions_BxT, segment_ids_BxT)


def hf_logits(model: LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def save_torch_bin(model: LlamaForCausalLM, folder, shards: int) -> None:
    """PyTorch .bin checkpoints as older transformers wrote them (v5 save_pretrained only writes safetensors)."""
    folder.mkdir()
    model.config.to_json_file(folder / "config.json")
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = sorted(state)
    weight_map = {}
    for shard in range(shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = names[shard::shards]
        torch.save({name: state[name] for name in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    with open(folder / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = random_hf_model(seed=0)
    tokens = np.random.default_rng(0).integers(0, 256, size=(BATCH, LENGTH))
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {
        "safetensors": root / "safetensors",
        "sharded_safetensors": root / "sharded_safetensors",
        "pytorch_bin": root / "pytorch_bin",
        "sharded_pytorch_bin": root / "sharded_pytorch_bin",
    }
    model.save_pretrained(folders["safetensors"])
    model.save_pretrained(folders["sharded_safetensors"], max_shard_size="60KB")
    save_torch_bin(model, folders["pytorch_bin"], shards=1)
    save_torch_bin(model, folders["sharded_pytorch_bin"], shards=3)
    assert len(list(folders["sharded_safetensors"].glob("*.safetensors"))) > 1
    return {"model": model, "tokens": tokens, "logits": hf_logits(model, tokens), "folders": folders}


@pytest.fixture(scope="module")
def ours(reference):
    return load_llama(reference["folders"]["safetensors"])


def copy_checkpoint(source, destination, edit):
    """A copy of a single-file safetensors checkpoint whose tensors went through `edit`."""
    destination.mkdir()
    shutil.copy(source / "config.json", destination / "config.json")
    tensors = edit(load_file(source / "model.safetensors"))
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


# ----------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "pytorch_bin", "sharded_pytorch_bin"])
def test_logits_match_transformers(reference, layout):
    model = load_llama(reference["folders"][layout])
    logits = np.asarray(forward(model, jnp.asarray(reference["tokens"])))
    assert np.abs(reference["logits"]).max() > 1.0  # the tolerance below is meaningful
    np.testing.assert_allclose(logits, reference["logits"], rtol=0, atol=1e-4)


def test_load_into_existing_model_matches_transformers(reference):
    cfg = checkpoint.checkpoint_model_config(ModelConfig(), reference["folders"]["safetensors"])
    model = load_into(init_model(LlamaShape.from_config(cfg), seed=1), reference["folders"]["safetensors"])
    logits = np.asarray(forward(model, jnp.asarray(reference["tokens"])))
    np.testing.assert_allclose(logits, reference["logits"], rtol=0, atol=1e-4)


def test_tied_embeddings_use_the_embedding_as_the_head(tmp_path):
    hf = random_hf_model(seed=1, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    tokens = np.random.default_rng(1).integers(0, 256, size=(BATCH, LENGTH))
    model = load_llama(tmp_path)
    assert model.shape.tied_embeddings and not hasattr(model, "head_DxV")  # one matrix, trained as one
    np.testing.assert_array_equal(np.asarray(model.head_weight()), np.asarray(model.embed_VxD[...]).T)
    logits = np.asarray(forward(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(logits, hf_logits(hf, tokens), rtol=0, atol=1e-4)


def test_bfloat16_safetensors_load_as_their_exact_values(reference, tmp_path):
    hf = reference["model"]
    state = {name: t.to(torch.bfloat16).contiguous() for name, t in hf.state_dict().items()}
    tmp_path.joinpath("config.json").write_text(hf.config.to_json_string())
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    weights = load_hf_weights(tmp_path)
    assert weights["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    model = load_llama(tmp_path, ModelConfig(param_dtype="float32"))
    as_float32 = {name: t.float().numpy() for name, t in state.items()}
    np.testing.assert_array_equal(np.asarray(model.embed_VxD[...]), as_float32["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(model.head_DxV[...]), as_float32["lm_head.weight"].T)
    q = np.asarray(model.layers[1].attention.q_DxNxH[...])
    np.testing.assert_array_equal(q, as_float32["model.layers.1.self_attn.q_proj.weight"].T.reshape(64, 4, 16))
    o = np.asarray(model.layers[1].attention.o_NxHxD[...])
    np.testing.assert_array_equal(o, as_float32["model.layers.1.self_attn.o_proj.weight"].T.reshape(4, 16, 64))

    kept_bf16 = load_llama(tmp_path, ModelConfig(param_dtype="bfloat16"))
    assert kept_bf16.embed_VxD[...].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- masking behaviour


def test_changing_a_token_changes_no_earlier_logit(ours, reference):
    tokens = reference["tokens"][:1]
    changed = tokens.copy()
    t = 11
    changed[0, t] = (tokens[0, t] + 1) % 256
    before, after = np.asarray(forward(ours, jnp.asarray(tokens))), np.asarray(forward(ours, jnp.asarray(changed)))
    np.testing.assert_array_equal(after[:, :t], before[:, :t])
    assert np.abs(after[:, t:] - before[:, t:]).max(axis=-1).min() > 1e-3  # every later position sees it


def test_packed_examples_match_each_example_alone(ours):
    rng = np.random.default_rng(2)
    examples = [rng.integers(0, 256, size=length) for length in (5, 8, 7)]
    padding = 4
    tokens = np.concatenate(examples + [np.zeros(padding, dtype=int)])[None]
    segment_ids = np.concatenate([np.full(len(e), i + 1) for i, e in enumerate(examples)] + [np.zeros(padding)])
    positions = np.concatenate([np.arange(len(e)) for e in examples] + [np.arange(padding)])
    packed = np.asarray(
        forward(ours, jnp.asarray(tokens), jnp.asarray(positions[None]), jnp.asarray(segment_ids[None], dtype=jnp.int32))
    )

    start = 0
    for example in examples:
        alone = np.asarray(forward(ours, jnp.asarray(example[None])))
        np.testing.assert_allclose(packed[:, start : start + len(example)], alone, rtol=0, atol=1e-5)
        start += len(example)


def test_padding_after_a_sequence_changes_none_of_its_logits(ours):
    rng = np.random.default_rng(3)
    real, padding = 14, 10
    tokens_alone = rng.integers(0, 256, size=(1, real))
    alone = np.asarray(forward(ours, jnp.asarray(tokens_alone)))
    segment_ids = jnp.asarray(np.concatenate([np.ones(real), np.zeros(padding)])[None], dtype=jnp.int32)
    positions = jnp.arange(real + padding)[None]
    for fill in range(2):
        pad_tokens = rng.integers(0, 256, size=(1, padding))
        tokens = jnp.asarray(np.concatenate([tokens_alone, pad_tokens], axis=1))
        padded = np.asarray(forward(ours, tokens, positions, segment_ids))
        assert np.isfinite(padded).all()
        np.testing.assert_allclose(padded[:, :real], alone, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- config.json


def write_config(folder, **values):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values))
    return folder


def test_config_json_maps_to_model_config_fields(tmp_path):
    # An older-style config: rope_theta at the top level, no num_key_value_heads, no head_dim.
    folder = write_config(
        tmp_path / "old",
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        rope_scaling=None,
    )
    assert model_config_from_hf(folder) == {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tied_embeddings": False,
    }
    ModelConfig(**model_config_from_hf(folder))  # every key is a ModelConfig field


def test_transformers_v5_config_maps_rope_parameters_and_head_dim(reference):
    values = model_config_from_hf(reference["folders"]["safetensors"])
    assert values["num_kv_heads"] == 2 and values["num_heads"] == 4 and values["num_layers"] == 2
    assert values["head_dim"] == 16 and values["rope_theta"] == 10000.0 and values["rms_norm_eps"] == 1e-6
    folder = reference["folders"]["safetensors"]
    cfg = checkpoint.checkpoint_model_config(ModelConfig(dtype="bfloat16", checkpoint="x"), folder)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.dtype, cfg.checkpoint) == (256, 64, "bfloat16", "x")


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
    ],
)
def test_scaled_rope_is_rejected(tmp_path, rope):
    folder = write_config(tmp_path, vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=2, **rope)
    with pytest.raises(CheckpointError, match="llama3"):
        model_config_from_hf(folder)


def test_missing_config_field_is_named(tmp_path):
    folder = write_config(tmp_path, vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(CheckpointError, match="intermediate_size"):
        model_config_from_hf(folder)


# ----------------------------------------------------------------------------- broken checkpoints


def test_missing_tensor_is_named(reference, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    folder = copy_checkpoint(
        reference["folders"]["safetensors"], tmp_path / "ckpt", lambda t: {k: v for k, v in t.items() if k != name}
    )
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_llama(folder)


def test_wrong_shape_is_named(reference, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    folder = copy_checkpoint(
        reference["folders"]["safetensors"], tmp_path / "ckpt", lambda t: {**t, name: t[name][:16]}
    )
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} .*\(16, 64\)"):
        load_llama(folder)


def test_unexpected_tensor_is_named(reference, tmp_path):
    name = "model.layers.0.self_attn.q_proj.bias"
    folder = copy_checkpoint(
        reference["folders"]["safetensors"], tmp_path / "ckpt", lambda t: {**t, name: torch.zeros(64)}
    )
    with pytest.raises(CheckpointError, match=name.replace(".", "[.]")):
        load_llama(folder)


def test_model_of_another_shape_is_rejected(reference):
    model = init_model(LlamaShape.from_config(ModelConfig(vocab_size=256, hidden_size=64, num_kv_heads=4)), seed=0)
    with pytest.raises(CheckpointError, match="num_kv_heads: model 4, checkpoint 2"):
        load_into(model, reference["folders"]["safetensors"])


def test_pytorch_bin_without_torch_says_to_install_it(reference, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match="torch is not installed"):
        load_hf_weights(reference["folders"]["pytorch_bin"])


# ----------------------------------------------------------------------------- resolving


def test_local_folder_never_touches_the_hub(reference, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("snapshot_download called for a local folder")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    folder = reference["folders"]["safetensors"]
    assert checkpoint.resolve_checkpoint(str(folder)) == folder


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.resolve_checkpoint(str(tmp_path / "nothing"))


def test_unknown_hub_id_offline_says_to_pass_a_local_folder(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"'nobody/no-such-llama'.*model\.checkpoint=PATH"):
        checkpoint.resolve_checkpoint("nobody/no-such-llama")


def test_unreachable_hub_says_to_pass_a_local_folder(monkeypatch):
    import huggingface_hub

    def unreachable(repo_id, **kwargs):
        assert "config.json" in kwargs["allow_patterns"] and "*.safetensors" in kwargs["allow_patterns"]
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError, match=r"meta-llama/Llama-3.2-1B.*ConnectionError.*model\.checkpoint=PATH"):
        checkpoint.resolve_checkpoint("meta-llama/Llama-3.2-1B")


@pytest.mark.parametrize("length, block", [(12, 64), (12, 4), (16, 4)])
def test_masked_attention_matches_jax_reference_with_grouped_heads(length, block):
    """Whole, and in causal query blocks (12 = 3 blocks of 4; 16 = 4, packed segments across them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from trainer.attention import attention_mask, masked_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, length, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, length, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, length, 2, 8)), jnp.float32)
    segments = jnp.asarray([[1] * 5 + [2] * (length - 8) + [0] * 3, [1] * length])
    mask = attention_mask(segments)
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    ours = masked_attention(heads_first(q), heads_first(k), heads_first(v), mask, block=block)
    np.testing.assert_allclose(heads_first(ours), expected, atol=1e-5)
    # The backward pass too: the stopped max and the late division must not change gradients.
    probe = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)

    def reference_loss(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask) * probe)

    def our_loss(q, k, v):
        out = masked_attention(heads_first(q), heads_first(k), heads_first(v), mask, block=block)
        return jnp.sum(heads_first(out) * probe)

    for ours_grad, expected_grad in zip(jax.grad(our_loss, (0, 1, 2))(q, k, v), jax.grad(reference_loss, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(ours_grad, expected_grad, atol=1e-5)


def test_the_norm_scale_of_a_bfloat16_model_gets_its_gradient_summed_in_float32():
    from trainer.model import scaled

    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (4, 33, 16)).astype(jnp.bfloat16)
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (16,))
    g = jax.random.normal(keys[2], x.shape).astype(jnp.bfloat16)
    y, pullback = jax.vjp(scaled, x, scale)
    np.testing.assert_array_equal(y, x * scale.astype(jnp.bfloat16))
    dx, dscale = pullback(g)
    assert dx.dtype == jnp.bfloat16 and dscale.dtype == jnp.float32
    np.testing.assert_array_equal(dx, g * scale.astype(jnp.bfloat16))
    # x and g are exact in bfloat16, so their products and the sum over 132 tokens are float32's.
    want = np.einsum("btd,btd->d", np.asarray(x, np.float64), np.asarray(g, np.float64))
    np.testing.assert_allclose(dscale, want, rtol=1e-5, atol=1e-5)
