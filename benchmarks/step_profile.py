"""Where our train step's time goes: its parts timed apart, and the XLA ops that a profile shows.

    python -m benchmarks.step_profile [--quick] [--setups tiny easylm_debug] [--dtype bfloat16] [--top 15]

Each part is jitted on its own and timed (best of 3 rounds of --calls calls): the whole
train_step, the forward loss, forward + backward, the optimizer update alone, and the forward +
backward of the body (embedding, layers, final norm) and of the output head with its
cross-entropy. Then a jax.profiler trace of a few steps gives the XLA ops that take the most
thread time, each named with the JAX operation it came from. The setups are those of
benchmarks.throughput (loss on every token).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import re
import tempfile

from benchmarks.common import optim_preset, print_header, print_table, seconds
from benchmarks.setups import make_setups, token_batches
from benchmarks.sides import Ours


def best_ms(fn, calls: int) -> float:
    """Best of 3 rounds of the mean ms per call of fn() (which must block)."""
    fn()
    return min(seconds(lambda: [fn() for _ in range(calls)]) for _ in range(3)) / calls * 1e3


def part_functions(ours: Ours, setup):
    """{part: zero-argument callable that runs it once and blocks}."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from trainer.model import init_model, token_losses
    from trainer.optim import Hyperparams, Optimizer
    from trainer.train import loss_sums

    # A model of its own: the state in `ours` is donated at each step.
    graphdef, params = nnx.split(init_model(setup.shape, seed=0), nnx.Param)
    batch = ours.batches[0]
    optim_cfg = optim_preset()
    optimizer = Optimizer.from_config(optim_cfg)
    hparams = Hyperparams.create(lr=1e-3, warmup=0, total_steps=1000, cfg=optim_cfg)
    opt_state = optimizer.init(params)

    def loss(p, b):
        return loss_sums(graphdef, p, b)[0]

    def body(p, b):
        return nnx.merge(graphdef, p).hidden_states(b["inputs"], b["positions"], b["segment_ids"])

    def head_loss(p, hidden, b):
        return jnp.sum(token_losses(nnx.merge(graphdef, p).logits(hidden), b["targets"]))

    @jax.jit
    def body_grads(p, b, cotangent):
        hidden, pullback = jax.vjp(lambda q: body(q, b), p)
        return pullback(cotangent)

    @jax.jit
    def optimizer_only(grads, state, p):
        updates, state, _, _ = optimizer.update(grads, state, p, step=jnp.zeros((), jnp.int32), h=hparams)
        return jax.tree.map(jnp.add, p, updates), state

    forward = jax.jit(loss)
    forward_backward = jax.jit(jax.value_and_grad(loss))
    head_grads = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
    hidden = jax.jit(body)(params, batch)
    cotangent = jax.random.normal(jax.random.key(0), hidden.shape, hidden.dtype)
    block = jax.block_until_ready
    return {
        "train_step (all of it)": lambda: ours.run(1),
        "forward loss": lambda: block(forward(params, batch)),
        "forward + backward": lambda: block(forward_backward(params, batch)),
        "optimizer (clip + AdamW + apply)": lambda: block(optimizer_only(params, opt_state, params)),
        "body forward + backward (embed, layers, norm)": lambda: block(body_grads(params, batch, cotangent)),
        "head + cross-entropy forward + backward": lambda: block(head_grads(params, hidden, batch)),
    }


def op_sources(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: the JAX op_name of its metadata} from compiled HLO text."""
    sources = {}
    for match in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]+)\"", hlo_text):
        sources[match.group(1)] = match.group(2)
    return sources


def profile_ops(ours: Ours, steps: int) -> tuple[list[tuple[str, float]], float]:
    """[(XLA op, thread ms per step)] most first, and the summed thread ms per step of all ops."""
    import jax
    from jax.profiler import ProfileData

    folder = tempfile.mkdtemp(prefix="step_profile_")
    with jax.profiler.trace(folder):
        ours.run(steps)
    (path,) = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
    per_op: collections.Counter = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA's compute threads
                continue
            for event in line.events:
                if "ThunkExecutor" not in event.name and "Await" not in event.name:
                    per_op[event.name] += event.duration_ns / 1e6 / steps
    return per_op.most_common(), sum(per_op.values())


def op_kinds(ops: list[tuple[str, float]]) -> list[tuple[str, int, float]]:
    """[(kind, ops of that kind, thread ms per step)] most first: 'ynn_fusion.936' is of kind 'ynn_fusion'."""
    ms: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for op, op_ms in ops:
        kind = re.sub(r"\.\d+$", "", op)
        ms[kind] += op_ms
        count[kind] += 1
    return [(kind, count[kind], total) for kind, total in ms.most_common()]


def short_source(op_name: str) -> str:
    """'jit(train_step)/transpose(jvp())/dot_general' -> 'backward: dot_general'."""
    kind = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "update"
    return f"{kind}: {op_name.rsplit('/', 1)[-1]}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one setup: a smoke run")
    parser.add_argument("--setups", nargs="+", choices=["easylm_debug", "tiny", "smollm2_full", "smollm2_lora"])
    parser.add_argument("--calls", type=int, help="calls per timing round (default 5; quick 2)")
    parser.add_argument("--top", type=int, default=15, help="XLA ops to list")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (model.dtype; the weights stay float32)")
    args = parser.parse_args(argv)
    setups = args.setups or (["tiny"] if args.quick else ["tiny", "easylm_debug"])
    calls = args.calls or (2 if args.quick else 5)

    print_header(f"where our train step's time goes ({args.dtype} compute, loss on every token)")
    for name in setups:
        setup = make_setups(args.quick)[name]
        setup = dataclasses.replace(setup, shape=dataclasses.replace(setup.shape, dtype=args.dtype))
        ours = Ours(setup, token_batches(setup, count=1), optim_preset(), lr=1e-3)
        tokens = setup.batch_size * setup.seq_len
        parts = {part: best_ms(fn, calls) for part, fn in part_functions(ours, setup).items()}
        step_ms = parts["train_step (all of it)"]
        print_table(
            [[part, ms, f"{100 * ms / step_ms:.0f}%", tokens / ms * 1e3] for part, ms in parts.items()],
            ["part (jitted alone)", "ms", "of the step", "tokens/s"],
            title=f"-- {name}: batch {setup.batch_size} x seq {setup.seq_len}, vocab {setup.shape.vocab_size}, "
                  f"hidden {setup.shape.hidden_size}",
        )
        sources = op_sources(ours.step_fn.lower(ours.state, ours.batches[0]).compile().as_text())
        ops, total = profile_ops(ours, steps=3 if args.quick else 5)
        rows = []
        for op, ms in ops[: args.top]:
            source = sources.get(op, "")
            rows.append([op, short_source(source) if source else "", ms, f"{100 * ms / total:.1f}%"])
        print_table(
            rows,
            ["XLA op (profile)", "from", "thread ms/step", "share"],
            title=f"XLA ops by thread time: their spans on XLA's threads sum to {total:.1f} ms per step, "
                  f"{total / step_ms:.2f}x the step's wall time (on average that many cores run an op)",
        )
        kinds = op_kinds(ops)
        print_table(
            [[kind, count, ms, f"{100 * ms / total:.1f}%"] for kind, count, ms in kinds[: args.top]],
            ["kind of XLA op (name less its number)", "ops", "thread ms/step", "share"],
            title="the same, summed by kind (ynn_fusion: YNNPACK products; convert/transpose: copies)",
        )


if __name__ == "__main__":
    main()
