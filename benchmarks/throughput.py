"""Train-step throughput against the PyTorch peer, in one run on one machine.

    python -m benchmarks.throughput [--quick] [--steps 10] [--repeats 5] [--setups easylm_debug tiny]

Our jitted `train_step` and a `transformers.LlamaForCausalLM` + `torch.optim.AdamW` loop (float32,
eager, no torch.compile), each in a worker process of its own (benchmarks/throughput_worker.py),
take turns, ours then theirs, for several repeats of N steps after a warmup, on the same random
token batches (generated from one seed in each worker). Both compute the loss on every token
(full logits) and clip the gradient norm at optim.clip_grad_norm, as our step does. Reports the
median tokens/s of each, their ratio (and that of the best repeats, less hurt by a busy machine),
and model FLOP utilisation against the float32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from benchmarks.common import (
    cpu_count, data_config, matmul_peak, median, model_preset, print_header, print_table, spread, train_preset,
)
from trainer.config import OptimConfig
from trainer.model import LlamaShape


@dataclass(frozen=True)
class Setup:
    name: str
    shape: LlamaShape
    seq_len: int
    batch_size: int
    source: str  # where the sizes come from


def easylm_debug_shape(vocab_size: int = 1024) -> LlamaShape:
    """EasyLM's `debug` LLaMA: hidden 128, ffn 256, 2 layers, 4 heads without GQA."""
    return LlamaShape(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=4, head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0,
    )


def make_setups(quick: bool) -> dict[str, Setup]:
    tiny = LlamaShape.from_config(model_preset("tiny"))
    if quick:  # the same structures on a sliver of the work
        return {
            "easylm_debug": Setup("easylm_debug", easylm_debug_shape(), 32, 2, "EasyLM debug, quick sizes"),
            "tiny": Setup("tiny", tiny, 32, 2, "conf/model/tiny.yaml, quick sizes"),
        }
    return {
        "easylm_debug": Setup("easylm_debug", easylm_debug_shape(), 256, 8, "EasyLM debug LLaMA, vocab 1024"),
        "tiny": Setup(
            "tiny", tiny, data_config().seq_len, train_preset("cpu").batch_size,
            "conf/model/tiny.yaml, data.seq_len, conf/train/cpu.yaml batch_size",
        ),
    }


def matmul_params(shape: LlamaShape) -> int:
    """Weights that take part in a matmul: all but the input embedding (a gather) and norm scales."""
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    return shape.num_params() - shape.vocab_size * shape.hidden_size - norms


def flops_per_token(shape: LlamaShape, seq_len: int) -> float:
    """6 * matmul params (forward + backward) + 12 * L * T * D attention (scores and values, no causal saving)."""
    attention_width = shape.num_heads * shape.head_dim
    return 6.0 * matmul_params(shape) + 12.0 * shape.num_layers * seq_len * attention_width


def token_batches(setup: Setup, count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) pairs of uniform random tokens, shared by both sides."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, setup.shape.vocab_size, (count, setup.batch_size, setup.seq_len + 1), dtype=np.int32)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


class Ours:
    """Our train_step from trainer.train, with every token carrying a loss."""

    label = "ours (jax)"

    def __init__(self, setup: Setup, batches, optim_cfg: OptimConfig, lr: float):
        import jax

        from trainer.model import init_model
        from trainer.optim import Hyperparams, Optimizer
        from trainer.train import create_state, make_train_step

        optimizer = Optimizer.from_config(optim_cfg)
        hparams = Hyperparams.create(lr=lr, warmup=0, total_steps=1_000_000, cfg=optim_cfg)
        graphdef, self.state = create_state(init_model(setup.shape, seed=0), optimizer, hparams)
        self.step_fn = make_train_step(graphdef, optimizer, 1, None)
        shape_BxT = (setup.batch_size, setup.seq_len)
        positions = np.broadcast_to(np.arange(setup.seq_len, dtype=np.int32), shape_BxT)
        self.batches = [
            jax.device_put({
                "inputs": inputs, "targets": targets, "segment_ids": np.ones(shape_BxT, np.int32),
                "positions": positions, "loss_mask": np.ones(shape_BxT, np.float32),
            })
            for inputs, targets in batches
        ]
        self.done = 0

    def run(self, steps: int) -> float:
        """`steps` updates; returns the last loss (after waiting for every update)."""
        import jax

        for _ in range(steps):
            self.state, metrics = self.step_fn(self.state, self.batches[self.done % len(self.batches)])
            self.done += 1
        jax.block_until_ready(self.state)
        return float(metrics["loss"])

    def xla_flops_per_step(self) -> float:
        """FLOPs of the whole step as XLA counts them (matmuls, elementwise ops, the optimizer)."""
        cost = self.step_fn.lower(self.state, self.batches[0]).cost_analysis()
        return float(cost.get("flops", math.nan)) if cost else math.nan


class Theirs:
    """The PyTorch peer: LlamaForCausalLM + AdamW + gradient clipping, float32, eager."""

    label = "torch (transformers)"

    def __init__(self, setup: Setup, batches, optim_cfg: OptimConfig, lr: float):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        s = setup.shape
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
            head_dim=s.head_dim, rms_norm_eps=s.rms_norm_eps, rope_theta=s.rope_theta,
            max_position_embeddings=setup.seq_len, tie_word_embeddings=False, initializer_range=s.init_std,
        )
        self.model = LlamaForCausalLM(config).train()
        self.attention = self.model.config._attn_implementation
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
        )
        self.clip = optim_cfg.clip_grad_norm
        self.batches = [(torch.from_numpy(i).long(), torch.from_numpy(t).long()) for i, t in batches]
        self.vocab_size = s.vocab_size
        self.done = 0

    def run(self, steps: int) -> float:
        import torch
        import torch.nn.functional as F

        for _ in range(steps):
            inputs, targets = self.batches[self.done % len(self.batches)]
            logits = self.model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.reshape(-1, self.vocab_size).float(), targets.reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.done += 1
        return float(loss.detach())


class Worker:
    """One side in its own process (benchmarks/throughput_worker.py), asked to run N steps at a time."""

    def __init__(self, side: str, label: str, setup: Setup, args) -> None:
        import subprocess
        import sys
        import tempfile

        self.label = label
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "benchmarks.throughput_worker", side, setup.name,
                   f"--lr={args.lr}", f"--warmup={args.warmup}"]
        command += ["--quick"] if args.quick else []
        command += [f"--torch-threads={args.torch_threads}"] if args.torch_threads else []
        command += ["--tune-malloc"] if side == "theirs" and args.torch_tuned_malloc else []
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ready = self._reply()  # first step, warmup, what the side reports of itself

    def _reply(self) -> dict:
        import json

        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            raise RuntimeError(f"the {self.label} worker exited {self.process.returncode}:\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def run(self, steps: int) -> float:
        """Seconds of `steps` updates, as the worker timed them."""
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        return self._reply()["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        self.log.close()


def benchmark(setup: Setup, args, peak: float) -> None:
    ours = Worker("ours", Ours.label, setup, args)
    theirs = Worker("theirs", Theirs.label, setup, args)
    try:
        if theirs.ready["num_params"] != setup.shape.num_params():
            raise AssertionError(f"torch model has {theirs.ready['num_params']} params, ours {setup.shape.num_params()}")
        times: dict[str, list[float]] = {ours.label: [], theirs.label: []}
        for _ in range(args.repeats):  # alternated, so drifting load on a shared machine hits both alike
            for side in (ours, theirs):
                times[side.label].append(side.run(args.steps))
    finally:
        ours.close()
        theirs.close()

    tokens_per_step = setup.batch_size * setup.seq_len
    per_token = flops_per_token(setup.shape, setup.seq_len)
    xla_flops = ours.ready["xla_flops"]
    rows, medians, bests = [], {}, {}
    for side in (ours, theirs):
        rates = [args.steps * tokens_per_step / t for t in times[side.label]]
        medians[side.label], bests[side.label] = median(rates), max(rates)
        achieved = per_token * medians[side.label]
        rows.append([
            side.label, medians[side.label], spread(rates), 1e3 * tokens_per_step / medians[side.label],
            achieved / 1e9, f"{100 * achieved / peak:.1f}%", side.ready["first"], side.ready["loss"],
        ])
    s = setup.shape
    def malloc(worker: Worker) -> str:
        return "one arena, 256 MiB top pad (trainer/hostmem.py)" if worker.ready["malloc_tuned"] else "glibc defaults"

    print_table(
        rows,
        ["side", "tokens/s (median)", "tokens/s (min-max)", "ms/step", "model GFLOP/s", "MFU",
         "first step s", "loss after warmup"],
        title=(
            f"-- {setup.name}: {setup.source}\n"
            f"   hidden {s.hidden_size}, ffn {s.intermediate_size}, {s.num_layers} layers, {s.num_heads} heads "
            f"({s.num_kv_heads} kv), vocab {s.vocab_size}, seq {setup.seq_len}, batch {setup.batch_size}, "
            f"{s.num_params():,} params ({matmul_params(s):,} in matmuls), float32, AdamW\n"
            f"   {args.repeats} repeats x {args.steps} steps after {args.warmup} warmup steps, each side in its own "
            f"process; torch: {theirs.ready['threads']} threads, attention {theirs.ready['attention']}, malloc "
            f"{malloc(theirs)}; ours: malloc {malloc(ours)}\n"
            f"   FLOPs/token = 6*{matmul_params(s):,} + 12*{s.num_layers}*{setup.seq_len}*"
            f"{s.num_heads * s.head_dim} = {per_token / 1e6:.3f} MFLOP "
            f"({per_token * tokens_per_step / 1e9:.2f} GFLOP/step; XLA counts {xla_flops / 1e9:.2f} GFLOP "
            f"in our whole step)"
        ),
    )
    print(f"ratio ours/theirs (median tokens/s): {medians[ours.label] / medians[theirs.label]:.2f}x "
          f"(of the best repeats: {bests[ours.label] / bests[theirs.label]:.2f}x)\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    parser.add_argument("--setups", nargs="+", default=["easylm_debug", "tiny"], choices=["easylm_debug", "tiny"])
    parser.add_argument("--steps", type=int, help="steps per timed repeat (default 10; quick 2)")
    parser.add_argument("--repeats", type=int, help="timed repeats per side (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first (default 3; quick 1)")
    parser.add_argument("--matmul-size", type=int, help="side of the peak matmul (default 4096; quick 256)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: the usable cores)")
    parser.add_argument("--torch-tuned-malloc", action="store_true",
                        help="give the PyTorch process our malloc settings too (trainer/hostmem.py)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    defaults = dict(steps=2, repeats=2, warmup=1, matmul_size=256) if args.quick else dict(
        steps=10, repeats=5, warmup=3, matmul_size=4096
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import torch
    import transformers

    torch.set_num_threads(args.torch_threads or cpu_count())
    peaks = matmul_peak(args.matmul_size, repeats=3)
    peak = max(peaks.values())
    print_header(
        "train-step throughput: ours (jax) against the PyTorch peer",
        [
            f"torch {torch.__version__}, transformers {transformers.__version__}: "
            f"{torch.get_num_threads()} intra-op threads, {torch.get_num_interop_threads()} inter-op threads "
            f"(XLA sizes its own pool); the matmul peak is measured in this process, the steps in one per side",
            f"float32 matmul peak ({args.matmul_size}x{args.matmul_size}, best of 3): "
            f"jax {peaks['jax'] / 1e9:.1f} GFLOP/s, torch {peaks['torch'] / 1e9:.1f} GFLOP/s; "
            f"MFU uses the larger, {peak / 1e9:.1f} GFLOP/s",
        ],
    )
    setups = make_setups(args.quick)
    for name in args.setups:
        benchmark(setups[name], args, peak)


if __name__ == "__main__":
    main()
