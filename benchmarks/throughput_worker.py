"""One side of benchmarks.throughput in a process of its own, driven line by line over stdin.

    python -m benchmarks.throughput_worker ours|theirs SETUP [--malloc tuned|default] [--dtype float32|bfloat16]
                                           [--quick] [--layers N] [--lr X] [--warmup N] [--rewarm N]
                                           [--torch-threads N] [--device cpu|gpu]

`--malloc tuned` applies the glibc settings that `python -m trainer` and `python -m sweeper` apply
(trainer/hostmem.py) before anything else starts; `default` keeps glibc's (default: tuned for
ours, as its users get it, default for the PyTorch side). `--dtype bfloat16`: ours computes in
bfloat16 with float32 weights (model.dtype=bfloat16), the PyTorch side under torch.autocast. The
worker builds its side on the shared batches, times one first step, runs the warmup, then times
doubling runs of steps until one lasts a second (`step_seconds`), and replies one JSON line. Then
each request runs --rewarm untimed steps and one timed window: "N" is N steps; "T seconds" is
runs of steps (each about a tenth of T, by `step_seconds`) until T seconds have passed, so a
window lasts T however the machine's load moved since the calibration. It replies the window's
steps, seconds (timed in the worker) and last loss; "quit" ends it.
"""

import sys


def _malloc_choice(argv) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--malloc="):
            return arg.split("=", 1)[1]
        if arg == "--malloc" and i + 1 < len(argv):
            return argv[i + 1]
    return "tuned" if argv[1:2] == ["ours"] else "default"


if __name__ == "__main__" and _malloc_choice(sys.argv) == "tuned":
    from trainer.hostmem import tune_malloc

    MALLOC_TUNED = tune_malloc()  # before numpy's or JAX's threads start
else:
    MALLOC_TUNED = False

import argparse
import dataclasses
import json
import os

CALIBRATION_SECONDS = 1.0


def calibrate(side, quick: bool) -> float:
    """Seconds per step, from doubling runs until one lasts CALIBRATION_SECONDS (one step when quick)."""
    from benchmarks.common import seconds

    steps = 1
    while True:
        elapsed = seconds(lambda: side.run(steps))
        if quick or elapsed >= CALIBRATION_SECONDS:
            return elapsed / steps
        steps *= 2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput_worker")
    parser.add_argument("side", choices=["ours", "theirs"])
    parser.add_argument("setup")
    parser.add_argument("--malloc", choices=["tuned", "default"], help="read before the imports (see above)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, help="as benchmarks.throughput --layers")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rewarm", type=int, default=1, help="untimed steps before each timed window")
    parser.add_argument("--torch-threads", type=int)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="the PyTorch side's device; ours runs on jax's default backend (JAX_PLATFORMS)")
    args = parser.parse_args(argv)

    # Replies go to the real stdout; anything the libraries print goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    from benchmarks.common import cpu_count, seconds
    from benchmarks.setups import BATCH_COUNT, make_setups, token_batches
    from benchmarks.sides import Ours, Theirs

    setup = make_setups(args.quick, args.layers)[args.setup]
    setup = dataclasses.replace(setup, shape=dataclasses.replace(setup.shape, dtype=args.dtype))
    batches = token_batches(setup, count=BATCH_COUNT)
    if args.side == "theirs":
        import torch

        if args.device == "cpu":
            torch.set_num_threads(args.torch_threads or cpu_count())
        side = Theirs(setup, batches, setup.optim, args.lr, device=args.device)
        info = {"attention": side.attention, "num_params": side.num_params, "threads": torch.get_num_threads(),
                "lora": side.lora, "device": side.device_name,
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
    else:
        import jax

        from benchmarks.common import accelerator_name

        side = Ours(setup, batches, setup.optim, args.lr)
        backend = jax.default_backend()
        info = {"xla_flops": side.xla_flops_per_step(), "loss_positions": side.loss_positions,
                "backend": "gpu" if backend in ("gpu", "cuda", "rocm") else backend, "device": accelerator_name()}
    info["trainable_params"] = side.trainable_params
    info["malloc_tuned"] = MALLOC_TUNED
    first = seconds(lambda: side.run(1))
    loss = side.run(args.warmup)
    step_seconds = calibrate(side, args.quick)
    replies.write(json.dumps({"first": first, "loss": loss, "step_seconds": step_seconds, **info}) + "\n")
    for line in sys.stdin:
        request = line.split()
        if request == ["quit"]:
            break
        if args.rewarm:
            side.run(args.rewarm)  # back from idle while the other side ran: not a trial's steady step
        replies.write(json.dumps(timed_window(side, request, step_seconds)) + "\n")


def timed_window(side, request: list[str], step_seconds: float) -> dict:
    """{steps, seconds, loss} of one window: ["N"] steps, or ["T", "seconds"] at least T seconds of steps."""
    import time

    start = time.perf_counter()
    if len(request) == 1:
        steps = int(request[0])
        loss = side.run(steps)
        return {"steps": steps, "seconds": time.perf_counter() - start, "loss": loss}
    target = float(request[0])
    chunk = max(1, round(target / 10 / max(step_seconds, 1e-9)))
    steps = 0
    while True:
        loss = side.run(chunk)  # blocks at the end of the chunk
        steps += chunk
        elapsed = time.perf_counter() - start
        if elapsed >= target:
            return {"steps": steps, "seconds": elapsed, "loss": loss}


if __name__ == "__main__":
    main()
