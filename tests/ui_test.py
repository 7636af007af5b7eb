"""sweeper.notes and sweeper.ui: run names, the parent's comparison note, the trial and experiment
descriptions, and their writers against a real SQLite store (the browser check: browser_test.py)."""

from __future__ import annotations

import json
import math
import re

import pytest

from sweeper import notes, state, ui

# MLflow's own SQLAlchemy models warn on import (mlflow 3.17, SQLAlchemy 2); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.mark.parametrize("text, short", [
    ("0.0002", "2e-4"), ("2e-3", "2e-3"), ("0.002", "2e-3"), ("0.000312345", "3.12e-4"), ("1.5e-05", "1.5e-5"),
    ("0.5", "0.5"), ("1.0", "1.0"), ("184", "184"), ("0", "0"), ("0.123456789", "0.123"), ("12345.6", "1.23e4"),
    ("tiny", "tiny"), ("[1,8,1]", "[1,8,1]"), ("null", "null"), ("nan", "nan"),
])
def test_short_values(text, short):
    assert notes.short_value(text) == short


def test_run_names_lead_with_the_trial_number_and_keep_list_values_whole():
    assert notes.run_name(3, "lr=0.0002,ratio=0.9") == "#3 lr=2e-4 ratio=0.9"
    assert notes.run_name(12, "train.mesh=[1,8,1],lr=0.001") == "#12 train.mesh=[1,8,1] lr=1e-3"
    assert notes.run_name(1, "defaults") == "#1 defaults"
    assert notes.split_overrides("+optim.b2=0.9,model=tiny") == ["+optim.b2=0.9", "model=tiny"]
    # Two trials whose long names share a prefix no longer look alike in a narrow column.
    names = {notes.run_name(n, f"lr=0.0002,ratio={r}") for n, r in ((1, 0.5), (2, 0.9))}
    assert {name[:10] for name in names} == {"#1 lr=2e-4", "#2 lr=2e-4"}


def outcome(trial, name, status="finished", validation=math.nan, test=math.nan, before=math.nan):
    return state.Outcome(trial=trial, name=name, status=status, run_id=f"run{trial}",
                         validation_accuracy=validation, test_accuracy=test, before_test_accuracy=before)


def sweep_state(keys=("lr", "ratio"), num_trials=4) -> state.SweepState:
    return state.SweepState(tracking_uri="sqlite:///unused.db", experiment_id="7", parent_run_id="parent0",
                            num_trials=num_trials, swept_keys=list(keys), started_at=0.0, name="quick_cpu")


GRID = [
    outcome(1, "lr=0.002,ratio=0.5", validation=0.5625, test=0.375, before=0.5),
    outcome(2, "lr=0.002,ratio=1.0", validation=0.5, test=0.5, before=0.5),
    outcome(3, "lr=0.0002,ratio=0.5", validation=0.5625, test=0.5, before=0.5),  # ties trial 1: 1 wins
    outcome(4, "lr=0.0002,ratio=1.0", status="failed"),
]


def table_rows(text: str, title: str) -> list[list[str]]:
    """The cells of the Markdown table under the line `**title**`."""
    section = text.split(f"**{title}**\n\n", 1)[1]
    lines = [line for line in section.split("\n\n", 1)[0].splitlines() if line.startswith("|")]
    return [[cell.replace("&nbsp;", "").strip() for cell in line.strip("|").split("|")]
            for line in lines if not line.startswith("|---")]


def test_the_parent_note_pivots_both_accuracies_and_names_the_best_trial_by_validation():
    text = notes.parent_note(state.Summary(4, GRID[:3]), sweep_state())
    first = text.splitlines()[0]
    assert first.startswith("Best by validation accuracy: trial 1 (lr=0.002, ratio=0.5), test **37.50%**")
    assert "3 of 4 trials done so far (3 finished); updated as each trial ends." in text
    assert table_rows(text, "Test accuracy") == [
        ["lr ↓ · ratio →", "0.5", "1.0"], ["0.0002", "50.00%", ""], ["0.002", "**37.50%**", "50.00%"]]
    assert table_rows(text, "Validation accuracy")[2] == ["0.002", "**56.25%**", "50.00%"]
    trials = table_rows(text, "Trials")
    assert trials[0] == ["trial", "lr", "ratio", "status", "test", "validation", "before training (test)"]
    assert trials[1] == ["**[1](#/experiments/7/runs/run1?workflowType=machine_learning)**", "0.002", "0.5",
                         "finished", "37.50%", "56.25%", "50.00%"]
    assert ("[test and validation accuracy view]"
            "(#/experiments/7/runs?viewStateShareKey=llm-sweeper-accuracy&workflowType=machine_learning)") in text
    assert "python -m sweeper.results --sweep parent0" in text


def test_the_final_note_counts_every_status_and_a_failed_trial_shows_in_its_cell():
    text = notes.parent_note(state.Summary(4, GRID), sweep_state(), final=True)
    assert "Final: 4 of 4 trials (3 finished, 1 failed)." in text
    assert table_rows(text, "Test accuracy")[1] == ["0.0002", "50.00%", "failed"]
    stopped = notes.parent_note(state.Summary(4, GRID[:2], interrupted=True), sweep_state(), final=True)
    assert "stopped after 2 of 4 trials" in stopped and "run the same command again" in stopped


def test_no_pivot_for_one_key_or_a_search_and_a_long_sweep_stays_under_the_tag_limit():
    one_key = notes.parent_note(state.Summary(2, [outcome(1, "lr=0.1", validation=0.6, test=0.7),
                                                  outcome(2, "lr=0.2", validation=0.8, test=0.6)]), sweep_state(["lr"], 2))
    assert "**Test accuracy**" not in one_key and table_rows(one_key, "Trials")[2][0].startswith("**[2](")
    search = [outcome(n, f"lr={0.001 * n:.6f},warmup={n * 7},ratio=0.{n % 9 + 1}", validation=(n % 97) / 100,
                      test=0.5) for n in range(1, 301)]
    text = notes.parent_note(state.Summary(300, search), sweep_state(["lr", "warmup", "ratio"], 300))
    assert len(text) <= notes.NOTE_LIMIT and "**Test accuracy**" not in text
    title = re.search(r"\*\*The (\d+) best of 300 trials by validation accuracy\*\*", text)
    assert title, text[:500]
    listed = table_rows(text, title.group(0)[2:-2])[1:]
    assert len(listed) == int(title.group(1)) and all(float(row[6].rstrip("%")) >= 90 for row in listed)


def test_no_trial_with_a_validation_accuracy_yet():
    text = notes.parent_note(state.Summary(4, []), sweep_state())
    assert text.startswith("No trial has a validation accuracy yet.") and "0 of 4 trials done" in text


def test_the_trial_note_puts_its_accuracies_first():
    metrics = {"test_accuracy": 0.8125, "validation_accuracy": 0.75, "before_test_accuracy": 0.5}
    text = notes.trial_note(metrics, 2, 4, "finished", "", "7", "parent0", "quick_cpu")
    assert text.startswith("Test accuracy **81.25%**, validation accuracy **75.00%** (before training: test 50.00%)")
    assert "Trial 2 of 4 of the sweep [quick_cpu](#/experiments/7/runs/parent0?workflowType=machine_learning)" in text
    failed = notes.trial_note({}, 3, 4, "failed", "ConfigError: ratio=0 is outside (0, 1]", "7", "parent0", "")
    assert failed.startswith("**failed**: ConfigError: ratio=0 is outside (0, 1]")


def test_headline_metrics_are_exact_copies():
    metrics = {"test_accuracy": 0.8125, "validation_accuracy": 0.75, "loss": 1.0}
    assert ui.headline_metrics(metrics) == {"accuracy/test": 0.8125, "accuracy/validation": 0.75}
    assert ui.headline_metrics({"validation_accuracy": math.nan}) == {}
    assert min(list(ui.headline_metrics(metrics)) + ["before_test_accuracy", "compile_seconds"]) == "accuracy/test"


# ---------------------------------------------------------------- against a real store


@pytest.fixture()
def store(tmp_path):
    from sweeper import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client, experiment_id = tracking.open_experiment(uri, "rotten_tomatoes")
    return uri, client, experiment_id


def test_the_experiment_is_described_once_and_a_users_own_description_is_kept(store):
    uri, client, experiment_id = store
    ui.describe_experiment(client, experiment_id)
    tags = client.get_experiment(experiment_id).tags
    assert tags[ui.NOTE_TAG] == notes.experiment_note(experiment_id) and "`accuracy/test`" in tags[ui.NOTE_TAG]
    assert tags[ui.EXPERIMENT_KIND_TAG] == "finetuning"
    view = json.loads(tags[ui.VIEW_TAG])
    assert view["name"] == notes.VIEW_NAME
    assert json.loads(view["state"])["selectedColumns"][:2] == ["metrics.`accuracy/test`", "metrics.`accuracy/validation`"]
    # A user's description and view survive the next sweep; only our own note would be rewritten.
    client.set_experiment_tag(experiment_id, ui.NOTE_TAG, "my own notes")
    client.set_experiment_tag(experiment_id, ui.VIEW_TAG, '{"name": "mine"}')
    ui.describe_experiment(client, experiment_id)
    tags = client.get_experiment(experiment_id).tags
    assert tags[ui.NOTE_TAG] == "my own notes" and tags[ui.VIEW_TAG] == '{"name": "mine"}'


def test_the_parent_note_is_rewritten_after_each_trial(store, tmp_path):
    uri, client, experiment_id = store
    parent = client.create_run(experiment_id, run_name="quick_cpu").info.run_id
    sweep = state.SweepState(uri, experiment_id, parent, 4, ["lr", "ratio"], 0.0, name="quick_cpu")
    state.write_state(tmp_path / "sweep", sweep)
    for done, trial in enumerate(GRID, start=1):
        state.write_outcome(tmp_path / "sweep", trial)
        ui.refresh_parent_note(tmp_path / "sweep", sweep)
        note = client.get_run(parent).data.tags[ui.NOTE_TAG]
        assert f"{done} of 4 trials done so far" in note
    assert table_rows(note, "Test accuracy")[1] == ["0.0002", "50.00%", "failed"]
    # The sweep's end journals the final note; the parent's outbox (sweeper/callbacks.py) sends it.
    ui.refresh_parent_note(tmp_path / "sweep", sweep, final=True)
    from sweeper.outbox import Outbox

    box = Outbox(tmp_path / "sweep" / ui.PARENT_OUTBOX, uri, 10)
    assert box.send(block=True) == 0
    box.release()
    assert client.get_run(parent).data.tags[ui.NOTE_TAG].count("Final: 4 of 4 trials") == 1


def test_a_damaged_outcome_file_or_a_lost_store_never_fails_the_caller(store, tmp_path, capsys):
    uri, client, experiment_id = store
    parent = client.create_run(experiment_id, run_name="s").info.run_id
    sweep = state.SweepState(uri, experiment_id, parent, 2, ["lr"], 0.0)
    state.write_state(tmp_path / "sweep", sweep)
    (tmp_path / "sweep" / state.OUTCOMES_DIR).mkdir()
    (tmp_path / "sweep" / state.OUTCOMES_DIR / "0001.json").write_text('{"trial": 1, "name": "lr=0.1", "sta')
    ui.refresh_parent_note(tmp_path / "sweep", sweep)  # a file cut short by a crash mid-write
    assert "the parent run's description was not updated (JSONDecodeError" in capsys.readouterr().err
    assert ui.NOTE_TAG not in client.get_run(parent).data.tags
    (tmp_path / "sweep" / state.OUTCOMES_DIR / "0001.json").unlink()
    (tmp_path / "mlflow.db").write_bytes(b"not a database any more")  # the store itself is gone
    ui.refresh_parent_note(tmp_path / "sweep", sweep)
    ui.describe_experiment(client, experiment_id)
    err = capsys.readouterr().err
    assert "warning: the experiment's description and saved view were not written" in err
