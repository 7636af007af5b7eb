"""glibc malloc settings for XLA's CPU runtime, applied by the entry points before JAX starts.

Each execution of a compiled program allocates its temporary buffers afresh. With glibc's
defaults, the threads of XLA's pool allocate from per-thread arenas whose memory is handed back
to the kernel when freed and faulted in again on the next step; one arena (the main heap, grown
by sbrk) that keeps 256 MiB of slack stops most of those page faults. What that is worth depends
on the machine and the model: `python -m benchmarks.throughput` times ours both ways in every
run, and benchmarks/README.md ("host memory") gives the dated figures per machine. Only for
CPU-only installs: an accelerator's host threads are better served by glibc's per-thread arenas,
and its buffers live on the device.

Set LLM_SWEEPER_MALLOC=default to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# mallopt parameters (glibc's malloc.h).
_M_TOP_PAD = -2
_M_ARENA_MAX = -8
TOP_PAD_BYTES = 256 << 20

# Packages whose presence means JAX will not run on the CPU (unless JAX_PLATFORMS says so).
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu", "jax_plugins.xla_cuda12")


def jax_runs_on_cpu() -> bool:
    """Whether JAX will pick the CPU: JAX_PLATFORMS=cpu, or no accelerator plugin installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    for name in _ACCELERATOR_PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                return False
        except (ImportError, ValueError):
            continue
    return True


def tune_malloc() -> bool:
    """One malloc arena with 256 MiB of top padding, when it helps; True if applied.

    Must run before any second thread allocates (glibc fixes the arena limit then): call it
    first thing in a `__main__`, before importing JAX.
    """
    if os.environ.get("LLM_SWEEPER_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    if not jax_runs_on_cpu():
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, 1)) and bool(mallopt(_M_TOP_PAD, TOP_PAD_BYTES))
