"""Train-step throughput against the PyTorch peer, in one run on one machine.

    python -m benchmarks.throughput [--quick] [--setups easylm_debug tiny smollm2_full smollm2_lora]
                                    [--dtype float32|bfloat16] [--min-seconds 10] [--repeats 5]

Our jitted `train_step` and a `transformers.LlamaForCausalLM` + `torch.optim.AdamW` loop (eager, no
torch.compile), each in a worker process of its own (benchmarks/throughput_worker.py), take turns
for several repeats of a timed window of at least --min-seconds after a warmup, on the same token
batches (generated from one seed in each worker), with the same optimizer settings and gradient
clipping. Ours runs with the malloc settings its entry points apply (trainer/hostmem.py), the
peer with glibc's; a third worker, ours with the peer's malloc, gives the ratio at equal
allocator settings beside the one users get. `easylm_debug` and `tiny` compute the loss on every
token (full logits); the SmolLM2-135M setups train as conf/model/smollm2_135m.yaml does (packed
rows, loss on the answer tokens only), all weights (`smollm2_full`) or LoRA adapters beside
frozen weights (`smollm2_lora`; the peer uses the `peft` library). `--dtype bfloat16`: ours with
model.dtype=bfloat16 (float32 weights and optimizer state), the peer under torch.autocast.
Reports the median tokens/s of each, their ratios (and those of the best repeats, less hurt by a
busy machine), and model FLOP utilisation against the best matmul rate numpy, torch and jax
reach on this machine (benchmarks/peak.py), measured in the same run. On a GPU (`--device gpu`, the
default where JAX's default backend is one) both sides train there, started side by side to save
time, with TensorFloat-32 float32 products on both (jax's default precision there; torch's
`set_float32_matmul_precision("high")`); the malloc settings do not apply, so the third worker is
left out.

The setups and their FLOP accounting are in benchmarks/setups.py, the two sides in benchmarks/sides.py.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import cpu_count, default_device, median, number, print_header, print_table, spread
from benchmarks.peak import GPU_SIZES, PEAK_HEADERS, best_peak, measure_peaks, peak_rows, worker_env
from benchmarks.setups import (
    BATCH_COUNT, EXAMPLE_TOKENS_MEAN, EXAMPLE_TOKENS_RANGE, SETUP_NAMES, Setup, adapter_params, flops_formula,
    flops_per_token, make_setups, matmul_params, timing, token_batches,
)
from benchmarks.sides import Ours, Theirs


class Worker:
    """One side in its own process (benchmarks/throughput_worker.py), asked to run N steps at a time.

    It starts building at once; `wait_ready` reads what it reports once its warmup is done.
    """

    def __init__(self, side: str, label: str, setup: Setup, args, malloc: str) -> None:
        import subprocess
        import sys
        import tempfile

        self.label = label
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "benchmarks.throughput_worker", side, setup.name, f"--malloc={malloc}",
                   f"--dtype={args.dtype}", f"--lr={args.lr}", f"--warmup={timing(setup, args)['warmup']}",
                   f"--rewarm={args.rewarm}", f"--device={args.device}"]
        command += ["--quick"] if args.quick else []
        command += [f"--layers={args.layers}"] if args.layers is not None else []
        command += [f"--torch-threads={args.torch_threads}"] if args.torch_threads else []
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, env=worker_env(args.device))
        self.ready: dict = {}

    def wait_ready(self) -> None:
        """First step, warmup, seconds per step, and what the side reports of itself."""
        self.ready = self._reply()

    def _reply(self) -> dict:
        import json

        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            raise RuntimeError(f"the {self.label} worker exited {self.process.returncode}:\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def run(self, request: str) -> dict:
        """One timed window, "N" steps or "T seconds" at least: {steps, seconds}, as the worker timed them."""
        self.process.stdin.write(f"{request}\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (OSError, ValueError):  # it died meanwhile: the error that brought us here says why
                self.process.kill()
        self.log.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
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
            f"trainer.packing.pack from {setup.examples:,} synthetic examples ({EXAMPLE_TOKENS_RANGE[0]}-"
            f"{EXAMPLE_TOKENS_RANGE[1]} tokens, mean ~{EXAMPLE_TOKENS_MEAN:g}, like the preset's tokenized train "
            f"split); ours: output head on the first {ours.ready['loss_positions']} loss positions of each row "
            f"(max_loss_positions over the epoch), segment masks; torch: lm_head on the loss positions only, "
            f"packed rows from restarting position_ids"
        )
    else:
        lines.append("loss on every token (full logits on both sides)")
    return lines


def malloc_name(worker: Worker) -> str:
    return "one arena, 256 MiB top pad (trainer/hostmem.py)" if worker.ready["malloc_tuned"] else "glibc defaults"


def window_request(setup: Setup, args) -> str:
    """What each timed window asks of a worker: --steps (or the quick default) steps, else --min-seconds."""
    fixed = timing(setup, args)["steps"]
    return str(fixed) if fixed is not None else f"{args.min_seconds:g} seconds"


def ratio_line(what: str, ours: Worker, theirs: Worker, medians: dict, bests: dict) -> str:
    return (f"ratio ours/theirs, {what}: {medians[ours.label] / medians[theirs.label]:.2f}x median tokens/s "
            f"({bests[ours.label] / bests[theirs.label]:.2f}x of the best windows)")


def start_workers(setup: Setup, args) -> list[Worker]:
    """Ours, (ours with the peer's malloc,) theirs. On a CPU each builds and warms up alone, so its
    first-step time and calibration are its own; on a GPU they build side by side (the host's cores
    compile while the device idles), and the timed windows still take turns."""
    theirs_malloc = "tuned" if args.torch_tuned_malloc else "default"
    sides = [("ours", Ours.label, "tuned")]
    if theirs_malloc != "tuned" and not args.no_same_malloc:
        sides.append(("ours", f"{Ours.label}, glibc malloc", theirs_malloc))
    sides.append(("theirs", Theirs.label, theirs_malloc))
    workers: list[Worker] = []
    try:
        for side, label, malloc in sides:
            workers.append(Worker(side, label, setup, args, malloc))
            if args.device == "cpu":
                workers[-1].wait_ready()
        for worker in workers:
            if not worker.ready:
                worker.wait_ready()
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


def benchmark(setup: Setup, args, peak: float) -> None:
    repeats = timing(setup, args)["repeats"]
    workers = start_workers(setup, args)
    try:
        ours, theirs = workers[0], workers[-1]
        if ours.ready["backend"] != ("cpu" if args.device == "cpu" else "gpu"):
            raise RuntimeError(f"ours ran on jax's {ours.ready['backend']!r} backend, not the {args.device}")
        check_same_model(setup, ours, theirs)
        windows: dict[str, list[dict]] = {worker.label: [] for worker in workers}
        for _ in range(repeats):  # alternated, so drifting load on a shared machine hits every side alike
            for worker in workers:
                windows[worker.label].append(worker.run(window_request(setup, args)))
    finally:
        for worker in workers:
            worker.close()

    tokens_per_step = setup.batch_size * setup.seq_len
    batches = token_batches(setup, count=BATCH_COUNT)
    loss_share = float(np.mean([b["loss_mask"].mean() for b in batches]))
    per_token = flops_per_token(setup.shape, setup.seq_len, setup.finetune, loss_share)
    xla_flops = ours.ready["xla_flops"]
    rows, medians, bests = [], {}, {}
    for worker in workers:
        rates = [w["steps"] * tokens_per_step / w["seconds"] for w in windows[worker.label]]
        medians[worker.label], bests[worker.label] = median(rates), max(rates)
        achieved = per_token * medians[worker.label]
        rows.append([
            worker.label, medians[worker.label], spread(rates), 1e3 * tokens_per_step / medians[worker.label],
            f"{number(median([w['seconds'] for w in windows[worker.label]]))} s "
            f"({int(median([w['steps'] for w in windows[worker.label]]))})",
            achieved / 1e9, f"{100 * achieved / peak:.1f}%", worker.ready["first"], worker.ready["loss"],
        ])
    s = setup.shape
    lines = [
        f"-- {setup.name}: {setup.source}",
        f"hidden {s.hidden_size}, ffn {s.intermediate_size}, {s.num_layers} layers, {s.num_heads} heads "
        f"({s.num_kv_heads} kv), vocab {s.vocab_size}{', tied embeddings' if s.tied_embeddings else ''}, "
        f"seq {setup.seq_len}, batch {setup.batch_size}, {s.num_params():,} params ({matmul_params(s):,} in matmuls), "
        + ("float32" if args.dtype == "float32" else
           f"{args.dtype} compute, float32 weights and optimizer state (torch: autocast {args.dtype})"),
        *describe_training(setup, ours, theirs, loss_share),
        f"{repeats} timed windows per side of {window_request(setup, args).replace(' seconds', ' s or more')} "
        f"(steps), each after {args.rewarm} untimed steps, after "
        f"{timing(setup, args)['warmup']} warmup steps, each side in its own process; torch: "
        + (f"{theirs.ready['threads']} threads, attention {theirs.ready['attention']}, malloc {malloc_name(theirs)}; "
           f"ours: malloc {malloc_name(ours)}" if args.device == "cpu" else
           f"{theirs.ready['device']}, attention {theirs.ready['attention']}, float32 matmul precision "
           f"{theirs.ready['float32_matmul_precision']!r}; ours: {ours.ready['device']}, jax's default precision"),
        f"FLOPs/token = {flops_formula(setup, loss_share)} = {per_token / 1e6:.3f} MFLOP "
        f"({per_token * tokens_per_step / 1e9:.2f} GFLOP/step; "
        + (f"XLA counts {xla_flops / 1e9:.2f} GFLOP in our whole step)" if xla_flops == xla_flops
           else "XLA gives no FLOP count of our step on this backend)"),
    ]
    print_table(
        rows,
        ["side", "tokens/s (median)", "tokens/s (min-max)", "ms/step", "window s (steps)", "model GFLOP/s", "MFU",
         "first step s", "loss after warmup"],
        title="\n   ".join(lines),
    )
    if max(medians.values()) * per_token > peak:
        print("note: MFU above 100%: the machine was busier while the peaks were timed than during these steps; "
              "run again on an idle machine")
    if args.device != "cpu":
        what = f"both on the {ours.ready['device']}"
    elif ours.ready["malloc_tuned"] == theirs.ready["malloc_tuned"]:
        what = f"the same allocator on both ({malloc_name(ours)})"
    else:
        what = f"each as its users run it (ours: {malloc_name(ours)}; torch: {malloc_name(theirs)})"
    print(ratio_line(what, ours, theirs, medians, bests))
    if len(workers) == 3:
        print(ratio_line(f"the same allocator on both ({malloc_name(theirs)})", workers[1], theirs, medians, bests))
        print(f"our tuned malloc is worth {medians[ours.label] / medians[workers[1].label]:.2f}x to ours here")
    print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds a setup")
    parser.add_argument("--setups", nargs="+", default=list(SETUP_NAMES), choices=SETUP_NAMES)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype: bfloat16 is ours with model.dtype=bfloat16 against torch.autocast")
    parser.add_argument("--min-seconds", type=float,
                        help="each timed window runs steps until this long has passed (default 10; quick 0.05)")
    parser.add_argument("--steps", type=int, help="a fixed number of steps per timed window instead of --min-seconds")
    parser.add_argument("--repeats", type=int, help="timed windows per side (default 5, smollm2 3; quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first (default 3, smollm2 1; quick 1)")
    parser.add_argument("--rewarm", type=int, default=1,
                        help="untimed steps before each timed window, after the other sides ran (default 1)")
    parser.add_argument("--layers", type=int,
                        help="build every setup with this many layers (a faster smoke test; not the real shapes)")
    parser.add_argument("--peak-sizes", type=int, nargs="+",
                        help="sides of the peak matmuls (default 1024 2048 4096; quick 256)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: the usable cores)")
    parser.add_argument("--torch-tuned-malloc", action="store_true",
                        help="give the PyTorch process our malloc settings too (trainer/hostmem.py)")
    parser.add_argument("--no-same-malloc", action="store_true",
                        help="leave out the third worker (ours with the peer's malloc settings)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", choices=["cpu", "gpu"],
                        help="where both sides train (default: gpu where JAX's default backend is one, else cpu)")
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    if args.device != "cpu":
        args.no_same_malloc = True  # the host's malloc settings are not what a GPU step waits on
    quick_peak = args.quick or args.layers is not None
    if args.min_seconds is None:
        args.min_seconds = 0.05 if args.quick else 10.0
    args.peak_sizes = args.peak_sizes or ([256] if args.quick else list(GPU_SIZES) if args.device == "gpu"
                                          else [1024, 2048, 4096])
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
    threads = args.torch_threads or cpu_count()
    where = (f"{threads} intra-op threads (XLA sizes its own pool)" if args.device == "cpu"
             else "both sides on the GPU")
    print_header(
        f"train-step throughput: ours (jax) against the PyTorch peer, on the {args.device}",
        [f"torch {torch.__version__}, transformers {transformers.__version__}, {peft_line}: {where}; the matmul "
         "peaks and each side's steps run in processes of their own"],
    )
    dtypes = ["float32"] + ([args.dtype] if args.dtype != "float32" else [])
    repeats, min_seconds = (2, 0.05) if quick_peak else (5, 0.5)
    measured = measure_peaks(args.peak_sizes, dtypes, repeats=repeats, min_seconds=min_seconds, threads=threads,
                             device=args.device)
    print_table(peak_rows(measured), PEAK_HEADERS,
                title=f"matmul peaks (benchmarks/peak.py): best of {repeats} runs of at least {min_seconds:g} s")
    peak, where = best_peak(measured, args.dtype)
    print(f"MFU divides by the best {args.dtype} matmul rate above: {peak:.1f} GFLOP/s ({where})\n")
    setups = make_setups(args.quick, args.layers)
    for name in args.setups:
        benchmark(setups[name], args, peak * 1e9)


if __name__ == "__main__":
    main()
