"""Smoke run of benchmarks/vectorized.py (`--quick`, in a subprocess); no assertion on speed.

Beside tests/benchmarks_test.py rather than in it: that file was being edited by another change.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_vectorized_quick_prints_both_sides_and_the_ratios(rt_dir, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "llm_sweeper_cache"  # shared with the other subprocess tests
    cache.mkdir(exist_ok=True)
    env = {**os.environ, "ROTTEN_TOMATOES_DIR": str(rt_dir), "LLM_SWEEPER_CACHE": str(cache),
           "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.vectorized", "--quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    out = result.stdout
    for column in ("sequential trials/h", "vectorised trials/h", "ratio (wall)", "ratio (train)"):
        assert column in out
    row = next(line for line in out.splitlines() if line.startswith("|   2 |"))
    assert ", equal" in row  # both sides trained the same trials to the same test accuracy
