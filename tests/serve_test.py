"""The winner of a sweep: kept (train.save_model=best), logged as an MLflow pyfunc, registered, loaded in
a fresh process, served by `mlflow models serve`, and re-scored by `python -m trainer.evaluate`.

One two-trial sweep of the tiny model (30 steps each, enough to be far from degenerate) serves the
module; every command is the real one in a subprocess, against a temporary SQLite store.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

# MLflow's own SQLAlchemy models warn on import (mlflow 3.17, SQLAlchemy 2); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CURATED = REPO.parent / "shared/data/rotten_tomatoes/curated_labels_sample.csv"
TRAIN = ["train.total_steps=30", "eval.before_training=false", "tracking.flush_every=10"]
NAME = "rt-serve-test"


def run(args: list[str], env: dict, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def swept(sweeper_env, tmp_path_factory):
    """`python -m sweeper -m lr=2e-3,5e-3` with the default train.save_model=best."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{folder}/mlflow.db"
    env = {**sweeper_env, "MLFLOW_TRACKING_URI": uri}
    done = run(["-m", "sweeper", "-m", "lr=2e-3,5e-3", *TRAIN, "sweep_name=serve_test", f"tracking.uri={uri}",
                f"hydra.sweep.dir={folder}/sweep"], env)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rotten_tomatoes")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweeper.kind") == "sweep")
    trials = sorted((r for r in runs if r.data.tags.get("sweeper.kind") == "trial"),
                    key=lambda r: int(r.data.tags["sweeper.trial"]))
    # The best by validation accuracy, the earlier trial among equals.
    best = max(trials, key=lambda r: r.data.metrics["validation_accuracy"])
    return SimpleNamespace(folder=folder, uri=uri, env=env, client=client, stdout=done.stdout, parent=parent,
                           trials=trials, best=best, best_dir=Path(best.data.tags["sweeper.output_dir"]))


@pytest.mark.slow
def test_the_sweep_keeps_and_logs_only_the_best_model(swept):
    from mlflow.entities import LoggedModelStatus

    from sweeper.mlflow_model import logged_model

    assert len(swept.trials) == 2 and swept.best.data.metrics["test_majority_share"] < 0.95  # not degenerate
    for trial in swept.trials:
        folder = Path(trial.data.tags["sweeper.output_dir"]) / "model"
        if trial.info.run_id == swept.best.info.run_id:
            assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.model").is_file()
            assert trial.data.tags["sweeper.model"] == "logged"
            model = logged_model(swept.client, trial.info.run_id)
            assert model is not None and model.status == LoggedModelStatus.READY
        else:
            assert not folder.exists(), "train.save_model=best deleted the other trial's folder"
            assert trial.data.tags["sweeper.model"] == "pruned"
            assert logged_model(swept.client, trial.info.run_id) is None
    assert swept.parent.data.tags["sweeper.best_model"] == f"runs:/{swept.best.info.run_id}/model"
    assert f"runs:/{swept.best.info.run_id}/model" in swept.stdout
    # The weights are in the MLflow model only, not also among the run's plain artifacts.
    plain = [a.path for a in swept.client.list_artifacts(swept.best.info.run_id)]
    assert plain and not any("safetensors" in path or path == "model" for path in plain)


@pytest.fixture(scope="module")
def registered(swept):
    done = run(["-m", "sweeper.results", "register", "--sweep", "serve_test", "--name", NAME,
                "--tracking-uri", swept.uri], swept.env)
    return done.stdout


@pytest.mark.slow
def test_registering_the_best_trial_creates_version_1_with_its_tags(swept, registered):
    version = swept.client.get_model_version(NAME, "1")
    tags, best = version.tags, swept.best
    assert version.run_id == best.info.run_id and version.source.startswith("models:/m-")
    assert tags["sweep"] == "serve_test" and tags["run_id"] == best.info.run_id
    assert tags["trial"] == best.data.tags["sweeper.overrides"]
    assert float(tags["param.lr"]) == float(best.data.params["lr"])
    validation = best.data.metrics["validation_accuracy"]
    assert float(tags["metric.validation_accuracy"]) == pytest.approx(validation, abs=1e-6)
    assert float(tags["metric.test_accuracy"]) == pytest.approx(best.data.metrics["test_accuracy"], abs=1e-6)
    assert f"registered {NAME} version 1" in registered
    assert f"mlflow models serve -m models:/{NAME}/1 --env-manager local --host 127.0.0.1" in registered


@pytest.mark.slow
def test_register_names_a_metric_it_does_not_know(swept):
    done = subprocess.run([sys.executable, "-m", "sweeper.results", "register", "--name", NAME, "--metric",
                           "validation_acc", "--tracking-uri", swept.uri], cwd=REPO, env=swept.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'validation_acc' is not logged" in done.stderr and "validation_accuracy" in done.stderr


PREDICT = """
import json, sys
import mlflow, pandas as pd
records = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
reviews = json.load(open(sys.argv[3]))
model = mlflow.pyfunc.load_model(sys.argv[1])
by_text = model.predict(pd.DataFrame({"text": reviews}))
by_prompt = model.predict({"prefix_text": [r["prompt"] for r in records[:20]]})
import trainer
print(json.dumps({"labels": list(by_text["label"]), "scores": list(by_text["score"]),
                  "prompt_labels": list(by_prompt["label"]), "trainer": trainer.__file__}))
"""


@pytest.mark.slow
def test_the_logged_pyfunc_predicts_our_evaluations_labels_in_a_fresh_process(swept, rt_splits, tmp_path):
    predictions = swept.best_dir / "predictions_test.jsonl"
    records = read_jsonl(predictions)
    reviews = [e.text for e in rt_splits["test"]]
    assert len(records) == len(reviews) == 1066
    (tmp_path / "reviews.json").write_text(json.dumps(reviews))
    (tmp_path / "predict.py").write_text(PREDICT)
    env = {k: v for k, v in swept.env.items() if k != "PYTHONPATH"}
    done = run([str(tmp_path / "predict.py"), f"runs:/{swept.best.info.run_id}/model", str(predictions),
                str(tmp_path / "reviews.json")], env, cwd=tmp_path)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["labels"] == [r["output"] for r in records]  # the trial's own evaluation, label for label
    assert out["prompt_labels"] == [r["output"] for r in records[:20]]  # the study's prefix_text prompts
    scores = np.array([[r["scores"]["Negative"], r["scores"]["Positive"]] for r in records])
    chosen = np.exp(scores.max(axis=1) - np.logaddexp(scores[:, 0], scores[:, 1]))
    np.testing.assert_allclose(out["scores"], chosen, rtol=0, atol=1e-4)
    assert len(set(out["labels"])) == 2
    assert not out["trainer"].startswith(str(REPO))  # the model's own copy of trainer/, not the checkout's


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> dict:
    data = json.dumps(body)
    if shutil.which("curl"):
        done = subprocess.run(["curl", "-s", "--max-time", "60", url, "-H", "Content-Type: application/json",
                               "-d", data], capture_output=True, text=True, timeout=90)
        return json.loads(done.stdout)
    request = urllib.request.Request(url, data.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_on_loopback_with_our_labels(swept, registered, tmp_path):
    records = read_jsonl(swept.best_dir / "predictions_test.jsonl")
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=swept.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /ping within 120 s"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/invocations"
        reviews = [r["prompt"].removeprefix("[Text]: ").removesuffix("\n[Sentiment]:") for r in records[:8]]
        answer = post(url, {"inputs": {"text": reviews}})
        assert [p["label"] for p in answer["predictions"]] == [r["output"] for r in records[:8]]
        assert all(0.5 <= p["score"] <= 1.0 for p in answer["predictions"])
        prompts = post(url, {"dataframe_records": [{"prefix_text": r["prompt"]} for r in records[-4:]]})
        assert [p["label"] for p in prompts["predictions"]] == [r["output"] for r in records[-4:]]
        bad = post(url, {"inputs": {"prefix_text": ["[Text]: no cue at the end"]}})
        assert bad["error_code"] == "BAD_REQUEST" and "does not end with" in bad["stack_trace"]  # our message
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the group this test started: the CLI and its server
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_evaluate_rescores_the_saved_model_as_the_trial_did(swept, tmp_path):
    out = tmp_path / "rescore"
    done = run(["-m", "trainer.evaluate", f"model.checkpoint={swept.best_dir / 'model'}", "eval.splits=[test]",
                f"hydra.run.dir={out}"], swept.env)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(swept.best.data.metrics["test_accuracy"], abs=1e-9)
    assert read_jsonl(out / "predictions_test.jsonl") == read_jsonl(swept.best_dir / "predictions_test.jsonl")
    assert f"test accuracy: {metrics['test_accuracy']:.2%} of 1066" in done.stdout


@pytest.mark.slow
def test_evaluate_sweeps_temperature_over_the_curated_labels(swept, tmp_path):
    out = tmp_path / "multirun"
    run(["-m", "trainer.evaluate", "-m", f"model.checkpoint={swept.best_dir / 'model'}", "eval.mode=generate",
         "eval.temperature=0,0.7", f"curated_labels={CURATED}", f"hydra.sweep.dir={out}"], swept.env)
    with CURATED.open(newline="") as handle:
        rows = {f"[Text]: {r['text'].strip()}\n[Sentiment]:": r for r in csv.DictReader(handle)}
    for job in ("0", "1"):
        metrics = json.loads((out / job / "metrics.json").read_text())
        records = read_jsonl(out / job / "predictions_curated.jsonl")
        assert len(records) == 30
        from trainer.evaluate import parse_answer

        # The same predictions, scored here against each column of the CSV.
        for column, expected_rows in (("original_label", 30), ("curated_label", 29)):
            labelled = [(rows[r["prompt"]][column], parse_answer(r["output"]))
                        for r in records if rows[r["prompt"]][column]]
            assert len(labelled) == expected_rows
            accuracy = np.mean([["Negative", "Positive"].index(label) == predicted for label, predicted in labelled])
            assert metrics[f"curated_{column}_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    config = (out / "1" / ".hydra" / "config.yaml").read_text()
    assert "temperature: 0.7" in config and "mode: generate" in config


# ---------------------------------------------------------------- fast checks of the pieces


def test_pyfunc_input_accepts_columns_lists_and_names_a_bad_one():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pyfunc_model_under_test", REPO / "sweeper/pyfunc_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    frame = pd.DataFrame({"text": ["good", None], "prefix_text": [None, "[Text]: bad\n[Sentiment]:"]})
    assert module._inputs(frame) == (["good", None], [None, "[Text]: bad\n[Sentiment]:"])
    listed = pd.DataFrame({"text": [["a", "b", "c"]]})  # what predict({"text": [...]}) hands over
    assert module._inputs(listed) == (["a", "b", "c"], [None, None, None])
    with pytest.raises(ValueError, match="2 texts but 3 prefix_texts"):
        module._inputs(pd.DataFrame({"text": [["a", "b"]], "prefix_text": [["x", "y", "z"]]}))


def test_evaluate_config_composes_and_rejects_a_missing_checkpoint(tmp_path):
    from hydra import compose, initialize_config_dir

    from trainer.config import TrialConfig
    from trainer.rescore import EvaluateConfig, register_configs, rescore

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval.temperature=0.7", "curated_labels=x.csv"])
    assert cfg.eval.temperature == 0.7 and cfg.curated_labels == "x.csv" and cfg.model.name == "tiny"
    assert list(cfg.label_columns) == list(EvaluateConfig().label_columns)
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="model.checkpoint=None.*model.checkpoint=outputs/"):
        rescore(TrialConfig(output_dir=str(tmp_path)))
