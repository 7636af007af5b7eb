"""Every YAML in conf/ composes, for the trainer's config and the sweeper's; every sweep previews."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf

from sweeper import expand
from sweeper.config import SweepConfig, TrackingConfig, register_configs
from trainer.config import TrialConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("sweep", "tracking"))
# The grids; a search (hydra/sweeper=optuna) previews its space instead: tests/search_test.py.
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml") if "/hydra/sweeper: optuna" not in p.read_text())
EXPECTED_TRIALS = {"reference": 16, "quick_cpu": 4}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_configs()


def compose_conf(name: str, overrides: list[str] = (), hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_in_both_configs(group, option):
    for name, schema in (("config", TrialConfig), ("sweeper", SweepConfig)):
        cfg = compose_conf(name, [f"{group}={option}"])
        assert OmegaConf.get_type(cfg) is schema
        assert cfg[group] is not None


@pytest.mark.parametrize("option", options("tracking"))
def test_every_tracking_option_composes(option):
    cfg = compose_conf("sweeper", [f"tracking={option}"])
    assert OmegaConf.get_type(cfg.tracking) is TrackingConfig
    assert cfg.tracking.experiment


def test_sweeper_config_keeps_the_trainers_values_and_adds_its_own():
    trainer = compose_conf("config")
    cfg = compose_conf("sweeper", hydra=True)
    for key in ("lr", "warmup", "ratio", "seed"):
        assert cfg[key] == trainer[key]
    assert cfg.model == trainer.model and cfg.train == trainer.train and cfg.optim == trainer.optim
    assert cfg.tracking.uri is None and cfg.preview is False and cfg.resume is True
    callback = cfg.hydra.callbacks.tracking._target_
    assert get_class(callback).__name__ == "TrackingCallback"


@pytest.mark.parametrize(
    "override,message",
    [
        ("sweep_nme=x", "Key 'sweep_nme' not in 'SweepConfig'"),
        ("tracking.url=http://x", "Key 'url' not in 'TrackingConfig'"),
        ("optim.beta1=0.9", "Key 'beta1' not in 'OptimConfig'"),
        ("preview=maybe", "is not a valid bool"),
        ("lr=fast", "could not be converted to Float"),
    ],
)
def test_typos_and_wrong_types_fail_at_composition(override, message):
    with pytest.raises(ConfigCompositionException) as error:
        compose_conf("sweeper", [override])
    text = f"{error.value} {error.value.__cause__}"
    assert message in text


def expected_trials(sweep: str) -> int:
    params = compose_conf("sweeper", [f"sweep={sweep}"], hydra=True).hydra.sweeper.params or {}
    return math.prod(len(str(values).split(",")) for values in params.values())


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_composes_and_previews_its_trials(sweep, tmp_path):
    cfg = compose_conf("sweeper", [f"sweep={sweep}"], hydra=True)
    assert cfg.hydra.sweeper.params, f"conf/sweep/{sweep}.yaml sets no hydra.sweeper.params"
    count = expected_trials(sweep)
    assert count == EXPECTED_TRIALS.get(sweep, count)
    result = subprocess.run(
        [sys.executable, "-m", "sweeper", "-m", f"sweep={sweep}", "preview=true",
         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{count} trials (preview"), result.stdout
    assert sum(1 for line in lines if line.lstrip().startswith("trial ")) == count
    assert "would fail" not in result.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweep").exists()


def test_reference_sweep_is_the_study():
    cfg = compose_conf("sweeper", ["sweep=reference"], hydra=True)
    assert (cfg.warmup, cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay) == (184, 0.9, 0.9, 0.001)
    assert cfg.hydra.sweeper.params == {"lr": "2e-3,2e-4,2e-5,2e-6", "ratio": "0.5,0.7,0.9,1.0"}


def test_swept_keys_and_trial_names():
    jobs = [["lr=0.002", "ratio=0.5", "seed=0"], ["lr=0.002", "ratio=0.9", "seed=0"], ["lr=0.0002", "ratio=0.5", "seed=0"]]
    keys = expand.swept_keys(jobs)
    assert keys == ["lr", "ratio"]
    assert expand.trial_name(jobs[1], keys) == "lr=0.002,ratio=0.9"
    assert expand.trial_name(["seed=0"], []) == "seed=0"
    assert expand.trial_name([], []) == "defaults"
    overrides = ["lr=0.002", "tracking.uri=sqlite:///x.db", "preview=true", "+optim.end_lr=0", "resume=false"]
    assert expand.trial_overrides(overrides) == ["lr=0.002", "+optim.end_lr=0"]


def test_readme_states_the_defaults_of_the_config():
    """Every single-valued default in README's table of keys is the composed config's (default model)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## The keys you set most"):readme.index("Every group is a typed dataclass")]
    cfg = compose_conf("config")
    checked = 0
    for keys, defaults in re.findall(r"^\| (`[^|]+`) \| (`[^|]+`) \|", table, flags=re.M):
        names = re.findall(r"`([^`]+)`", keys)
        values = re.findall(r"`([^`]+)`", defaults)
        if len(names) != len(values) or any("/" in v for v in values):
            continue
        for name, value in zip(names, values):
            if name in ("model", "finetune"):
                actual = OmegaConf.select(cfg, f"{name}.name" if name == "model" else "finetune.method")
            else:
                actual = OmegaConf.select(cfg, name, default="<missing>")
            expected = OmegaConf.create(f"v: {value}").v  # YAML as Hydra reads it (1e-3 is a float)
            assert actual == expected or str(actual) == str(expected), f"README says {name} = {value}; config has {actual}"
            checked += 1
    assert checked >= 12, checked


def test_help_is_our_own(sweeper_env):
    for module, absent in (("trainer", ("sweep=", "tracking.uri")), ("sweeper", ())):
        result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=Path(__file__).resolve().parents[1],
                                env=sweeper_env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"python -m {module}" in result.stdout and "powered by Hydra" not in result.stdout
        assert "lr=1e-3" in result.stdout or module == "sweeper"
        for text in absent:
            assert text not in result.stdout
