"""Bad files and values stop with a message naming the file or value and the fix; damaged cache
entries are rebuilt; nothing ends "finished" with numbers computed on the wrong data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from trainer import data
from trainer import packing
from trainer.checkpoint import CheckpointError, read_hf_config, resolve_checkpoint
from trainer.config import ConfigError, ModelConfig, register_configs, to_trial_config, validate
from trainer.tensor_files import load_hf_weights
from trainer.tokenizer import SentencePieceTokenizer, load_tokenizer
from trainer.trial import run_trial

CONF = Path(__file__).resolve().parents[1] / "conf"


def composed(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["output_dir=unused", *overrides])


@pytest.mark.parametrize("override,fragment", [
    ("seed=-1", "seed=-1 must be in [0, 2**32)"),
    ("eval.batch_size=0", "eval.batch_size=0 must be > 0"),
    ("eval.max_examples=0", "eval.max_examples=0 must be > 0, or null"),
    ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps=-1"),
])
def test_values_no_trial_can_use_fail_naming_the_value(override, fragment):
    with pytest.raises(ConfigError) as raised:
        validate(to_trial_config(composed(override)))
    assert fragment in str(raised.value)


def test_a_path_like_checkpoint_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: pytest.fail("asked the hub"))
    for path in ("/nonexistent", "./missing/model", "~/no/such/folder", str(tmp_path / "gone")):
        with pytest.raises(CheckpointError, match="does not exist"):
            resolve_checkpoint(path)


def _safetensors_folder(folder: Path) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir()
    save_file({"model.norm.weight": np.ones(64, np.float32), "lm_head.weight": np.ones((8, 64), np.float32)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_safetensors_file_is_named(tmp_path, damage):
    folder = _safetensors_folder(tmp_path / "ckpt")
    path = folder / "model.safetensors"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=rf"{path} is damaged or incomplete .*download or copy it again"):
        load_hf_weights(folder)


def test_an_invalid_config_json_is_named(tmp_path):
    folder = _safetensors_folder(tmp_path / "ckpt")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{folder / 'config.json'} is not valid JSON"):
        read_hf_config(folder)


def test_a_file_that_is_no_tokenizer_is_named(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("# not a sentencepiece model\n")
    with pytest.raises(ConfigError, match=rf"{path} is not a sentencepiece model"):
        SentencePieceTokenizer.from_file(path)


def test_damaged_cache_entries_are_rebuilt(rt_splits, tmp_path, capsys):
    texts = [data.full_text(e) for e in rt_splits["train"][:2000]]
    first = load_tokenizer(ModelConfig(vocab_size=512), texts, str(tmp_path))
    cached = next((tmp_path / "tokenizers").glob("*.model"))
    cached.write_bytes(cached.read_bytes()[:100])
    again = load_tokenizer(ModelConfig(vocab_size=512), texts, str(tmp_path))
    assert "is damaged" in capsys.readouterr().out
    assert again.encode("a fine film") == first.encode("a fine film")

    examples = rt_splits["test"][:50]
    tokenized = packing.tokenize_examples(examples, first, str(tmp_path))
    npz = next((tmp_path / "tokenized").glob("*.npz"))
    npz.write_bytes(b"\0" * 40)
    packing._TOKENIZED.clear()  # the in-process memo would hide the file
    rebuilt = packing.tokenize_examples(examples, first, str(tmp_path))
    assert "is damaged" in capsys.readouterr().out
    assert [p.tolist() for p in rebuilt.prompts] == [p.tolist() for p in tokenized.prompts]
    packing._TOKENIZED.clear()
    assert [p.tolist() for p in packing.tokenize_examples(examples, first, str(tmp_path)).prompts] == [
        p.tolist() for p in tokenized.prompts]  # and the rebuilt file reads back


def test_skipped_lines_are_printed_and_logged(rt_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("rt-polarity.pos", "rt-polarity.neg"):
        lines = (rt_dir / name).read_bytes().split(b"\n")
        lines[10] = b"   "  # two bad lines in the train split of each file
        lines[20] = b""
        (folder / name).write_bytes(b"\n".join(lines))
    monkeypatch.setenv("LLM_SWEEPER_CACHE", str(tmp_path / "cache"))
    cfg = composed(f"data.path={folder}", "data.on_bad_line=skip", "train.total_steps=2", "eval.max_examples=16",
                   "eval.before_training=false", "train.save_model=none")
    cfg.output_dir = str(tmp_path / "out")
    result = run_trial(cfg)
    assert result.metrics["data_skipped_lines"] == 4
    assert "skipped 4 bad line(s) (train 4)" in capsys.readouterr().out
    assert result.metrics["train_examples"] == 8530 - 4


def test_eval_max_examples_is_a_stratified_subset_of_each_split(rt_splits):
    labels = [e.label for e in rt_splits["test"]]
    assert labels[:100] == [1] * 100  # the first rows of the Cornell order are all Positive
    keep = data.stratified_indices(labels, 100, seed=0)
    assert sum(labels[i] for i in keep) == 50
