"""One side of benchmarks.throughput in a process of its own, driven line by line over stdin.

    python -m benchmarks.throughput_worker ours|theirs SETUP [--quick] [--layers N] [--lr X] [--warmup N]
                                           [--torch-threads N] [--tune-malloc]

Each side gets the process its users would run: ours tunes glibc's malloc first, as
`python -m trainer` and `python -m sweeper` do (trainer/hostmem.py); the PyTorch side keeps the
defaults unless --tune-malloc (to see what the same settings give it). The worker builds its side on the shared batches, times one first step, runs the
warmup, and replies one JSON line; then each request "N" runs --rewarm untimed steps, then N
steps, and replies their seconds (timed in the worker) and the last loss; "quit" ends it.
"""

import sys

if __name__ == "__main__" and (sys.argv[1:2] == ["ours"] or "--tune-malloc" in sys.argv):
    from trainer.hostmem import tune_malloc

    MALLOC_TUNED = tune_malloc()  # before numpy's or JAX's threads start
else:
    MALLOC_TUNED = False

import argparse
import json
import os


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput_worker")
    parser.add_argument("side", choices=["ours", "theirs"])
    parser.add_argument("setup")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, help="as benchmarks.throughput --layers")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rewarm", type=int, default=1, help="untimed steps before each timed window")
    parser.add_argument("--torch-threads", type=int)
    parser.add_argument("--tune-malloc", action="store_true", help="the PyTorch side too (ours always)")
    args = parser.parse_args(argv)

    # Replies go to the real stdout; anything the libraries print goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    from benchmarks.common import cpu_count, seconds
    from benchmarks.setups import BATCH_COUNT, make_setups, token_batches
    from benchmarks.sides import Ours, Theirs

    setup = make_setups(args.quick, args.layers)[args.setup]
    batches = token_batches(setup, count=BATCH_COUNT)
    if args.side == "theirs":
        import torch

        torch.set_num_threads(args.torch_threads or cpu_count())
        side = Theirs(setup, batches, setup.optim, args.lr)
        info = {"attention": side.attention, "num_params": side.num_params, "threads": torch.get_num_threads(),
                "lora": side.lora}
    else:
        side = Ours(setup, batches, setup.optim, args.lr)
        info = {"xla_flops": side.xla_flops_per_step(), "loss_positions": side.loss_positions}
    info["trainable_params"] = side.trainable_params
    info["malloc_tuned"] = MALLOC_TUNED
    first = seconds(lambda: side.run(1))
    loss = side.run(args.warmup)
    replies.write(json.dumps({"first": first, "loss": loss, **info}) + "\n")
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        steps = int(line)
        if args.rewarm:
            side.run(args.rewarm)  # back from idle while the other side ran: not a trial's steady step
        result = {}
        result["seconds"] = seconds(lambda: result.update(loss=side.run(steps)))
        replies.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
