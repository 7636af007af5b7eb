"""Evaluation speed: examples/s of eval.mode=score and eval.mode=generate over the test reviews.

    python -m benchmarks.evaluate [--quick] [--repeats 3]

The `tiny` preset at random init (speed does not depend on the weights) goes through
trainer.evaluate.evaluate_split, as a trial calls it, with conf/eval/score.yaml and
conf/eval/generate.yaml. Generation uses a KV cache: one prefill over each batch's prompts, then
one decode step per new token. The first pass compiles one program per padded width; the warm
passes reuse them.
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks.common import (
    data_config, eval_preset, load_data_and_tokenizer, median, model_preset, print_header, print_table, seconds,
    spread,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first 64 test reviews, one warm pass")
    parser.add_argument("--repeats", type=int, help="warm passes per mode (default 3; quick 1)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)

    from flax import nnx

    from trainer import packing
    from trainer.evaluate import evaluate_split
    from trainer.model import LlamaShape, init_model

    model_cfg = model_preset("tiny")
    splits, tokenizer = load_data_and_tokenizer(model_cfg)
    tokenized = packing.tokenize_examples(splits["test"], tokenizer, data_config().cache_dir)
    graphdef, params = nnx.split(init_model(LlamaShape.from_config(model_cfg), seed=0), nnx.Param)
    limit = 64 if args.quick else None
    num_examples = min(limit or len(tokenized), len(tokenized))

    print_header(
        f"evaluation speed over {num_examples:,} test reviews, tiny preset at random init",
        ["cold: the first pass, compiling one program per padded width; warm: later passes"],
    )
    rows = []
    for mode in ("score", "generate"):
        eval_cfg = dataclasses.replace(eval_preset(mode), max_examples=limit)
        reports = []

        def evaluate() -> None:
            reports.append(evaluate_split("test", graphdef, params, tokenized, tokenizer, eval_cfg, seed=0))

        cold = seconds(evaluate)
        warm = [seconds(evaluate) for _ in range(repeats)]
        if mode == "score":
            work = f"{len(tokenized.candidate_answers)} candidates scored per review"
        else:
            work = f"{eval_cfg.max_new_tokens} tokens generated per review, KV-cached (temperature {eval_cfg.temperature})"
        rows.append([
            f"eval.mode={mode}", work, eval_cfg.batch_size, cold, median(warm), spread(warm),
            num_examples / cold, num_examples / median(warm), reports[-1].accuracy,
        ])
    print_table(
        rows,
        ["mode", "work", "batch", "cold s", "warm s (median)", "warm s (min-max)", "examples/s cold",
         "examples/s warm", "accuracy (random init)"],
    )


if __name__ == "__main__":
    main()
