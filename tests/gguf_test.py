"""GGUF checkpoints against transformers' own GGUF loader: random LLaMAs written the way llama.cpp's
converter writes them (float, Q8_0, Q4_1 and K-quants; tied and untied head), the real SmolLM2
file, and files that must fail with a message naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quantize
from transformers import AutoModelForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf.dequant import dequantize as transformers_dequantize

from trainer.checkpoint import CheckpointError, load_into, load_llama
from trainer.config import ModelConfig
from trainer.data import prompt_text
from trainer.gguf_file import model_config_from_gguf, reader, tensor_readers
from trainer.model import LlamaShape, init_model
from trainer.tokenizer import from_file

# Every row length (hidden, intermediate) is a multiple of 256, so any block size fits.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
RMS_EPS, ROPE_THETA, CONTEXT = 1e-5, 10000.0, 256
BATCH, LENGTH = 2, 16

# The llama.cpp file type that a file of mostly this tensor type declares (general.file_type).
FILE_TYPES = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
    GGMLQuantizationType.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}
K_QUANTS = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K)


# ----------------------------------------------------------------------------- writing GGUF files


def byte_level_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """GPT-2's 256 byte tokens, a few merges over them and <|endoftext|>: (tokens, types, merges)."""
    spelling = bytes_to_unicode()
    pairs = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
             ("Ġ", "f"), ("i", "l"), ("Ġf", "il"), ("m", "s"), ("Ġfil", "ms"), ("Ġ", "s")]
    tokens = ["<|endoftext|>"] + [spelling[byte] for byte in range(256)] + [a + b for a, b in pairs]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1)
    return tokens, [int(kind) for kind in types], [f"{a} {b}" for a, b in pairs]


def llama_cpp_permute(rows_x_in: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's query/key row order: within each head, rotate-half pairs become adjacent."""
    rows, fan_in = rows_x_in.shape
    return rows_x_in.reshape(heads, 2, rows // heads // 2, fan_in).swapaxes(1, 2).reshape(rows, fan_in)


def random_k_quant(rows: int, fan_in: int, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Random but valid K-quant blocks (gguf cannot quantize to K-quants) shaped like real ones:
    every 32-value group centred on zero, weights of std ~0.15."""
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, fan_in // block_elements, block_bytes), dtype=np.uint8)

    def set_half(offset: int, values: np.ndarray) -> None:
        blocks[..., offset:offset + 2] = values.astype(np.float16)[..., None].view(np.uint8)

    if qtype == GGMLQuantizationType.Q4_K:
        # value = d * scale * q - dmin * min with q in 0..15 and 6-bit scale/min packed in 12 bytes.
        # Packing each group's min equal to its scale (bytes 4-7 = bytes 0-3, both nibbles of bytes
        # 8-11 equal) and dmin = 7.5 d centres every group, as real quantization of N(0, s) does.
        blocks[..., 8:12] = (blocks[..., 8:12] & 0x0F) * 0x11
        blocks[..., 4:8] = blocks[..., 0:4]
        d = rng.uniform(0.5e-3, 0.65e-3, size=blocks.shape[:2])
        set_half(0, d)
        set_half(2, 7.5 * d)
    elif qtype == GGMLQuantizationType.Q6_K:  # value = d * int8 scale * (q - 32), q in 0..63
        set_half(208, rng.uniform(0.8e-4, 1.2e-4, size=blocks.shape[:2]))
    else:
        raise ValueError(f"no random block recipe for {qtype.name}")
    return blocks.reshape(rows, -1)


def stored(name: str, array: np.ndarray, qtype: GGMLQuantizationType, rng) -> tuple[np.ndarray, dict]:
    """The array as llama.cpp writes it: 1-D tensors (norms) as F32, matrices in `qtype`."""
    if array.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return array.astype(np.float32), {}
    if qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16), {}
    if qtype in K_QUANTS:
        return random_k_quant(*array.shape, qtype, rng), {"raw_dtype": qtype}
    return quantize(array, qtype), {"raw_dtype": qtype}


def write_llama_gguf(
    path: Path, qtype: GGMLQuantizationType = GGMLQuantizationType.F32, *, tied: bool = False, seed: int = 0,
    arch: str = "llama", kv_heads: int = KV_HEADS,
) -> Path:
    """A random LLaMA as llama.cpp's converter writes one: its metadata and vocabulary, its tensor
    names, query/key rows permuted into its rotary order, matrices quantized to `qtype`."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = byte_level_vocabulary()
    vocab = len(tokens)

    def matrix(rows: int, fan_in: int) -> np.ndarray:  # HF layout (out, in), std 0.15: logits O(1)
        return rng.normal(0.0, 0.15, size=(rows, fan_in)).astype(np.float32)

    def norm() -> np.ndarray:  # away from 1, so a norm that is skipped or misplaced shows
        return (1.0 + 0.2 * rng.standard_normal(HIDDEN)).astype(np.float32)

    tensors = {"token_embd.weight": matrix(vocab, HIDDEN)}
    for i in range(LAYERS):
        tensors.update({
            f"blk.{i}.attn_norm.weight": norm(),
            f"blk.{i}.attn_q.weight": llama_cpp_permute(matrix(HEADS * HEAD_DIM, HIDDEN), HEADS),
            f"blk.{i}.attn_k.weight": llama_cpp_permute(matrix(kv_heads * HEAD_DIM, HIDDEN), kv_heads),
            f"blk.{i}.attn_v.weight": matrix(kv_heads * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_output.weight": matrix(HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_norm.weight": norm(),
            f"blk.{i}.ffn_gate.weight": matrix(INTERMEDIATE, HIDDEN),
            f"blk.{i}.ffn_up.weight": matrix(INTERMEDIATE, HIDDEN),
            f"blk.{i}.ffn_down.weight": matrix(HIDDEN, INTERMEDIATE),
        })
    tensors["output_norm.weight"] = norm()
    if not tied:
        tensors["output.weight"] = matrix(vocab, HIDDEN)

    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny random llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    for name, array in tensors.items():
        data, raw = stored(name, array, qtype, rng)
        writer.add_tensor(name, data, **raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------- forward passes


@nnx.jit
def forward(model, tokens_BxT):
    return model(tokens_BxT)


def our_logits(path: Path, tokens_BxT: np.ndarray) -> np.ndarray:
    model = load_llama(path, ModelConfig(dtype="float32", param_dtype="float32"))
    return np.asarray(forward(model, jnp.asarray(tokens_BxT)))


def transformers_logits(path: Path, tokens_BxT: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens_BxT)).logits.float().numpy()


def random_tokens(path: Path, seed: int = 0) -> np.ndarray:
    vocab = model_config_from_gguf(path)["vocab_size"]
    return np.random.default_rng(seed).integers(0, vocab, size=(BATCH, LENGTH))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """One small untied Q8_0 file for the fault tests."""
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf", GGMLQuantizationType.Q8_0)


# ----------------------------------------------------------------------------- against transformers

CASES = [(qtype, tied) for qtype in FILE_TYPES for tied in (False, True)]


@pytest.mark.parametrize(
    "qtype,tied", CASES, ids=[f"{qtype.name}-{'tied' if tied else 'untied'}" for qtype, tied in CASES]
)
def test_random_llama_logits_match_transformers(tmp_path, qtype, tied):
    path = write_llama_gguf(tmp_path / f"tiny.{qtype.name}.gguf", qtype, tied=tied, seed=int(qtype))
    assert model_config_from_gguf(path)["tied_embeddings"] is tied
    assert {t.tensor_type for t in reader(path).tensors if len(t.shape) == 2} == {qtype}
    tokens = random_tokens(path)
    expected = transformers_logits(path, tokens)
    logits = our_logits(path, tokens)
    assert np.abs(expected).max() > 1.0  # the tolerance below is meaningful
    print(f"{qtype.name} tied={tied}: max |logit| {np.abs(expected).max():.1f}, "
          f"max |difference| {np.abs(logits - expected).max():.1e}")
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda qtype: qtype.name)
def test_k_quants_dequantize_as_transformers_own_kernels_do(tmp_path, qtype):
    """transformers' LLaMA path dequantizes with the gguf package too; its torch kernels are an independent reference."""
    path = write_llama_gguf(tmp_path / f"tiny.{qtype.name}.gguf", qtype)
    tensor = next(t for t in reader(path).tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type == qtype
    ours = tensor_readers(path)["model.layers.0.mlp.down_proj.weight"]()
    reference = transformers_dequantize(torch.from_numpy(np.array(tensor.data).reshape(-1)), int(qtype))
    assert ours.shape == (HIDDEN, INTERMEDIATE) and 0.05 < ours.std() < 0.5
    np.testing.assert_array_equal(ours, reference.numpy().reshape(HIDDEN, INTERMEDIATE))


def test_query_and_key_rows_come_back_in_hugging_face_order(tmp_path):
    """The un-permuted rows are exactly the ones the converter permuted (multi-head and grouped keys)."""
    path = write_llama_gguf(tmp_path / "tiny.F32.gguf", GGMLQuantizationType.F32)
    readers, stored_rows = tensor_readers(path), {t.name: np.array(t.data) for t in reader(path).tensors}
    for name, heads, hf in [("attn_q", HEADS, "self_attn.q_proj"), ("attn_k", KV_HEADS, "self_attn.k_proj")]:
        ours = readers[f"model.layers.1.{hf}.weight"]()
        np.testing.assert_array_equal(llama_cpp_permute(ours, heads), stored_rows[f"blk.1.{name}.weight"])
        assert not np.array_equal(ours, stored_rows[f"blk.1.{name}.weight"])


# ----------------------------------------------------------------------------- the real SmolLM2 file


@pytest.mark.slow  # about 30 s: transformers' GGUF load alone takes 15-20 s on two cores
def test_smollm2_logits_match_transformers(smollm2_gguf, rt_splits):
    """Three formatted reviews, right-padded into one batch (causal: padding changes no earlier logit)."""
    tokenizer = from_file(smollm2_gguf)
    reviews = [rt_splits["test"][i].text for i in (0, 1, 533)]
    prompts = [([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(prompt_text(r)) for r in reviews]
    tokens = np.full((len(prompts), max(map(len, prompts))), tokenizer.eos_id)
    for row, ids in enumerate(prompts):
        tokens[row, : len(ids)] = ids
    model = load_llama(smollm2_gguf, ModelConfig(dtype="float32", param_dtype="float32"))
    logits = np.asarray(forward(model, jnp.asarray(tokens)))
    expected = transformers_logits(smollm2_gguf, tokens)
    differences = []
    for row, ids in enumerate(prompts):
        ours, theirs = logits[row, : len(ids)], expected[row, : len(ids)]
        assert np.abs(theirs).max() > 10.0
        differences.append(float(np.abs(ours - theirs).max()))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    print(f"SmolLM2: prompts of {[len(p) for p in prompts]} tokens, max |logit difference| {max(differences):.2e}")


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architecture_is_rejected_by_name(tmp_path, arch):
    path = write_llama_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    with pytest.raises(CheckpointError, match=rf"general\.architecture='{arch}' is not supported.*'llama'"):
        load_llama(path)


def truncation_points(path: Path) -> dict[str, int]:
    """Byte counts to keep: inside the header, the key/values, the tensor infos, the tensor data."""
    size, first_tensor = path.stat().st_size, reader(path).tensors[0]
    data_start = int(first_tensor.data_offset)
    return {
        "magic": 3,
        "header": 12,
        "metadata": data_start // 4,
        "tensor_infos": data_start - 40,
        "first_tensor": data_start + int(first_tensor.n_bytes) // 2,
        "last_tensor": size - 1,
    }


@pytest.mark.parametrize("where", ["magic", "header", "metadata", "tensor_infos", "first_tensor", "last_tensor"])
def test_truncated_file_fails_naming_the_file(tiny_gguf, tmp_path, where):
    keep = truncation_points(tiny_gguf)[where]
    path = tmp_path / f"truncated-{where}.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:keep])
    with pytest.raises(CheckpointError) as error:
        load_llama(path)
    assert str(path) in str(error.value) and "truncated or damaged" in str(error.value)


def test_model_of_another_shape_is_rejected_naming_the_fields(tiny_gguf):
    shape = LlamaShape.from_config(ModelConfig(vocab_size=300, hidden_size=HIDDEN, intermediate_size=256,
                                               num_heads=HEADS, num_kv_heads=HEADS))
    with pytest.raises(CheckpointError) as error:
        load_into(nnx.eval_shape(lambda: init_model(shape, seed=0)), tiny_gguf)  # abstract: the check comes first
    message = str(error.value)
    assert str(tiny_gguf) in message
    for field in ("vocab_size: model 300, checkpoint 270", f"intermediate_size: model 256, checkpoint {INTERMEDIATE}",
                  f"num_kv_heads: model {HEADS}, checkpoint {KV_HEADS}"):
        assert field in message
    assert "hidden_size" not in message  # only the fields that differ


def test_tensor_of_the_wrong_shape_is_named(tmp_path):
    """A file whose metadata disagrees with its tensors: more key/value heads claimed than stored."""
    path = write_llama_gguf(tmp_path / "tiny.gguf")
    field = reader(path).fields["llama.attention.head_count_kv"]
    offset = int(field.offset) + sum(int(part.nbytes) for part in field.parts[:-1])  # the value's bytes
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = np.uint32(HEADS).tobytes()
    lying = tmp_path / "lying.gguf"
    lying.write_bytes(bytes(data))
    assert model_config_from_gguf(lying)["num_kv_heads"] == HEADS
    with pytest.raises(CheckpointError, match=r"self_attn\.k_proj\.weight .*\(128, 256\).*\(256, 256\)"):
        load_llama(lying)
