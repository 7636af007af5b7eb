import subprocess
import sys

import pytest

from trainer import hostmem


def tune_in_a_fresh_process(env_overrides: dict[str, str], monkeypatch) -> str:
    for key, value in env_overrides.items():
        monkeypatch.setenv(key, value)
    code = "from trainer.hostmem import tune_malloc; print(tune_malloc())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applied_on_a_cpu_only_linux_process(monkeypatch):
    monkeypatch.delenv("LLM_SWEEPER_MALLOC", raising=False)
    assert tune_in_a_fresh_process({"JAX_PLATFORMS": "cpu"}, monkeypatch) == "True"


def test_opt_out_keeps_glibc_defaults(monkeypatch):
    assert tune_in_a_fresh_process({"JAX_PLATFORMS": "cpu", "LLM_SWEEPER_MALLOC": "default"}, monkeypatch) == "False"


@pytest.mark.parametrize("platforms, on_cpu", [("cpu", True), ("cuda", False), ("tpu,cpu", False), ("cpu,cuda", True)])
def test_jax_platforms_decides_where_jax_runs(monkeypatch, platforms, on_cpu):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert hostmem.jax_runs_on_cpu() is on_cpu


def test_an_accelerator_plugin_means_not_cpu(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(hostmem, "_ACCELERATOR_PLUGINS", ("json",))  # any installed module stands in
    assert not hostmem.jax_runs_on_cpu()
    monkeypatch.setattr(hostmem, "_ACCELERATOR_PLUGINS", ("no_such_plugin_here",))
    assert hostmem.jax_runs_on_cpu()
