"""train.save_model in a sweep (sweeper/mlflow_model.py): which trial folders survive, which get logged."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from sweeper import mlflow_model, state, tracking
from trainer.export import METADATA_FILE

pytestmark = [
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
    # MLflow 3.17's own input-example code, under pandas 3; not ours to fix.
    pytest.mark.filterwarnings("ignore:Operation with range is deprecated"),
]


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds)."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder}/mlflow.db"
    client, experiment_id = tracking.open_experiment(uri, "rotten_tomatoes")
    return uri, client, experiment_id


@pytest.fixture
def store(tracking_store, tmp_path):
    """A sweep of its own: a parent run and a sweep folder."""
    uri, client, experiment_id = tracking_store
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    sweep = SimpleNamespace(tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent, num_trials=0)
    return SimpleNamespace(client=client, sweep=sweep, sweep_dir=tmp_path / "sweep", experiment_id=experiment_id)


def add_trial(store, number: int, validation: float, test: float = 0.5, policy: str = "best",
              saved_validation: float | None = None) -> Path:
    """A finished trial's outcome file and its model folder's metadata (`saved_validation`: what the folder says)."""
    run_id = store.client.create_run(store.experiment_id, run_name=f"trial {number}").info.run_id
    output_dir = store.sweep_dir / str(number - 1)
    folder = output_dir / "model"
    folder.mkdir(parents=True)
    saved = validation if saved_validation is None else saved_validation
    metrics = {"test_accuracy": test, **({} if math.isnan(saved) else {"validation_accuracy": saved})}
    (folder / METADATA_FILE).write_text(json.dumps({"save_model": policy, "metrics": metrics}))
    state.write_outcome(store.sweep_dir, state.Outcome(
        trial=number, name=f"lr={number}", status="finished", run_id=run_id, validation_accuracy=validation,
        test_accuracy=test, output_dir=str(output_dir)))
    return folder


def test_best_keeps_one_folder_the_earlier_of_equals_and_leaves_save_all_alone(store):
    worse = add_trial(store, 1, 0.60)
    best = add_trial(store, 2, 0.70)
    tied_later = add_trial(store, 3, 0.70)
    logged_anyway = add_trial(store, 4, 0.50, policy="all")
    outcome, folder = mlflow_model.keep_best(store.client, store.sweep_dir, 0)
    assert (outcome.trial, folder) == (2, best)
    assert best.is_dir() and logged_anyway.is_dir()
    assert not worse.exists() and not tied_later.exists()
    pruned = state.read_summary(store.sweep_dir, 0).outcomes
    tags = {o.trial: store.client.get_run(o.run_id).data.tags for o in pruned}
    assert tags[1]["sweeper.model"] == tags[3]["sweeper.model"] == "pruned"
    assert "below trial 2's 0.7000" in tags[1]["sweeper.model_pruned"]
    assert "sweeper.model" not in tags[2]


def test_a_folder_left_by_an_earlier_run_is_not_taken_for_this_trials_model(store):
    stale = add_trial(store, 1, 0.90, saved_validation=0.55)  # this trial's output_dir held an older model
    fresh = add_trial(store, 2, 0.60)
    outcome, folder = mlflow_model.keep_best(store.client, store.sweep_dir, 0)
    assert (outcome.trial, folder) == (2, fresh)
    assert stale.is_dir()  # neither taken nor deleted: not this sweep's


def test_without_validation_accuracy_no_trial_wins_and_every_folder_stays(store, capsys):
    folders = [add_trial(store, 1, math.nan), add_trial(store, 2, math.nan)]
    assert mlflow_model.keep_best(store.client, store.sweep_dir, 0) is None
    assert mlflow_model.finish_sweep(store.sweep_dir, store.sweep) is None
    assert all(f.is_dir() for f in folders)
    assert "every saved model stays in its trial folder" in capsys.readouterr().err


def test_save_all_logs_the_trial_when_it_ends_and_the_sweep_end_does_not_log_it_twice(store, tiny_tokenizer):
    from trainer.export import save_hf
    from trainer.model import LlamaShape, init_model

    shape = LlamaShape(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0)
    metadata = {"save_model": "all", "metrics": {"validation_accuracy": 0.75, "test_accuracy": 0.5}}
    folder = add_trial(store, 1, 0.75, policy="all")
    save_hf(init_model(shape, 0), tiny_tokenizer, folder, max_positions=128, metadata=metadata)
    outcome = state.read_summary(store.sweep_dir, 0).outcomes[0]
    mlflow_model.after_trial(store.sweep_dir, store.sweep, outcome)
    assert store.client.get_run(outcome.run_id).data.tags["sweeper.model"] == "logged"
    model = mlflow_model.logged_model(store.client, outcome.run_id)
    assert model is not None
    assert mlflow_model.finish_sweep(store.sweep_dir, store.sweep) == f"runs:/{outcome.run_id}/model"
    logged = store.client.search_logged_models([store.experiment_id])
    assert [m.source_run_id for m in logged].count(outcome.run_id) == 1
    best_model = store.client.get_run(store.sweep.parent_run_id).data.tags["sweeper.best_model"]
    assert best_model == f"runs:/{outcome.run_id}/model"
