"""What every benchmark shares: the presets from conf/, the data, the machine's description, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import OmegaConf
from tabulate import tabulate

from trainer.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig, TrialConfig

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
# The checkout's neighbour, as tests/conftest.py finds it; $ROTTEN_TOMATOES_DIR wins when set.
SHARED_DATA = REPO.parent / "shared/data/rotten_tomatoes"


def preset(group: str, name: str, schema: type) -> Any:
    """conf/<group>/<name>.yaml checked against its dataclass, as Hydra composes it."""
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def model_preset(name: str = "tiny") -> ModelConfig:
    return preset("model", name, ModelConfig)


def optim_preset(name: str = "adamw") -> OptimConfig:
    return preset("optim", name, OptimConfig)


def train_preset(name: str = "cpu") -> TrainConfig:
    return preset("train", name, TrainConfig)


def eval_preset(name: str) -> EvalConfig:
    return preset("eval", name, EvalConfig)


def trial_preset(*overrides: str) -> TrialConfig:
    """conf/config.yaml with `overrides` (e.g. "model=smollm2_135m"), composed as `python -m trainer` composes it.

    Unlike `preset`, this applies a model preset's own keys (its finetune, optim, data and train
    choices) the way a trial gets them.
    """
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs, to_trial_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # output_dir interpolates Hydra's run directory, which exists only inside a Hydra app.
        cfg = compose("config", overrides=[*overrides, "output_dir=unused"])
    return to_trial_config(cfg)


def data_config() -> DataConfig:
    """The rotten_tomatoes preset, pointed at the local copy when $ROTTEN_TOMATOES_DIR is unset."""
    cfg = preset("data", "rotten_tomatoes", DataConfig)
    if not os.environ.get(cfg.env_var) and SHARED_DATA.is_dir():
        cfg.path = str(SHARED_DATA)
    return cfg


def load_data_and_tokenizer(model_cfg: ModelConfig):
    """(splits, tokenizer): the tokenizer a trial of this model uses, trained once and cached on disk."""
    from trainer.data import full_text, load_splits
    from trainer.tokenizer import load_tokenizer

    data_cfg = data_config()
    splits = load_splits(data_cfg)
    tokenizer = load_tokenizer(model_cfg, [full_text(e) for e in splits["train"]], data_cfg.cache_dir)
    return splits, tokenizer


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow)."""
    return len(os.sched_getaffinity(0))


def cpu_info_field(name: str) -> str:
    """The first value of `name` in /proc/cpuinfo ('' where there is none: not Linux, another platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    return cpu_info_field("model name") or platform.processor() or platform.machine()


# The vector and matrix units that decide a float32 or bfloat16 matmul's speed on x86 (and Arm's).
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_fp16", "asimd", "sve", "bf16")


def cpu_flags() -> str:
    """'avx2 fma avx512f avx512_bf16 (no AMX)': which MATMUL_FLAGS the CPU reports."""
    reported = set((cpu_info_field("flags") or cpu_info_field("Features")).split())
    present = [flag for flag in MATMUL_FLAGS if flag in reported]
    if not reported:
        return "flags unknown"
    x86 = "avx2" in reported or "sse2" in reported
    return " ".join(present) + (" (no AMX)" if x86 and "amx_tile" not in reported else "")


def accelerator_name() -> str:
    """What JAX runs on: 'NVIDIA H200', or 'cpu' where it runs on the host."""
    import jax

    return jax.devices()[0].device_kind if jax.default_backend() != "cpu" else "cpu"


def default_device() -> str:
    """'gpu' where JAX's default backend is a GPU, else 'cpu': where a benchmark runs when not told."""
    import jax

    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"


def busy_share(interval: float = 0.5) -> float:
    """Share of all cores that other processes kept busy over `interval` seconds (this one sleeps)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total_before, idle_before = sample()
        time.sleep(interval)
        total_after, idle_after = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    total = max(total_after - total_before, 1)
    return 1.0 - (idle_after - idle_before) / total


def machine_lines() -> list[str]:
    """The machine and library versions, so a printed table can be compared with another."""
    import flax
    import jax
    import optax

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    busy = busy_share()
    lines = [
        f"machine: {cpu_name()} ({cpu_flags()}), {cpu_count()} usable cores; before the start, other processes kept "
        f"{100 * busy:.0f}% of the CPU busy (load average {load}, 1/5/15 min)",
        f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), flax {flax.__version__}, "
        f"optax {optax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')!r}",
    ]
    if jax.default_backend() != "cpu":
        lines.append(f"accelerator: {accelerator_name()} ({jax.device_count()} device, jax {jax.default_backend()}); "
                     "the steps and the peaks run there, the machine line above is its host")
    if busy > 0.2:
        lines.append(
            f"warning: the machine is busy ({100 * busy:.0f}% of {cpu_count()} cores taken); timings will vary, "
            "PyTorch's most (its OpenMP threads stall when a core is taken)"
        )
    return lines


def print_header(title: str, extra: Sequence[str] = ()) -> None:
    print(f"== {title}")
    for line in [*machine_lines(), *extra]:
        print(f"   {line}")
    print()


def number(value: Any) -> Any:
    """Numbers with the digits a timing deserves: 12,345 / 123.4 / 1.23 / 0.0123; the rest as is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def looks_numeric(cell: Any) -> bool:
    """'12,345', '29.6%' and '1.2-3.4' (a spread) read as numbers, so their column is right-aligned."""
    text = str(cell).replace(",", "").rstrip("%")
    try:
        float(text)
        return True
    except ValueError:
        pass
    try:
        low, high = text.split("-", 1)
        float(low), float(high)
    except ValueError:
        return False
    return True


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], title: str = "") -> None:
    if title:
        print(title)
    cells = [[number(value) for value in row] for row in rows]
    align = ["right" if cells and all(looks_numeric(row[i]) for row in cells) else "left" for i in range(len(headers))]
    print(tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True, colalign=align))
    print()


def seconds(fn: Callable[[], Any]) -> float:
    """Wall seconds of fn(); fn must block until its work is done."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """'min-max' of a few repeats, to show how noisy the median is."""
    return f"{number(float(min(values)))}-{number(float(max(values)))}"
