"""The study's traditional-ML side: TF-IDF word n-grams + logistic regression, as a trial kind.

`run_baseline_trial` is what `run_trial` calls for model.kind=tfidf_logreg. It reads the same
data, trains on the same `ratio` subset (`sample_ratio` with the trial's seed) and evaluates the
same splits with the same `classification_report`, so its metrics carry the LLM trials' names
(`test_accuracy`, `validation_accuracy`, `test_f1_macro`, `test_degenerate`, ...) and a sweep,
its MLflow runs and the exported tables compare the two kinds row by row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from trainer import data as data_lib
from trainer.config import BaselineConfig, ConfigError, TrialConfig
from trainer.evaluate import EvalReport, classification_report
from trainer.trial import TrialResult

# lbfgs on ~10^5 sparse features converges in well under this at every C of the default grid.
MAX_ITER = 1000


def check_baseline(cfg: BaselineConfig) -> None:
    """Fail before any fitting on knobs the vectorizer or the C search cannot use."""
    if cfg.ngram_max < 1:
        raise ConfigError(f"baseline.ngram_max={cfg.ngram_max} must be >= 1; use e.g. baseline.ngram_max=2")
    if cfg.min_df < 1:
        raise ConfigError(f"baseline.min_df={cfg.min_df} must be >= 1 (a count of documents); use e.g. baseline.min_df=1")
    if not cfg.c_grid or any(not (np.isfinite(c) and c > 0) for c in cfg.c_grid):
        raise ConfigError(
            f"baseline.c_grid={list(cfg.c_grid)} needs one or more finite C > 0; use e.g. baseline.c_grid=[0.1,1,10]"
        )


def _fit_vectorizer(cfg: BaselineConfig, texts: Sequence[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, cfg.ngram_max), min_df=cfg.min_df, sublinear_tf=cfg.sublinear_tf)
    try:
        features = vectorizer.fit_transform(texts)
    except ValueError as error:  # e.g. min_df above every term's document count
        raise ConfigError(
            f"the TF-IDF vectorizer kept no features from {len(texts)} train reviews ({error}); "
            f"lower baseline.min_df={cfg.min_df} or raise ratio"
        ) from None
    return vectorizer, features


def search_c(c_grid: Sequence[float], train_X, train_y, validation_X, validation_y, seed: int):
    """Fit one model per C; keep the best validation accuracy, the smaller C on a tie.

    Returns (the kept model, its C, [{"c", "validation_accuracy"} for each C in ascending order]).
    """
    from sklearn.linear_model import LogisticRegression

    best, best_c, best_accuracy, curve = None, None, -1.0, []
    for c in sorted({float(c) for c in c_grid}):
        model = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)
        model.fit(train_X, train_y)
        accuracy = float(np.mean(model.predict(validation_X) == validation_y))
        curve.append({"c": c, "validation_accuracy": accuracy})
        if accuracy > best_accuracy:  # strict: ascending order keeps the smaller C on a tie
            best, best_c, best_accuracy = model, c, accuracy
    return best, best_c, curve


def evaluate_examples(
    split: str, model, vectorizer, examples: Sequence[data_lib.Example], max_examples: int | None,
    predictions_path: Path | None, seed: int = 0,
) -> EvalReport:
    """A seeded stratified subset of max_examples of a split (all when None), as `evaluate_split` takes them."""
    if max_examples is not None:
        keep = data_lib.stratified_indices([e.label for e in examples], max_examples, seed)
        examples = [examples[i] for i in keep]
    labels = np.asarray([e.label for e in examples], dtype=np.int32)
    # Columns in label order whatever order the model stores its classes in.
    log_probs = model.predict_log_proba(vectorizer.transform([e.text for e in examples]))
    log_probs = log_probs[:, np.argsort(model.classes_)]
    predictions = np.argmax(log_probs, axis=1)
    if predictions_path is not None:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        with predictions_path.open("w", encoding="utf-8") as f:
            for example, prediction, scores in zip(examples, predictions, log_probs):
                record = {
                    "prompt": data_lib.prompt_text(example.text),
                    "output": data_lib.LABEL_NAMES[int(prediction)],
                    "label": data_lib.LABEL_NAMES[example.label],
                    "correct": bool(prediction == example.label),
                    "scores": {name: float(s) for name, s in zip(data_lib.LABEL_NAMES, scores)},
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return classification_report(split, labels, predictions)


def run_baseline_trial(cfg: TrialConfig, callback: Callable | None = None) -> TrialResult:
    """Fit TF-IDF + logistic regression on the trial's train subset, pick C, evaluate cfg.eval.splits.

    C is chosen on the whole validation split (eval.max_examples limits only the reported
    evaluation), so `validation_accuracy` is the selection score, as it is for an LLM sweep that
    picks its lr on it. Predictions JSONL records have the LLM trial's keys; `scores` holds each
    label's natural-log probability under the model (exp of the two sums to 1), the baseline's
    counterpart of the LLM's per-label log-likelihoods. The C curve goes to `c_search.json`.
    There is no training before which to evaluate and there are no steps: no `before_*`
    metrics, an empty history, and `callback` (run_trial's step hook) is never called.
    """
    del callback
    wall_start = time.perf_counter()
    check_baseline(cfg.baseline)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    dataset = data_lib.load_dataset(cfg.data)
    splits = dataset.splits
    train = data_lib.sample_ratio(splits["train"], cfg.ratio, cfg.seed)
    present = sorted({e.label for e in train})
    if len(present) < 2:
        names = ", ".join(data_lib.LABEL_NAMES[label] for label in present) or "none"
        raise ConfigError(
            f"ratio={cfg.ratio} leaves {len(train)} train example(s) of one class only ({names}) in "
            f"{dataset.source}; logistic regression needs both Negative and Positive reviews: raise ratio "
            "or use a train split with both classes"
        )
    data_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    vectorizer, train_X = _fit_vectorizer(cfg.baseline, [e.text for e in train])
    train_y = np.asarray([e.label for e in train])
    validation_X = vectorizer.transform([e.text for e in splits["validation"]])
    validation_y = np.asarray([e.label for e in splits["validation"]])
    model, chosen_c, curve = search_c(cfg.baseline.c_grid, train_X, train_y, validation_X, validation_y, cfg.seed)
    train_seconds = time.perf_counter() - t0

    c_search_path = output_dir / "c_search.json"
    c_search_path.write_text(json.dumps({
        "chosen_c": chosen_c,
        "selected_by": "validation accuracy; the smaller C on a tie",
        "validation_examples": len(validation_y),
        "train_examples": len(train),
        "data": dataset.source,
        "candidates": curve,
    }, indent=2) + "\n")
    artifacts = {"c_search": str(c_search_path)}

    t0 = time.perf_counter()
    reports: dict[str, EvalReport] = {}
    for split in cfg.eval.splits:
        path = output_dir / f"predictions_{split}.jsonl" if cfg.eval.predictions else None
        reports[split] = evaluate_examples(split, model, vectorizer, splits[split], cfg.eval.max_examples, path, cfg.seed)
        if path is not None:
            artifacts[f"predictions_{split}"] = str(path)
    eval_seconds = time.perf_counter() - t0

    metrics: dict[str, float] = {
        "baseline_c": chosen_c,
        "train_examples": float(len(train)),
        "vocabulary_size": float(len(vectorizer.vocabulary_)),
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
    }
    for split, report in reports.items():
        metrics.update(report.metrics(f"{split}_"))
        metrics[f"{split}_degenerate"] = float(report.degenerate)
    metrics["wall_seconds"] = time.perf_counter() - wall_start
    return TrialResult(status="finished", metrics=metrics, reports=reports, artifacts=artifacts)
