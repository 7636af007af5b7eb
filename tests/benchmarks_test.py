"""Smoke runs of every benchmark (`--quick`, in a subprocess) and checks of the arithmetic they report.

No assertion is on speed: a shared 2-core machine makes timings vary by 10x. The runs prove
each script still drives the current trainer and sweeper and prints its figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]




def run_quick(env: dict[str, str], name: str, timeout: float = 240) -> str:
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_throughput_quick_prints_both_sides_ratio_and_mfu(sweeper_env):
    out = run_quick(sweeper_env, "throughput")
    assert "float32 matmul peak" in out and "torch 2." in out
    for setup in ("easylm_debug", "tiny"):
        assert f"-- {setup}" in out
    assert out.count("| ours (jax)") == 2 and out.count("| torch (transformers)") == 2  # a table row each
    assert out.count("ratio ours/theirs (median tokens/s):") == 2
    assert "MFU" in out and "FLOPs/token = 6*" in out


def test_epoch_quick_prints_both_layouts_padding_and_ratio(sweeper_env):
    out = run_quick(sweeper_env, "epoch")
    assert "packed rows of 128" in out and "padded to the longest" in out
    assert "padding" in out and "epoch wall time ratio theirs/ours:" in out


def test_evaluate_quick_prints_both_modes(sweeper_env):
    out = run_quick(sweeper_env, "evaluate")
    assert "eval.mode=score" in out and "eval.mode=generate" in out
    assert "examples/s warm" in out


def test_step_profile_quick_prints_parts_and_xla_ops(sweeper_env):
    out = run_quick(sweeper_env, "step_profile")
    assert "train_step (all of it)" in out and "head + cross-entropy forward + backward" in out
    assert "XLA ops by thread time" in out


@pytest.mark.slow
def test_sweep_overhead_quick_accounts_for_the_sweep(sweeper_env):
    out = run_quick(sweeper_env, "sweep_overhead")
    assert "python -m sweeper -m lr=" in out
    for phase in ("startup, teardown, between trials", "compilation (first step)", "data prep",
                  "eval before training", "tracking (MLflow) around run_trial", "total (subprocess wall)"):
        assert phase in out
    assert "sweep wall / (N x pure training) =" in out


# --- the arithmetic behind the figures ----------------------------------------------------


def test_flops_per_token_of_easylm_debug_by_hand():
    from benchmarks.throughput import easylm_debug_shape, flops_per_token, matmul_params

    shape = easylm_debug_shape()
    # Per layer q, k, v, o (4 x 128 x 128) and gate, up, down (3 x 128 x 256); the output head 128 x 1024.
    assert matmul_params(shape) == 2 * (4 * 128 * 128 + 3 * 128 * 256) + 128 * 1024 == 458_752
    assert flops_per_token(shape, 256) == 6 * 458_752 + 12 * 2 * 256 * 128


def test_padded_batches_pad_to_the_longest_and_mask_padding_labels():
    from benchmarks.epoch import padded_batches
    from trainer.data import TokenizedSplit

    prompts = [np.array([1, 5, 6, 7]), np.array([1, 5]), np.array([1, 8, 9])]
    tokenized = TokenizedSplit(prompts, [np.array([3])] * 3, np.array([0, 1, 0]), [np.array([3]), np.array([4])])
    padded = padded_batches(tokenized, batch_size=2, max_length=5, eos_id=2, pad_id=0, seed=0)
    assert len(padded.batches) == 2 and padded.num_truncated == 1  # 1 5 6 7 3 2 is cut to 5 tokens
    lengths = [len(p) + 2 for p in prompts]
    assert padded.real_tokens == sum(min(n, 5) for n in lengths)
    for input_ids, attention_mask, labels in padded.batches:
        assert input_ids.shape[1] == attention_mask.sum(axis=1).max()  # padded to the longest
        assert (labels == np.where(attention_mask == 1, input_ids, -100)).all()
    assert padded.padding_fraction == pytest.approx(1 - padded.real_tokens / padded.slots)
