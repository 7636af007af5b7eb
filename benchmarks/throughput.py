"""Train-step throughput against the PyTorch peer, in one run on one machine.

    python -m benchmarks.throughput [--quick] [--steps 10] [--repeats 5]
                                    [--setups easylm_debug tiny smollm2_full smollm2_lora]

Our jitted `train_step` and a `transformers.LlamaForCausalLM` + `torch.optim.AdamW` loop (float32,
eager, no torch.compile), each in a worker process of its own (benchmarks/throughput_worker.py),
take turns, ours then theirs, for several repeats of N steps after a warmup, on the same token
batches (generated from one seed in each worker), with the same optimizer settings and gradient
clipping. `easylm_debug` and `tiny` compute the loss on every token (full logits); the SmolLM2-135M
setups train as conf/model/smollm2_135m.yaml does (packed rows, loss on the answer tokens only),
all weights (`smollm2_full`) or LoRA adapters beside frozen weights (`smollm2_lora`; the peer
uses the `peft` library). Reports the median tokens/s of each, their ratio (and that of the best
repeats, less hurt by a busy machine), and model FLOP utilisation against the float32 matmul peak
measured in the same run.

The setups and their FLOP accounting are in benchmarks/setups.py, the two sides in benchmarks/sides.py.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import cpu_count, matmul_peak, median, print_header, print_table, spread
from benchmarks.setups import (
    BATCH_COUNT, EXAMPLE_TOKENS_MEAN, EXAMPLE_TOKENS_RANGE, SETUP_NAMES, Setup, adapter_params, flops_formula,
    flops_per_token, make_setups, matmul_params, timing, token_batches,
)
from benchmarks.sides import Ours, Theirs


class Worker:
    """One side in its own process (benchmarks/throughput_worker.py), asked to run N steps at a time."""

    def __init__(self, side: str, label: str, setup: Setup, args) -> None:
        import subprocess
        import sys
        import tempfile

        self.label = label
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "benchmarks.throughput_worker", side, setup.name,
                   f"--lr={args.lr}", f"--warmup={timing(setup, args)['warmup']}", f"--rewarm={args.rewarm}"]
        command += ["--quick"] if args.quick else []
        command += [f"--layers={args.layers}"] if args.layers is not None else []
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


def check_same_model(setup: Setup, ours: Worker, theirs: Worker) -> None:
    """Both sides build the same model and train the same number of weights, or the comparison is void."""
    expected = setup.shape.num_params()
    if theirs.ready["num_params"] != expected:
        raise AssertionError(f"torch model has {theirs.ready['num_params']:,} params, ours {expected:,}")
    trainable = {side.label: side.ready["trainable_params"] for side in (ours, theirs)}
    if setup.finetune.method == "lora":
        trainable["adapter_params()"] = adapter_params(setup.shape, setup.finetune)
    if len(set(trainable.values())) != 1:
        raise AssertionError(f"trainable parameters differ: {trainable}")


def describe_training(setup: Setup, ours: Worker, theirs: Worker, loss_share: float) -> list[str]:
    """Title lines: what trains, with which optimizer, and where the loss is."""
    o, f = setup.optim, setup.finetune
    trainable = ours.ready["trainable_params"]
    if f.method == "lora":
        method = (f"LoRA rank {f.rank}, alpha {f.alpha:g}, dropout {f.dropout:g} on {','.join(f.targets)}: "
                  f"{trainable:,} adapter params train, the rest is frozen (torch: {theirs.ready['lora']} "
                  f"LoraConfig, AdamW over the adapters only)")
    else:
        method = f"full fine-tuning: all {trainable:,} params train"
    lines = [
        f"{method}; AdamW b1 {o.b1:g}, b2 {o.b2:g}, eps {o.eps:g}, weight decay {o.weight_decay:g}, "
        f"clip {o.clip_grad_norm:g}, on both sides",
    ]
    if setup.loss_on == "answer":
        lines.append(
            f"loss on each example's answer token and EOS, {100 * loss_share:.1f}% of the token slots: rows packed by "
            f"trainer.data.pack from {setup.examples:,} synthetic examples ({EXAMPLE_TOKENS_RANGE[0]}-"
            f"{EXAMPLE_TOKENS_RANGE[1]} tokens, mean ~{EXAMPLE_TOKENS_MEAN:g}, like the preset's tokenized train "
            f"split); ours: output head on the first {ours.ready['loss_positions']} loss positions of each row "
            f"(max_loss_positions over the epoch), segment masks; torch: lm_head on the loss positions only, "
            f"packed rows from restarting position_ids"
        )
    else:
        lines.append("loss on every token (full logits on both sides)")
    return lines


def benchmark(setup: Setup, args, peak: float) -> None:
    steps, repeats = timing(setup, args)["steps"], timing(setup, args)["repeats"]
    ours = Worker("ours", Ours.label, setup, args)
    theirs = Worker("theirs", Theirs.label, setup, args)
    try:
        check_same_model(setup, ours, theirs)
        times: dict[str, list[float]] = {ours.label: [], theirs.label: []}
        for _ in range(repeats):  # alternated, so drifting load on a shared machine hits both alike
            for side in (ours, theirs):
                times[side.label].append(side.run(steps))
    finally:
        ours.close()
        theirs.close()

    tokens_per_step = setup.batch_size * setup.seq_len
    batches = token_batches(setup, count=BATCH_COUNT)
    loss_share = float(np.mean([b["loss_mask"].mean() for b in batches]))
    per_token = flops_per_token(setup.shape, setup.seq_len, setup.finetune, loss_share)
    xla_flops = ours.ready["xla_flops"]
    rows, medians, bests = [], {}, {}
    for side in (ours, theirs):
        rates = [steps * tokens_per_step / t for t in times[side.label]]
        medians[side.label], bests[side.label] = median(rates), max(rates)
        achieved = per_token * medians[side.label]
        rows.append([
            side.label, medians[side.label], spread(rates), 1e3 * tokens_per_step / medians[side.label],
            achieved / 1e9, f"{100 * achieved / peak:.1f}%", side.ready["first"], side.ready["loss"],
        ])
    s = setup.shape
    def malloc(worker: Worker) -> str:
        return "one arena, 256 MiB top pad (trainer/hostmem.py)" if worker.ready["malloc_tuned"] else "glibc defaults"

    lines = [
        f"-- {setup.name}: {setup.source}",
        f"hidden {s.hidden_size}, ffn {s.intermediate_size}, {s.num_layers} layers, {s.num_heads} heads "
        f"({s.num_kv_heads} kv), vocab {s.vocab_size}{', tied embeddings' if s.tied_embeddings else ''}, "
        f"seq {setup.seq_len}, batch {setup.batch_size}, {s.num_params():,} params ({matmul_params(s):,} in matmuls), "
        f"float32",
        *describe_training(setup, ours, theirs, loss_share),
        f"{repeats} repeats x {steps} steps (each after {args.rewarm} untimed) after {timing(setup, args)['warmup']} "
        f"warmup steps, each side in its own "
        f"process; torch: {theirs.ready['threads']} threads, attention {theirs.ready['attention']}, malloc "
        f"{malloc(theirs)}; ours: malloc {malloc(ours)}",
        f"FLOPs/token = {flops_formula(setup, loss_share)} = {per_token / 1e6:.3f} MFLOP "
        f"({per_token * tokens_per_step / 1e9:.2f} GFLOP/step; XLA counts {xla_flops / 1e9:.2f} GFLOP "
        f"in our whole step)",
    ]
    print_table(
        rows,
        ["side", "tokens/s (median)", "tokens/s (min-max)", "ms/step", "model GFLOP/s", "MFU",
         "first step s", "loss after warmup"],
        title="\n   ".join(lines),
    )
    print(f"ratio ours/theirs (median tokens/s): {medians[ours.label] / medians[theirs.label]:.2f}x "
          f"(of the best repeats: {bests[ours.label] / bests[theirs.label]:.2f}x)\n")



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds a setup")
    parser.add_argument("--setups", nargs="+", default=list(SETUP_NAMES), choices=SETUP_NAMES)
    parser.add_argument("--steps", type=int, help="steps per timed repeat (default 10, smollm2 2; quick 2)")
    parser.add_argument("--repeats", type=int, help="timed repeats per side (default 5, smollm2 3; quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first (default 3, smollm2 1; quick 1)")
    parser.add_argument("--rewarm", type=int, default=1,
                        help="untimed steps before each timed repeat, after the other side ran (default 1)")
    parser.add_argument("--layers", type=int,
                        help="build every setup with this many layers (a faster smoke test; not the real shapes)")
    parser.add_argument("--matmul-size", type=int, help="side of the peak matmul (default 4096; quick 256)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: the usable cores)")
    parser.add_argument("--torch-tuned-malloc", action="store_true",
                        help="give the PyTorch process our malloc settings too (trainer/hostmem.py)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.matmul_size is None:
        args.matmul_size = 256 if args.quick else 4096
    for key in ("steps", "repeats", "layers"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key}={getattr(args, key)} must be at least 1")
    if args.warmup is not None and args.warmup < 1:
        parser.error(f"--warmup={args.warmup}: the workers report the loss after warmup; use at least 1")

    try:
        import peft
    except ImportError:
        peft = None
        if any(make_setups(args.quick)[name].finetune.method == "lora" for name in args.setups):
            parser.error("the PyTorch side of a LoRA setup (smollm2_lora) uses peft, which is not installed: "
                         "pip install -e '.[bench]', or leave the setup out, e.g. --setups easylm_debug tiny smollm2_full")
    import torch
    import transformers

    peft_line = f"peft {peft.__version__} for the PyTorch side's LoRA" if peft else "peft not installed"
    torch.set_num_threads(args.torch_threads or cpu_count())
    peaks = matmul_peak(args.matmul_size, repeats=3)
    peak = max(peaks.values())
    print_header(
        "train-step throughput: ours (jax) against the PyTorch peer",
        [
            f"torch {torch.__version__}, transformers {transformers.__version__}, {peft_line}: "
            f"{torch.get_num_threads()} intra-op threads, {torch.get_num_interop_threads()} inter-op threads "
            f"(XLA sizes its own pool); the matmul peak is measured in this process, the steps in one per side",
            f"float32 matmul peak ({args.matmul_size}x{args.matmul_size}, best of 3): "
            f"jax {peaks['jax'] / 1e9:.1f} GFLOP/s, torch {peaks['torch'] / 1e9:.1f} GFLOP/s; "
            f"MFU uses the larger, {peak / 1e9:.1f} GFLOP/s",
        ],
    )
    setups = make_setups(args.quick, args.layers)
    for name in args.setups:
        benchmark(setups[name], args, peak)


if __name__ == "__main__":
    main()
