"""Shared fixtures: the local Rotten Tomatoes copy and a tiny tokenizer trained once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

RT_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/rotten_tomatoes"


@pytest.fixture(scope="session")
def rt_dir() -> Path:
    """The Cornell rt-polarity files next to the checkout (../shared/data/rotten_tomatoes)."""
    if not (RT_DIR / "rt-polarity.pos").is_file():
        pytest.skip(f"no local Rotten Tomatoes copy at {RT_DIR}")
    return RT_DIR


@pytest.fixture(scope="session")
def rt_splits(rt_dir):
    """The standard splits of the local copy."""
    from trainer.config import DataConfig
    from trainer.data import load_splits

    return load_splits(DataConfig(path=str(rt_dir)))


@pytest.fixture(scope="session")
def tiny_tokenizer(rt_splits, tmp_path_factory):
    """The default 2048-piece BPE tokenizer trained on the formatted train split."""
    from trainer.config import ModelConfig
    from trainer.data import full_text
    from trainer.tokenizer import load_tokenizer

    cache_dir = tmp_path_factory.mktemp("tokenizer_cache")
    texts = [full_text(example) for example in rt_splits["train"]]
    return load_tokenizer(ModelConfig(vocab_size=2048), texts, str(cache_dir))


@pytest.fixture(scope="session")
def sweeper_env(rt_dir, tmp_path_factory) -> dict[str, str]:
    """The environment of every subprocess of the session: local data, one shared tokenizer cache."""
    cache = tmp_path_factory.getbasetemp() / "llm_sweeper_cache"
    cache.mkdir(exist_ok=True)
    return {
        **os.environ,
        "ROTTEN_TOMATOES_DIR": str(rt_dir),
        "LLM_SWEEPER_CACHE": str(cache),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),  # the checkout
        "PYTHONUNBUFFERED": "1",
    }
