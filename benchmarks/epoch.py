"""One epoch of the Rotten Tomatoes train split: our packed rows against the PyTorch peer's padded batches.

    python -m benchmarks.epoch [--quick] [--hf-batch-size 32]

Ours: the `tiny` preset, examples packed into rows of data.seq_len by trainer.packing.pack, batches of
train.batch_size rows from trainer.packing.batches, our jitted train_step driven by train_loop.
Theirs, as its users write it: transformers.LlamaForCausalLM of the same shape + torch.optim.AdamW
(float32, eager), shuffled batches of --hf-batch-size examples padded to the longest example of
the batch, attention_mask, labels -100 on padding. Both use our tokenizer's ids, compute the loss
on every real token, and clip the gradient norm. Compilation (ours) and a first step (theirs)
happen on throwaway copies before the timed epoch. A third row times our epoch as a trial runs
it, with the preset's data.loss_on=answer.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from benchmarks.common import (
    cpu_count, data_config, load_data_and_tokenizer, model_preset, optim_preset, print_header, print_table,
    seconds, train_preset,
)


@dataclass
class PaddedBatches:
    """The peer's epoch: (input_ids, attention_mask, labels) per batch, int64 like a DataLoader's."""

    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    real_tokens: int
    slots: int  # batch rows x padded width, summed over batches
    num_truncated: int

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / max(self.slots, 1)


def padded_batches(tokenized, batch_size: int, max_length: int, eos_id: int, pad_id: int, seed: int) -> PaddedBatches:
    """BOS + prompt + answer + EOS per example, right-truncated at max_length, shuffled, padded per batch."""
    sequences = [np.concatenate([p, a, [eos_id]]) for p, a in zip(tokenized.prompts, tokenized.answers)]
    num_truncated = sum(len(s) > max_length for s in sequences)
    sequences = [s[:max_length] for s in sequences]
    order = np.random.default_rng(seed).permutation(len(sequences))
    batches, real, slots = [], 0, 0
    for start in range(0, len(order), batch_size):
        chunk = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(s) for s in chunk)
        input_ids = np.full((len(chunk), width), pad_id, np.int64)
        attention_mask = np.zeros((len(chunk), width), np.int64)
        for row, sequence in enumerate(chunk):
            input_ids[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
        labels = np.where(attention_mask == 1, input_ids, -100)
        batches.append((input_ids, attention_mask, labels))
        real += int(attention_mask.sum())
        slots += attention_mask.size
    return PaddedBatches(batches, real, slots, num_truncated)


def run_ours(model_cfg, optim_cfg, rows, batch_size: int, lr: float) -> dict:
    import jax
    import jax.numpy as jnp

    from trainer import packing
    from trainer.model import LlamaShape, init_model
    from trainer.optim import Hyperparams, Optimizer
    from trainer.train import as_device_batch, create_state, make_train_step, max_loss_positions, train_loop

    steps = packing.steps_per_epoch(rows, batch_size)
    optimizer = Optimizer.from_config(optim_cfg)
    hparams = Hyperparams.create(lr=lr, warmup=0, total_steps=steps, cfg=optim_cfg)
    graphdef, state = create_state(init_model(LlamaShape.from_config(model_cfg), seed=0), optimizer, hparams)
    step_fn = make_train_step(graphdef, optimizer, 1, max_loss_positions(rows.loss_mask, rows.inputs.shape[1]))
    batches = packing.batches(rows, batch_size, seed=0)
    first = as_device_batch(next(packing.batches(rows, batch_size, seed=0)))
    # Compile on a throwaway copy (the step donates its input state).
    compile_seconds = seconds(lambda: jax.block_until_ready(step_fn(jax.tree.map(jnp.copy, state), first)))
    outcome = train_loop(step_fn, state, batches, steps, put_batch=as_device_batch)
    return {
        "steps": steps,
        "compile": compile_seconds,
        # train_loop times its first step apart (as compilation); here it is one compiled step.
        "epoch": outcome.compile_seconds + outcome.train_seconds,
        "loss": outcome.history[-1].loss,
    }


def run_theirs(model_cfg, optim_cfg, padded: PaddedBatches, lr: float) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
            intermediate_size=model_cfg.intermediate_size, num_hidden_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_kv_heads,
            head_dim=model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_heads,
            rms_norm_eps=model_cfg.rms_norm_eps, rope_theta=model_cfg.rope_theta,
            max_position_embeddings=model_cfg.max_position_embeddings, tie_word_embeddings=False,
            initializer_range=model_cfg.init_std,
        )
        model = LlamaForCausalLM(config).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
        )
        return model, optimizer

    def train(model, optimizer, batches) -> float:
        for input_ids, attention_mask, labels in batches:
            loss = model(
                input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                labels=torch.from_numpy(labels),
            ).loss
            loss.backward()
            if optim_cfg.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_step = seconds(lambda: train(*build(), padded.batches[:1]))  # threads, allocator: untimed
    model, optimizer = build()
    losses = []
    epoch = seconds(lambda: losses.append(train(model, optimizer, padded.batches)))
    return {"steps": len(padded.batches), "compile": first_step, "epoch": epoch, "loss": losses[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first 64 examples, batches of 8: a smoke run")
    parser.add_argument("--batch-size", type=int, help="our packed rows per step (default train.batch_size)")
    parser.add_argument("--hf-batch-size", type=int, help="the peer's examples per step (default: the same number)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: the usable cores)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    from trainer import packing

    model_cfg, optim_cfg = model_preset("tiny"), optim_preset()
    seq_len = data_config().seq_len
    batch_size = args.batch_size or (8 if args.quick else train_preset("cpu").batch_size)
    hf_batch_size = args.hf_batch_size or batch_size
    splits, tokenizer = load_data_and_tokenizer(model_cfg)
    examples = splits["train"][:64] if args.quick else splits["train"]
    tokenized = packing.tokenize_examples(examples, tokenizer, data_config().cache_dir)
    rows = packing.pack(tokenized, seq_len, "all", tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=0)
    padded = padded_batches(tokenized, hf_batch_size, seq_len, tokenizer.eos_id, tokenizer.pad_id, seed=0)

    import torch
    import transformers

    torch.set_num_threads(args.torch_threads or cpu_count())
    print_header(
        f"one epoch of Rotten Tomatoes train ({len(examples):,} examples), tiny preset: packed (ours) "
        f"against padded (PyTorch peer)",
        [
            f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} torch threads; "
            f"tokenizer: {tokenizer.vocab_size}-piece BPE (ours, on both sides)",
        ],
    )
    ours = run_ours(model_cfg, optim_cfg, rows, batch_size, args.lr)
    theirs = run_theirs(model_cfg, optim_cfg, padded, args.lr)
    answer_rows = packing.pack(tokenized, seq_len, "answer", tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=0)
    ours_answer = run_ours(model_cfg, optim_cfg, answer_rows, batch_size, args.lr)

    def our_row(label, packed, result):
        return [
            label, f"packed rows of {seq_len}, {batch_size} rows/step", result["steps"],
            packed.num_examples / result["steps"], packed.num_rows * seq_len, packed.num_tokens,
            f"{100 * packed.padding_fraction:.1f}%", packed.num_truncated, result["compile"], result["epoch"],
            packed.num_tokens / result["epoch"], result["loss"],
        ]

    theirs_row = [
        "torch (transformers)", f"{hf_batch_size} examples/step padded to the longest", theirs["steps"],
        len(examples) / theirs["steps"], padded.slots, padded.real_tokens,
        f"{100 * padded.padding_fraction:.1f}%", padded.num_truncated, theirs["compile"], theirs["epoch"],
        padded.real_tokens / theirs["epoch"], theirs["loss"],
    ]
    print_table(
        [our_row("ours (jax)", rows, ours), theirs_row,
         our_row("ours, data.loss_on=answer", answer_rows, ours_answer)],
        ["side", "layout", "steps", "examples/step", "token slots", "real tokens", "padding", "truncated",
         "compile / first step s", "epoch s", "real tokens/s", "final loss"],
        title="the first two compute the loss on every real token; the last row is what a trial runs with "
              "conf/data/rotten_tomatoes.yaml (loss on the answer and EOS: the output head runs on few positions)",
    )
    print(f"epoch wall time ratio theirs/ours: {theirs['epoch'] / ours['epoch']:.2f}x "
          f"(ours {ours['epoch']:.1f}s, theirs {theirs['epoch']:.1f}s; compilation excluded)")


if __name__ == "__main__":
    main()
