"""The TF-IDF + logistic-regression trial kind, run through run_trial on the local Rotten Tomatoes copy."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from trainer.config import ConfigError, EvalConfig, register_configs
from trainer.data import LABEL_NAMES, prompt_text
from trainer.packing import TokenizedSplit
from trainer.evaluate import evaluate_split
from trainer.model import LlamaShape, init_model
from trainer.report import format_summary
from trainer.trial import run_trial

CONF = Path(__file__).resolve().parents[1] / "conf"


def read_jsonl(path) -> list[dict]:
    # Records end at "\n" only: reviews hold U+0085, which str.splitlines would also break at.
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


def baseline_config(output_dir, *overrides, data_path=None):
    """The composed conf/ with model=tfidf_logreg, so the YAML and the dispatch are what run."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[
            "model=tfidf_logreg", f"output_dir={output_dir}", f"data.path={data_path}", *overrides,
        ])


@pytest.fixture(scope="module")
def full(rt_dir, tmp_path_factory):
    """The baseline on the whole train split (about 2 s)."""
    return run_trial(baseline_config(tmp_path_factory.mktemp("full"), data_path=rt_dir))


@pytest.fixture(scope="module")
def half(rt_dir, tmp_path_factory):
    return run_trial(baseline_config(tmp_path_factory.mktemp("half"), "ratio=0.5", "eval.max_examples=100",
                                     data_path=rt_dir))


def test_full_split_accuracy_is_in_the_band_of_tfidf_logreg_on_this_data(full):
    # Measured: 79.08% test, 75.80% validation, C=10 (1-2 grams, sublinear tf, min_df=1).
    assert full.status == "finished"
    assert 0.76 <= full.metrics["test_accuracy"] <= 0.82
    assert full.metrics["train_examples"] == 8530
    assert full.metrics["vocabulary_size"] > 50_000  # word 1-2 grams of 8530 reviews
    assert not full.metrics["test_degenerate"] and full.metrics["test_invalid_rate"] == 0.0


def test_metrics_have_the_llm_trials_names_and_no_before_training(full):
    m = full.metrics
    for split in ("test", "validation"):
        for key in ("accuracy", "f1_macro", "invalid_rate", "majority_share", "degenerate", "precision_positive"):
            assert f"{split}_{key}" in m
    assert not [key for key in m if key.startswith("before_")]
    assert full.history == [] and set(full.reports) == {"test", "validation"}
    assert sum(map(sum, full.reports["test"].confusion)) == 1066


def test_chosen_c_is_the_argmax_of_validation_accuracy(full):
    search = json.loads(Path(full.artifacts["c_search"]).read_text())
    curve = search["candidates"]
    assert [point["c"] for point in curve] == [0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
    best = max(point["validation_accuracy"] for point in curve)
    first_best = next(point["c"] for point in curve if point["validation_accuracy"] == best)  # the smaller C on a tie
    assert search["chosen_c"] == first_best == full.metrics["baseline_c"]
    # The kept model is the one scored: its validation accuracy is the curve's best.
    assert full.metrics["validation_accuracy"] == pytest.approx(best)


def test_predictions_have_one_line_per_example_and_the_llm_trials_keys(full, rt_splits, tmp_path):
    llm_keys = set(llm_prediction_record(tmp_path))
    for split in ("test", "validation"):
        records = read_jsonl(full.artifacts[f"predictions_{split}"])
        assert len(records) == 1066
        assert all(set(record) == llm_keys for record in records)
        correct = 0
        for record, example in zip(records, rt_splits[split]):
            assert record["prompt"] == prompt_text(example.text) and record["label"] == LABEL_NAMES[example.label]
            scores = record["scores"]
            assert math.fsum(math.exp(s) for s in scores.values()) == pytest.approx(1.0)  # log-probabilities
            assert record["output"] == max(scores, key=scores.get)
            assert record["correct"] == (record["output"] == record["label"])
            correct += record["correct"]
        assert full.metrics[f"{split}_accuracy"] == pytest.approx(correct / 1066)


def llm_prediction_record(folder: Path) -> dict:
    """One record as the LLM trial writes it (score mode), from a tiny random model on two prompts."""
    shape = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, init_std=0.5)
    graphdef, params = nnx.split(init_model(shape, 0), nnx.Param)
    tokenized = TokenizedSplit(
        prompts=[np.array([1, 5, 6, 7], np.int32), np.array([1, 8, 9], np.int32)],
        answers=[np.array([10], np.int32), np.array([11], np.int32)],
        labels=np.array([0, 1], np.int32),
        candidate_answers=[np.array([10], np.int32), np.array([11], np.int32)],
    )
    path = folder / "predictions.jsonl"
    evaluate_split("test", graphdef, params, tokenized, SimpleNamespace(eos_id=2), EvalConfig(batch_size=2), seed=0,
                   prompt_texts=["a", "b"], predictions_path=path)
    return read_jsonl(path)[0]


def test_ratio_half_trains_on_4265_and_max_examples_limits_only_the_reported_evaluation(half):
    assert half.metrics["train_examples"] == 4265
    search = json.loads(Path(half.artifacts["c_search"]).read_text())
    assert search["train_examples"] == 4265 and search["validation_examples"] == 1066  # C picked on all of it
    for split in ("test", "validation"):
        assert half.reports[split].num_examples == 100
        assert len(read_jsonl(half.artifacts[f"predictions_{split}"])) == 100


def test_summary_names_the_baseline_and_prints_no_token_or_step_figures(full):
    text = format_summary(full)
    assert text.splitlines()[1].startswith(f"test accuracy: {full.metrics['test_accuracy']:.2%}")  # the headline first
    assert "C=10" in text and "TF-IDF features" in text
    assert "tokens" not in text and "steps" not in text and "compile" not in text


def write_jsonl_splits(folder: Path, train_labels: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mixed = [{"text": "a fine film", "label": 1}, {"text": "a dull film", "label": 0}]
    train = [{"text": f"review number {i}", "label": label} for i, label in enumerate(train_labels)]
    for split, records in (("train", train), ("validation", mixed), ("test", mixed)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_a_one_class_train_set_is_a_config_error(tmp_path):
    data = write_jsonl_splits(tmp_path / "data", [1] * 19 + [0])
    with pytest.raises(ConfigError, match=r"one class only \(Positive\).*raise ratio"):
        run_trial(baseline_config(tmp_path / "out", "ratio=0.05", data_path=data))


@pytest.mark.parametrize(
    "override,fragment",
    [("baseline.c_grid=[]", "baseline.c_grid"), ("baseline.c_grid=[1,-1]", "baseline.c_grid"),
     ("baseline.ngram_max=0", "baseline.ngram_max=0"), ("baseline.min_df=50", "baseline.min_df=50")],
)
def test_bad_baseline_knobs_are_config_errors(tmp_path, override, fragment):
    data = write_jsonl_splits(tmp_path / "data", [0, 1] * 10)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        run_trial(baseline_config(tmp_path / "out", override, data_path=data))
