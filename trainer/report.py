"""Plain-text progress and summary of a trial for the terminal."""

from __future__ import annotations

from collections.abc import Callable

from trainer.train import StepRecord


def print_step(every: int) -> Callable[[StepRecord], None]:
    def callback(record: StepRecord) -> None:
        if record.step == 1 or record.step % max(every, 1) == 0:
            print(
                f"step {record.step:5d}  loss {record.loss:.4f}  lr {record.learning_rate:.3g}  "
                f"grad_norm {record.grad_norm:.3f}  {record.tokens_per_second:,.0f} tokens/s  "
                f"tokens {record.tokens_seen:,.0f}",
                flush=True,
            )

    return callback


def format_summary(result) -> str:
    m = result.metrics
    lines = [f"status: {result.status}" + (f" ({result.message})" if result.message else "")]
    for split in ("test", "validation"):
        before = m.get(f"before_{split}_accuracy")
        after = m.get(f"{split}_accuracy")
        if after is None and before is None:
            continue
        text = f"{split} accuracy: " + (f"{after:.2%}" if after is not None else "n/a")
        if before is not None:
            text += f"  (before training {before:.2%})"
        if m.get(f"{split}_degenerate"):
            text += f"  DEGENERATE: {m[f'{split}_majority_share']:.0%} of answers are one class"
        if m.get(f"{split}_invalid_rate"):
            text += f"  invalid {m[f'{split}_invalid_rate']:.1%}"
        lines.append(text)
    if "test_f1_macro" in m:
        lines.append(f"test macro F1: {m['test_f1_macro']:.4f}")
    report = result.reports.get("test")
    if report is not None:
        c = report.confusion
        lines.append("test confusion (rows true Negative/Positive; cols predicted Negative/Positive/invalid):")
        lines.extend(f"  {row}" for row in c)
    # Each part only where its metric exists: a baseline trial has no tokens, steps or compile.
    train = [
        text.format(m[key]) for key, text in (
            ("train_examples", "{:.0f} examples"), ("train_tokens", "{:,.0f} tokens"), ("steps", "{:.0f} steps"),
            ("tokens_per_second", "{:,.0f} tokens/s"), ("padding_fraction", "padding {:.1%}"),
            ("vocabulary_size", "{:,.0f} TF-IDF features"), ("baseline_c", "C={:g} (best validation accuracy)"),
        ) if key in m
    ]
    if train:
        lines.append("train: " + ", ".join(train))
    seconds = {name: m[key] for name, key in (
        ("train", "train_seconds"), ("compile", "compile_seconds"), ("data", "data_seconds")) if key in m}
    if "eval_seconds" in m or "eval_before_seconds" in m:
        seconds["eval"] = m.get("eval_seconds", 0) + m.get("eval_before_seconds", 0)
    if "wall_seconds" in m:
        seconds["wall"] = m["wall_seconds"]
    times = [f"{name} {value:.1f}s" for name, value in seconds.items()]
    if times:
        lines.append("time: " + ", ".join(times))
    for name, path in result.artifacts.items():
        lines.append(f"{name}: {path}")
    if getattr(result, "model_dir", None):
        lines.append(f"model: {result.model_dir} (a Hugging Face folder: model.checkpoint=<it> re-evaluates it)")
    return "\n".join(lines)
