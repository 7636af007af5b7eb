"""Preemption-safe trials: a trial stopped by SIGTERM resumes from its Orbax checkpoint and ends
exactly where the uninterrupted trial ends."""

import os
import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from trainer import interrupt
from trainer.config import register_configs
from trainer.resume import TrialCheckpoints, checkpoint_folder
from trainer.trial import run_trial

CONF = Path(__file__).resolve().parents[1] / "conf"
QUICK = ["train.total_steps=10", "eval.max_examples=32", "train.batch_size=8", "eval.before_training=false"]


@pytest.fixture(autouse=True)
def _data(rt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ROTTEN_TOMATOES_DIR", str(rt_dir))
    monkeypatch.setenv("LLM_SWEEPER_CACHE", str(tmp_path / "cache"))


def config(folder, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={folder}", f"train.checkpoint_dir={folder.parent}/ckpt",
                                            *QUICK, *overrides])


def sigterm_at(step):
    def callback(record):
        if record.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return callback


# bfloat16: mixed precision resumes from its float32 master weights and Adam state alone.
@pytest.mark.parametrize("method,dtype", [("full", "float32"), ("lora", "float32"), ("full", "bfloat16")])
def test_a_trial_stopped_by_sigterm_resumes_to_the_same_loss_and_accuracy(tmp_path, method, dtype):
    overrides = [f"finetune={method}", f"model.dtype={dtype}"] + (["finetune.dropout=0.1"] if method == "lora" else [])
    whole = run_trial(config(tmp_path / "whole", *overrides))
    assert whole.status == "finished"

    previous = signal.getsignal(signal.SIGTERM)
    interrupt.install()
    try:
        cfg = config(tmp_path / "cut", *overrides, "train.checkpoint_every_steps=3")
        with pytest.raises(interrupt.Interrupted) as stopped:
            run_trial(cfg, callback=sigterm_at(5))
        assert stopped.value.exit_code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from trainer.config import to_trial_config

    checkpoints = TrialCheckpoints(to_trial_config(cfg))
    assert not TrialCheckpoints(to_trial_config(cfg), label="another-run").latest_step()  # not another run's
    saved = checkpoints.latest_step()
    assert saved is not None and saved >= 5  # saved at the step boundary after the signal, not step 3

    seen = []
    resumed = run_trial(cfg, callback=seen.append)
    assert resumed.status == "finished"
    assert [r.step for r in seen] == list(range(saved + 1, 11))  # no step twice, none missing
    assert resumed.metrics["resumed_from_step"] == saved
    assert resumed.metrics["final_loss"] == pytest.approx(whole.metrics["final_loss"], rel=1e-6)
    assert resumed.metrics["test_accuracy"] == pytest.approx(whole.metrics["test_accuracy"], rel=1e-6)
    assert resumed.metrics["train_tokens"] == whole.metrics["train_tokens"]
    assert not checkpoint_folder(to_trial_config(cfg)).exists()  # a finished trial's checkpoints go


def test_another_config_does_not_resume_from_the_checkpoint(tmp_path):
    a = to_config(tmp_path / "a")
    b = to_config(tmp_path / "b", "lr=5e-4")
    assert checkpoint_folder(a) != checkpoint_folder(b)
    # output_dir and checkpoint settings don't change the numbers, so they share the folder
    assert checkpoint_folder(a) == checkpoint_folder(to_config(tmp_path / "c", "train.checkpoint_every_steps=7"))


def test_a_damaged_checkpoint_is_reported_and_the_trial_starts_over(tmp_path, capsys):
    cfg = config(tmp_path / "run", "train.checkpoint_every_steps=4", "train.keep_checkpoint=true")
    first = run_trial(cfg)
    folder = checkpoint_folder(to_config_from(cfg))
    assert folder.is_dir()
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_size > 64 and "meta" not in path.name:
            path.write_bytes(b"\0" * 16)
    again = run_trial(cfg)
    assert "could not be restored" in capsys.readouterr().out
    assert "resumed_from_step" not in again.metrics
    assert again.metrics["final_loss"] == pytest.approx(first.metrics["final_loss"], rel=1e-6)


def to_config(folder, *overrides):
    return to_config_from(config(folder, *overrides))


def to_config_from(cfg):
    from trainer.config import to_trial_config

    return to_trial_config(cfg)
