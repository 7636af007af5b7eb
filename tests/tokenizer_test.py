"""The trained BPE tokenizer: deterministic, cached, LLaMA-like special ids, lossless."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from trainer import tokenizer as tokenizer_module
from trainer.config import ConfigError, ModelConfig
from trainer.data import full_text
from trainer.tokenizer import SentencePieceTokenizer, expand_cache_dir, load_tokenizer


@pytest.fixture(scope="module")
def train_texts(rt_splits) -> list[str]:
    return [full_text(example) for example in rt_splits["train"]]


def test_special_ids_are_llama_like(tiny_tokenizer):
    assert (tiny_tokenizer.pad_id, tiny_tokenizer.bos_id, tiny_tokenizer.eos_id) == (0, 1, 2)
    assert tiny_tokenizer.id_to_piece(0) == "<unk>"
    assert tiny_tokenizer.id_to_piece(1) == "<s>"
    assert tiny_tokenizer.id_to_piece(2) == "</s>"
    assert tiny_tokenizer.vocab_size == 2048
    assert len(tiny_tokenizer.fingerprint) == 64


def test_encode_adds_no_bos_or_eos(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a fine film .")
    assert ids and tiny_tokenizer.bos_id not in ids and tiny_tokenizer.eos_id not in ids


def test_answers_are_single_pieces(tiny_tokenizer):
    # One piece per answer: scoring a label is one next-token probability.
    for name in ("Positive", "Negative"):
        ids = tiny_tokenizer.encode(name)
        assert len(ids) == 1, (name, [tiny_tokenizer.id_to_piece(i) for i in ids])
    assert tiny_tokenizer.encode("Positive") != tiny_tokenizer.encode("Negative")


@pytest.mark.parametrize(
    "text",
    ["[Text]: a film\n[Sentiment]: Positive", "café , naïve and é", "numbers 2025 and ½", "emoji 🎬 by bytes"],
)
def test_round_trip(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_unseen_character_falls_back_to_bytes(tiny_tokenizer):
    pieces = [tiny_tokenizer.id_to_piece(i) for i in tiny_tokenizer.encode("🎬")]
    assert 0 not in tiny_tokenizer.encode("🎬")
    assert all(piece.startswith("<0x") for piece in pieces if piece != "▁")


def test_digits_are_split(tiny_tokenizer):
    pieces = [tiny_tokenizer.id_to_piece(i) for i in tiny_tokenizer.encode("2025")]
    assert "".join(pieces).replace("▁", "") == "2025"
    assert all(len(piece.replace("▁", "")) <= 1 for piece in pieces)


def test_training_is_deterministic_and_cached(train_texts, tiny_tokenizer, tmp_path, monkeypatch):
    first = load_tokenizer(ModelConfig(vocab_size=2048), train_texts, str(tmp_path))
    # Same texts in another cache folder: the same model bytes.
    assert first.fingerprint == tiny_tokenizer.fingerprint
    (cached,) = (tmp_path / "tokenizers").glob("*.model")
    assert list((tmp_path / "tokenizers").iterdir()) == [cached]  # nothing else left behind
    mtime = cached.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    second = load_tokenizer(ModelConfig(vocab_size=2048), train_texts, str(tmp_path))
    assert second.fingerprint == first.fingerprint
    assert cached.stat().st_mtime_ns == mtime


def test_cache_key_depends_on_texts_and_vocab(train_texts):
    key = tokenizer_module.bpe_cache_key(train_texts, 2048)
    assert key == tokenizer_module.bpe_cache_key(list(train_texts), 2048)
    assert key != tokenizer_module.bpe_cache_key(train_texts, 1024)
    assert key != tokenizer_module.bpe_cache_key(train_texts[:-1], 2048)
    assert tokenizer_module.bpe_cache_key(["ab", "c"], 8) != tokenizer_module.bpe_cache_key(["a", "bc"], 8)


def test_given_model_file_and_checkpoint_folder(tiny_tokenizer, tmp_path):
    model_file = tmp_path / "ckpt" / "tokenizer.model"
    model_file.parent.mkdir()
    model_file.write_bytes(open(tiny_tokenizer.source, "rb").read())
    for cfg in (
        ModelConfig(tokenizer=str(model_file)),
        ModelConfig(tokenizer=str(model_file.parent)),
        ModelConfig(checkpoint=str(model_file.parent)),
    ):
        loaded = load_tokenizer(cfg, [], str(tmp_path / "unused"))
        assert loaded.fingerprint == tiny_tokenizer.fingerprint
    assert not (tmp_path / "unused").exists()  # nothing trained


def test_vocab_size_mismatch_names_both_and_the_fix(tiny_tokenizer):
    with pytest.raises(ConfigError, match=r"2048 pieces.*model.vocab_size=32000.*set model.vocab_size=2048"):
        load_tokenizer(ModelConfig(vocab_size=32000, tokenizer=tiny_tokenizer.source), [], "unused")


def test_missing_tokenizer_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer at .*nope.model; point it at a tokenizer.model, a tokenizer.json"):
        load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "nope.model")), [], str(tmp_path))


def test_hub_checkpoint_offline_names_the_local_fix(tmp_path, monkeypatch):
    import huggingface_hub

    from trainer.checkpoint import CheckpointError

    def offline(*args, **kwargs):
        raise OSError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="hub unreachable.*model.checkpoint=PATH"):
        load_tokenizer(ModelConfig(checkpoint="openlm-research/open_llama_3b_v2"), ["x"], str(tmp_path))


def test_expand_cache_dir(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("LLM_SWEEPER_CACHE", "/fast/cache")
    assert str(expand_cache_dir("~/c")) == "/home/someone/c"
    assert str(expand_cache_dir("${oc.env:LLM_SWEEPER_CACHE,~/.cache/llm-sweeper}")) == "/fast/cache"
    monkeypatch.delenv("LLM_SWEEPER_CACHE")
    assert str(expand_cache_dir("${oc.env:LLM_SWEEPER_CACHE,~/.cache/llm-sweeper}")) == "/home/someone/.cache/llm-sweeper"
    assert str(expand_cache_dir("${oc.env:LLM_SWEEPER_CACHE,'~/.cache/x'}")) == "/home/someone/.cache/x"


def test_tokenizer_from_bytes_matches_file(tiny_tokenizer):
    again = SentencePieceTokenizer(open(tiny_tokenizer.source, "rb").read())
    assert again.encode("a quiet , lovely film") == tiny_tokenizer.encode("a quiet , lovely film")
