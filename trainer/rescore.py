"""Evaluate a saved model without training: `python -m trainer.evaluate model.checkpoint=<folder> ...`.

    python -m trainer.evaluate model.checkpoint=outputs/2026-11-30/12-00-00/model
    python -m trainer.evaluate model.checkpoint=<folder> eval.mode=generate eval.temperature=0.7 eval.splits=[test]
    python -m trainer.evaluate -m model.checkpoint=<folder> eval.mode=generate eval.temperature=0,0.7
    python -m trainer.evaluate model.checkpoint=<folder> \
        curated_labels=../shared/data/rotten_tomatoes/curated_labels_sample.csv

Any checkpoint loads (a folder a trial saved, a Hugging Face folder, a GGUF file), with the
trial's own keys (eval.*, data.*, seed). `curated_labels` is a CSV of reviews (`text`) with
label columns (`label_columns`, Positive/Negative, blank: unknown): the reviews are evaluated
once and the same predictions are scored against each column. Reports, predictions JSONL and
metrics.json go to Hydra's run folder (outputs/evaluate/<date>/<time>/); the job returns the
first report's accuracy, so a multirun over eval.temperature compares settings.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from trainer import data as data_lib
from trainer import packing
from trainer.config import ConfigError, TrialConfig, to_trial_config, validate
from trainer.config import register_configs as register_trial_configs
from trainer.evaluate import EvalReport, classification_report, parse_answer

TRIAL_KEYS = tuple(f.name for f in dataclasses.fields(TrialConfig))


@dataclass
class EvaluateConfig(TrialConfig):
    # A CSV of reviews (`text`) and label columns to score against instead of eval.splits.
    curated_labels: Optional[str] = None
    label_columns: List[str] = field(default_factory=lambda: ["original_label", "curated_label"])


def register_configs() -> None:
    """`trial_schema` and `evaluate_schema` (trial fields MISSING, as sweeper/config.py does)."""
    register_trial_configs()
    node = OmegaConf.structured(EvaluateConfig)
    for key in TRIAL_KEYS:
        node[key] = MISSING
    ConfigStore.instance().store(name="evaluate_schema", node=node)


@dataclass
class Rescored:
    reports: dict[str, EvalReport]
    artifacts: dict[str, str]
    notes: list[str]
    seconds: float


def read_curated(
    path: str | Path, label_columns: list[str]
) -> tuple[list[data_lib.Example], dict[str, list[Optional[int]]]]:
    """The CSV's reviews (labelled by the first column, 0 where blank) and each column's labels (None: blank)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"curated_labels={str(path)!r} is not a file; pass a CSV with a text column and label "
                          "columns, e.g. curated_labels=../shared/data/rotten_tomatoes/curated_labels_sample.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else []
    missing = [c for c in ["text", *label_columns] if c not in columns]
    if missing:
        raise ConfigError(f"{path} lacks the column(s) {', '.join(missing)}; its columns: "
                          f"{', '.join(columns) or 'none'}; set label_columns=[...] to some of them")
    names = {name.lower(): label for label, name in enumerate(data_lib.LABEL_NAMES)}
    labels: dict[str, list[Optional[int]]] = {column: [] for column in label_columns}
    for line, row in enumerate(rows, start=2):
        for column in label_columns:
            value = (row[column] or "").strip()
            if value and value.lower() not in names:
                raise data_lib.DataError(f"{path}, line {line}: {column}={value!r} is not Positive, Negative or blank")
            labels[column].append(names[value.lower()] if value else None)
    first = [0 if label is None else label for label in labels[label_columns[0]]]
    examples = [data_lib.Example(row["text"].strip(), label) for row, label in zip(rows, first)]
    return examples, labels


def _predicted(path: Path) -> dict[str, int]:
    """Prompt -> predicted label (INVALID for an unparseable answer), from a predictions JSONL file."""
    with path.open(encoding="utf-8") as handle:
        return {r["prompt"]: parse_answer(r["output"]) for r in map(json.loads, handle) if r}


def rescore(cfg: TrialConfig, curated_labels: Optional[str] = None,
            label_columns: Optional[list[str]] = None) -> Rescored:
    """Evaluate cfg.model.checkpoint on cfg.eval.splits (or on the curated CSV), training nothing."""
    from trainer.trial import Evaluation, TrialData, enable_compilation_cache, get_tokenizer, load_model

    t0 = time.perf_counter()
    validate(cfg)
    if not cfg.model.checkpoint or cfg.model.kind != "llama":
        raise ConfigError(
            f"model.checkpoint={cfg.model.checkpoint!r} (model.kind={cfg.model.kind}): nothing saved to evaluate; pass "
            "the folder a trial saved, e.g. model.checkpoint=outputs/2026-11-30/12-00-00/model"
        )
    label_columns = list(label_columns or ["original_label", "curated_label"])
    if curated_labels:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, predictions=True))
    enable_compilation_cache(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    splits = data_lib.load_splits(cfg.data)
    tokenizer = get_tokenizer(cfg, splits["train"])
    _, graphdef, params = load_model(cfg, tokenizer)
    if curated_labels:
        examples, labels = read_curated(curated_labels, label_columns)
        evaluated = {"curated": examples}
    else:
        evaluated = {split: splits[split] for split in cfg.eval.splits}
    eval_sets = {name: packing.tokenize_examples(e, tokenizer, cfg.data.cache_dir) for name, e in evaluated.items()}
    data = TrialData({**splits, **evaluated}, tokenizer, None, eval_sets, 0.0)
    evaluation = Evaluation(cfg, data, graphdef)
    evaluation(params, "")
    reports, notes = dict(evaluation.reports), _checkpoint_notes(cfg)
    if curated_labels:
        predicted = _predicted(Path(evaluation.artifacts["predictions_curated"]))
        del reports["curated"]  # scored against the first column's labels with blanks as Negative
        for column, values in labels.items():
            pairs = [(label, predicted[data_lib.prompt_text(e.text)]) for e, label in zip(examples, values)
                     if label is not None and data_lib.prompt_text(e.text) in predicted]
            reports[f"curated/{column}"] = classification_report(
                f"curated/{column}", np.array([p[0] for p in pairs], int), np.array([p[1] for p in pairs], int))
            if len(pairs) < len(values):
                notes.append(f"curated/{column}: {len(values) - len(pairs)} of {len(values)} rows left out "
                             "(blank label, or beyond eval.max_examples)")
    return Rescored(reports, evaluation.artifacts, notes, time.perf_counter() - t0)


def _checkpoint_notes(cfg: TrialConfig) -> list[str]:
    """Where this evaluation's settings differ from those the saved trial was evaluated with."""
    from trainer.export import read_metadata

    folder = Path(cfg.model.checkpoint).expanduser()
    saved = read_metadata(folder).get("eval", {}) if folder.is_dir() else {}
    if cfg.eval.mode == "score" and "score_eos" in saved and saved["score_eos"] != cfg.eval.score_eos:
        return [f"the trial evaluated this model with eval.score_eos={str(saved['score_eos']).lower()}; "
                f"pass it to compare with the trial's accuracy"]
    return []


def summary(result: Rescored, cfg: TrialConfig) -> str:
    setting = f"eval.mode={cfg.eval.mode}" + (f" eval.temperature={cfg.eval.temperature:g}"
                                              if cfg.eval.mode == "generate" else "")
    lines = [f"model {cfg.model.checkpoint} ({setting}), {result.seconds:.1f}s"]
    for name, report in result.reports.items():
        line = f"{name} accuracy: {report.accuracy:.2%} of {report.num_examples}"
        if report.invalid_rate:
            line += f"  invalid {report.invalid_rate:.1%}"
        if report.degenerate:
            line += f"  DEGENERATE: {report.majority_share:.0%} of answers are one class"
        lines.append(line)
    lines += [f"note: {note}" for note in result.notes]
    lines += [f"{name}: {path}" for name, path in result.artifacts.items()]
    return "\n".join(lines)


register_configs()
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float:
    from trainer.checkpoint import CheckpointError

    values: dict[str, Any] = OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(TRIAL_KEYS)), resolve=True)
    trial_cfg = to_trial_config(OmegaConf.create(values))
    try:
        result = rescore(trial_cfg, cfg.curated_labels, list(cfg.label_columns))
    except (ConfigError, data_lib.DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary(result, trial_cfg), flush=True)
    metrics = {f"{name.replace('/', '_')}_{key}": value for name, report in result.reports.items()
               for key, value in report.metrics("").items()}
    (Path(trial_cfg.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    first = next(iter(result.reports.values()), None)
    return first.accuracy if first is not None else float("nan")
