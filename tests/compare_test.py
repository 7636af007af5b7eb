"""Model setups, before versus after, and the comparison tables and plots, from tidy trial rows."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from sweeper import compare

NAN = float("nan")


def _trials(rows: list[dict]) -> pd.DataFrame:
    """Trial rows as tidy_trials leaves them: params./metrics. columns, id, status, run_id."""
    trials = pd.DataFrame(rows)
    trials.insert(0, "id", range(1, len(trials) + 1))
    trials["run_id"] = [f"run{i}" for i in trials["id"]]
    return trials


def _trial(model: str, method: str = "full", test: float = NAN, validation: float = NAN, before: float = NAN,
           status: str = "finished", **params) -> dict:
    kind = "tfidf_logreg" if model == "tfidf_logreg" else "llama"
    row = {"params.model.name": model, "params.model.kind": kind, "params.finetune.method": method,
           "metrics.test_accuracy": test, "metrics.validation_accuracy": validation,
           "metrics.before_test_accuracy": before, "status": status}
    return row | {f"params.{key}": value for key, value in params.items()}


def test_baseline_keeps_only_its_own_keys():
    runs = pd.DataFrame({
        "params.model.name": ["tfidf_logreg", "tiny"], "params.model.kind": ["tfidf_logreg", "llama"],
        "params.lr": ["0.002", "0.002"], "params.optim.b1": ["0.9", "0.9"], "params.finetune.rank": ["8", "8"],
        "params.model.hidden_size": ["128", "128"], "params.ratio": ["0.5", "0.5"],
        "params.baseline.ngram_max": ["2", "2"],
    })
    blanked = compare.blank_inapplicable(runs)
    assert blanked.iloc[0].isna().tolist() == [False, False, True, True, True, True, False, False]
    assert blanked.iloc[1].isna().tolist() == [False, False, False, False, False, False, False, True]
    # Older runs without model.kind are told apart by the model's name.
    assert compare.is_baseline(runs.drop(columns="params.model.kind")).tolist() == [True, False]


def test_setups_name_what_varies_within_a_method():
    trials = _trials([
        _trial("smollm2_135m", "lora", **{"finetune.rank": 8, "finetune.layers": 2}),
        _trial("smollm2_135m", "lora", **{"finetune.rank": 16, "finetune.layers": 2}),
        _trial("smollm2_135m", "top_layers", **{"finetune.rank": 8, "finetune.layers": 2}),
        _trial("smollm2_135m", "top_layers", **{"finetune.rank": 8, "finetune.layers": 4}),
        _trial("tiny", "full", **{"finetune.rank": 8, "finetune.layers": 2}),
        _trial("tfidf_logreg", "full", **{"finetune.rank": 8, "finetune.layers": 2}),
    ])
    assert compare.setups(trials)["setup"].tolist() == [
        "smollm2_135m (lora, rank 8)", "smollm2_135m (lora, rank 16)", "smollm2_135m (top_layers, 2 layers)",
        "smollm2_135m (top_layers, 4 layers)", "tiny (full)", "tfidf_logreg",
    ]
    # One rank only: the rank is not part of the setup; a run without finetune.method fine-tuned all.
    one_rank = _trials([_trial("smollm2_135m", "lora", **{"finetune.rank": 8}), _trial("open_llama_3b_v2")])
    one_rank.loc[1, "params.finetune.method"] = None
    assert compare.setups(one_rank)["setup"].tolist() == ["smollm2_135m (lora)", "open_llama_3b_v2 (full)"]


def test_best_trial_is_chosen_on_validation_never_a_failed_or_flagged_one():
    trials = _trials([
        _trial("tiny", test=0.90, validation=0.70),
        _trial("tiny", test=0.80, validation=0.75),
        _trial("tiny", test=0.95, validation=0.99, status="failed"),
        _trial("tiny", test=0.50, validation=0.90, status="degenerate"),
    ])
    assert compare.best_trial(trials)["id"] == 2
    assert compare.best_trial(trials.iloc[[2, 3]])["id"] == 4  # flagged wins only when nothing else scored
    assert compare.best_trial(trials.iloc[[2]]) is None


def test_models_table_blank_before_is_never_zero():
    trials = _trials([
        _trial("tfidf_logreg", test=0.77, validation=0.78),
        _trial("smollm2_135m", "lora", test=0.86, validation=0.84, before=0.62),
        _trial("smollm2_135m", "full", test=0.80, validation=0.81),  # eval.before_training=false
        _trial("tiny", test=NAN, validation=NAN, status="failed"),
    ])
    numeric, text = compare.models_table(trials)
    assert numeric["model"].tolist() == ["smollm2_135m", "smollm2_135m", "tfidf_logreg", "tiny"]
    assert text["Before fine-tuning"].tolist() == ["62.00%", "", "—", ""]
    assert numeric["before_test_accuracy"].isna().tolist() == [False, True, True, True]
    assert text.iloc[3][["Trials", "Test accuracy", "Trial", "Run id"]].tolist() == ["1 (1 failed)", "", "", ""]
    assert math.isnan(numeric["test_accuracy"][3]) and pd.isna(numeric["id"][3])


@pytest.fixture
def drawn(monkeypatch):
    """The figures compare.plot draws, kept open to be read back."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for figure in figures:
        close(figure)


def test_plot_draws_before_dashed_and_the_baseline_flat(tmp_path, drawn):
    trials = _trials([
        _trial("smollm2_135m", "lora", test=0.86, validation=0.84, before=0.62, lr=2e-4, ratio=1.0),
        _trial("smollm2_135m", "lora", test=0.88, validation=0.83, before=0.62, lr=2e-3, ratio=1.0),
        _trial("tfidf_logreg", test=0.77, validation=0.78, lr=NAN, ratio=1.0),
    ])
    path = compare.plot(trials, "lr", "ratio", "test_accuracy", tmp_path / "by_lr.png", True, "by lr")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = drawn[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    after = lines["smollm2_135m (lora), ratio=1"]
    assert after.get_ydata().tolist() == [0.86, 0.88] and after.get_linestyle() == "-"
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--" and len(line.get_ydata())]
    assert len(dashed) == 1 and dashed[0].get_ydata().tolist() == [0.62, 0.62]
    assert dashed[0].get_color() == after.get_color()
    flat = lines["tfidf_logreg, ratio=1 (no lr)"]
    assert flat.get_linestyle() == "-." and list(flat.get_ydata()) == [0.77, 0.77]
    assert "dashed: before fine-tuning" in [t.get_text() for t in ax.get_legend().get_texts()]
