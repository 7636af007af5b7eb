"""Pretrained vocabularies: the SmolLM2 GGUF file's byte-level BPE against transformers on every
review, a saved tokenizer.json, a sentencepiece vocabulary carried in a GGUF file, and files that
are no tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import regex
from gguf import GGUFWriter
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoTokenizer

from trainer.config import ConfigError, ModelConfig
from trainer.data import LABEL_NAMES, SPLITS, full_text, prompt_text
from trainer.packing import answer_ids, tokenize_examples
from trainer.tokenizer import SentencePieceTokenizer, from_file, load_tokenizer

# llama.cpp's "smollm" pre-tokenizer (llama-vocab.cpp): every \p{N} character is cut out first,
# then GPT-2's pattern splits each remaining piece on its own.
_SMOLLM_SPLITS = (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")


def llama_cpp_pieces(text: str) -> list[str]:
    """`text` cut as llama.cpp cuts it before BPE: each pattern splits every piece, matches and gaps kept."""
    pieces = [text]
    for pattern in _SMOLLM_SPLITS:
        split = []
        for piece in pieces:
            start = 0
            for match in regex.finditer(pattern, piece):
                split += [piece[start:match.start()], match.group()]
                start = match.end()
            split.append(piece[start:])
        pieces = [piece for piece in split if piece]
    return pieces


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    """transformers' tokenizer for the GGUF file (its own GGUF vocabulary converter)."""
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return from_file(smollm2_gguf)


@pytest.fixture(scope="module")
def all_examples(rt_splits):
    return [example for split in SPLITS for example in rt_splits[split]]


# ----------------------------------------------------------------------------- SmolLM2's GGUF vocabulary


def test_smollm2_special_tokens_and_bos_agree_with_transformers(smollm2, smollm2_hf):
    hf_adds_bos = smollm2_hf("a film").input_ids[:1] == [smollm2_hf.bos_token_id]
    assert smollm2.add_bos is hf_adds_bos is False  # SmolLM2's file says add_bos_token=false
    assert (smollm2.bos_id, smollm2.eos_id) == (smollm2_hf.bos_token_id, smollm2_hf.eos_token_id) == (1, 2)
    assert smollm2.vocab_size == len(smollm2_hf) == 49152
    assert smollm2.encode("<|im_start|>user") == smollm2_hf("<|im_start|>user").input_ids  # control tokens stay whole


def test_smollm2_label_is_one_token_that_carries_the_space(smollm2):
    for label, name in enumerate(LABEL_NAMES):
        ids = answer_ids(smollm2, label)
        assert len(ids) == 1 and smollm2.id_to_piece(ids[0]) == "Ġ" + name


def test_smollm2_ids_match_transformers_on_every_review(smollm2, smollm2_hf, all_examples, tmp_path):
    """Prompts, and prompt + answer, of all 10,662 reviews. transformers' GGUF converter ignores
    tokenizer.ggml.pre="smollm" (plain GPT-2 splitting): where that differs from llama.cpp's own
    splitting (a numeral like "½" after a space), ours must follow llama.cpp."""
    tokenized = tokenize_examples(all_examples, smollm2, str(tmp_path))
    prompts = [prompt_text(example.text) for example in all_examples]
    fulls = [full_text(example) for example in all_examples]
    hf_prompts, hf_fulls = smollm2_hf(prompts).input_ids, smollm2_hf(fulls).input_ids
    ours_prompts = [ids.tolist() for ids in tokenized.prompts]
    ours_fulls = [p + a.tolist() for p, a in zip(ours_prompts, tokenized.answers)]

    differ = [i for i in range(len(all_examples)) if (ours_prompts[i], ours_fulls[i]) != (hf_prompts[i], hf_fulls[i])]
    agree = len(all_examples) - len(differ)
    print(f"SmolLM2 GGUF vocabulary: {agree} of {len(all_examples)} reviews equal to transformers' ids; "
          f"{len(differ)} differ where transformers ignores the smollm pre-tokenizer")
    assert len(all_examples) == 10662
    # Every review with a numeral, against llama.cpp's splitting encoded by transformers' own BPE.
    numerals = [i for i, text in enumerate(fulls) if regex.search(r"\p{N}", text)]
    assert set(differ) <= set(numerals) and len(numerals) > 500
    for i in numerals:
        for ours, text in ((ours_prompts[i], prompts[i]), (ours_fulls[i], fulls[i])):
            pieces = smollm2_hf(llama_cpp_pieces(text), add_special_tokens=False).input_ids
            assert ours == [token for piece in pieces for token in piece], text
    for i in differ:
        assert regex.search(r"(?![0-9])\p{N}", prompts[i]), prompts[i]  # a numeral that is not an ASCII digit


def test_saved_tokenizer_json_loads_as_transformers_saved_it(smollm2_hf, all_examples, tmp_path):
    smollm2_hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    ours = from_file(tmp_path / "tokenizer.json")
    assert ours.bos_id == smollm2_hf.convert_tokens_to_ids(config["bos_token"]) == 1
    assert ours.eos_id == smollm2_hf.convert_tokens_to_ids(config["eos_token"]) == 2
    assert ours.add_bos is False
    texts = [full_text(example) for example in all_examples[::20]]
    texts += [full_text(example) for example in all_examples if "½" in example.text]
    assert ours.encode_batch(texts) == smollm2_hf(texts).input_ids
    print(f"tokenizer.json: {len(texts)} reviews equal")


# ----------------------------------------------------------------------------- a sentencepiece GGUF vocabulary


def write_sentencepiece_gguf(model_file: Path, path: Path) -> Path:
    """The vocabulary of a sentencepiece model as llama.cpp's converter writes it (no tensors)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([piece.piece for piece in proto.pieces])
    writer.add_token_scores([piece.score for piece in proto.pieces])
    writer.add_token_types([int(piece.type) for piece in proto.pieces])  # GGUF's token types are sentencepiece's
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_bos_token_id(proto.trainer_spec.bos_id)
    writer.add_eos_token_id(proto.trainer_spec.eos_id)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_vocabulary_in_gguf_encodes_as_the_original(tiny_tokenizer, all_examples, tmp_path):
    original = SentencePieceTokenizer.from_file(tiny_tokenizer.source)
    ours = from_file(write_sentencepiece_gguf(Path(tiny_tokenizer.source), tmp_path / "vocab.gguf"))
    assert (ours.bos_id, ours.eos_id, ours.vocab_size, ours.add_bos) == (1, 2, 2048, True)
    texts = [full_text(example) for example in all_examples] + ["emoji 🎬, ½ and 2025", "  two  spaces\n"]
    assert ours.encode_batch(texts) == original.encode_batch(texts)
    assert ours.decode(ours.encode(texts[-2])) == texts[-2]
    print(f"sentencepiece GGUF: {len(texts)} texts equal")


# ----------------------------------------------------------------------------- files that are no tokenizer


def configured(path: Path, tmp_path: Path):
    return load_tokenizer(ModelConfig(tokenizer=str(path)), [], str(tmp_path / "cache"))


def test_random_bytes_as_tokenizer_model_are_rejected(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError, match=rf"{regex.escape(str(path))} is not a sentencepiece model"):
        configured(path, tmp_path)


def test_json_that_is_no_tokenizer_is_rejected(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match=rf"{regex.escape(str(path))} is not a Hugging Face tokenizer\.json"):
        configured(path, tmp_path)


def test_unsupported_pre_tokenizer_is_named(tmp_path):
    path = tmp_path / "vocab.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"tokenizer\.ggml\.pre='qwen2' is not supported"):
        configured(path, tmp_path)


def test_truncated_gguf_as_tokenizer_is_rejected(smollm2_gguf, tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as source:
        path.write_bytes(source.read(200_000))  # inside the vocabulary
    with pytest.raises(ConfigError, match=regex.escape(str(path))):
        configured(path, tmp_path)
