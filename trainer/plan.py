"""Will the train step fit? Per-device bytes of a trial's train step, before paying for the chips.

    python -m trainer.plan model=open_llama_3b_v2 train=tpu train.mesh=[1,8,1] plan.device_memory=16GiB

    python -m trainer.plan model=open_llama_7b_v2 train=tpu plan.tpu=v4-8     # TPU's own compiler (libtpu)

Takes the trainer's Hydra overrides, plus `plan.device_memory` (bytes per device: 16GiB, 32GB,
...), and either `plan.devices` (simulated CPU devices; default: the mesh's product) or
`plan.tpu` (a TPU slice: v3-8, v4-8, v4-16, v5e-8, v5p-8, v6e-8, or a topology such as
v5e:2x4). It builds the train state as shapes only (no weights are loaded or allocated),
places it on the mesh by the sharding table (trainer/sharding.py), compiles the step ahead of
time, and prints per device: parameters, optimizer state, the batch, XLA's temporaries (the
activations kept for the backward pass and every other scratch buffer; XLA reports them as one
figure), and the peak, against the device's memory. Exit status 0 if it fits, 1 if not.

With plan.tpu the step is compiled by the TPU compiler in libtpu (`pip install libtpu`, no TPU
needed: jax.experimental.topologies describes the slice), so the figures are the TPU's. On
simulated CPU devices they are the CPU compiler's, which keeps FSDP's gathered weights and
gradients alive far longer than TPU's scheduler does: its temporaries can be several times
TPU's. Parameters, optimizer state and batch are exact either way. The output head is planned
on every position (the trainer may gather only the loss-bearing ones, which needs less).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

from trainer.config import ConfigError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'16GiB' -> 17179869184; '32GB' -> 32e9; a plain number is bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"plan.device_memory={text!r} is not a size; use e.g. plan.device_memory=16GiB or 32GB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


@dataclass
class Plan:
    """Bytes per device of one compiled train step."""

    devices: int
    mesh: dict
    params: int  # trained and frozen weights
    optimizer: int  # optimizer state (Adam's moments), step counters and hyperparameters
    batch: int
    temporaries: int  # XLA's temp buffers: activations saved for the backward pass and scratch
    arguments: int  # what XLA counts as the step's inputs (state + batch)
    outputs: int
    aliased: int  # outputs written over donated inputs (the new state over the old)
    code: int
    device_memory: Optional[int] = None
    refused: str = ""  # the TPU compiler's own "ran out of memory" message, when it refused the step

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> Optional[bool]:
        if self.refused:
            return False
        return None if self.device_memory is None else self.peak <= self.device_memory

    def table(self) -> str:
        rows = [("parameters", self.params), ("optimizer state", self.optimizer), ("batch", self.batch),
                ("activations and temporaries", self.temporaries),
                ("outputs not written in place", self.outputs - self.aliased), ("program", self.code),
                ("peak", self.peak)]
        lines = [f"per device, {self.devices} devices, mesh {self.mesh}:"]
        lines += [f"  {name:<30} {format_bytes(value):>12}" for name, value in rows]
        if self.device_memory is not None:
            share = self.peak / self.device_memory
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {'device memory':<30} {format_bytes(self.device_memory):>12}  -> {verdict} ({share:.0%} used)")
        if self.refused:
            lines.append(f"  the compiler refused the step: {self.refused}")
        return "\n".join(lines)


# TPU slices by their usual names: (topology for jax.experimental.topologies, chip config, HBM per device).
TPU_SLICES = {
    "v3-8": ("v3:2x2", None, 16 * 2**30),  # 4 chips x 2 cores, each core a device
    "v4-8": ("v4:2x2x1", "megacore", 32 * 2**30),
    "v4-16": ("v4:2x2x2", "megacore", 32 * 2**30),
    "v5e-8": ("v5e:2x4", None, 16 * 2**30),
    "v5p-8": ("v5p:2x2x1", "megacore", 95 * 2**30),
    "v6e-8": ("v6e:2x4", None, 32 * 2**30),
}


def tpu_devices(name: str) -> tuple[list, Optional[int]]:
    """The devices of a TPU slice for ahead-of-time compilation, and their HBM if the slice is known."""
    topology, chip_config, memory = TPU_SLICES.get(name, (name, None, None))
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"plan.tpu={name} compiles with TPU's compiler, which comes with libtpu; `pip install libtpu` "
            "(no TPU needed), or drop plan.tpu to plan on simulated CPU devices"
        ) from None
    from jax.experimental import topologies

    kwargs = {"chip_config_name": chip_config} if chip_config else {}
    try:
        return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices), memory
    except Exception as error:
        raise ConfigError(
            f"plan.tpu={name}: libtpu does not know topology {topology!r} ({error}); use one of "
            f"{', '.join(TPU_SLICES)} or a topology such as v5e:2x4"
        ) from None


def _sharded_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` when placed by `shardings`."""
    import jax
    import numpy as np

    leaves, shards = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards))


def abstract_step(cfg, mesh):
    """(the jitted step, abstract state and batch carrying their shardings), as run_trial would build them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from trainer import sharding as sharding_lib
    from trainer.model import Llama, LlamaShape
    from trainer.train import make_train_step
    from trainer.trial import initial_state, uses_dropout

    shape = LlamaShape.from_config(cfg.model)
    built = {}

    def build():
        graphdef, params = nnx.split(Llama(shape, rngs=nnx.Rngs(params=cfg.seed)), nnx.Param)
        built["optimizer"], built["graphdef"], state = initial_state(cfg, graphdef, params, total_steps=1000, copy=False)
        return state

    state = jax.eval_shape(build)  # shapes only: nothing is initialised or allocated
    shardings = sharding_lib.state_shardings(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    rows = sharding_lib.batch_sharding(mesh)
    size = (cfg.train.batch_size, cfg.data.seq_len)
    batch = {key: jax.ShapeDtypeStruct(size, jnp.int32, sharding=rows)
             for key in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct(size, jnp.float32, sharding=rows)
    step = make_train_step(built["graphdef"], built["optimizer"], cfg.train.grad_accum, None, uses_dropout(cfg))
    if len(mesh.devices.flat) > 1:
        step = sharding_lib.pin_state_shardings(step, state, mesh)
    return step, state, batch


def plan(cfg, device_memory: Optional[int] = None, devices=None) -> Plan:
    """Compile `cfg`'s train step for `devices` (default: all JAX sees) and measure it per device."""
    import jax

    from trainer import sharding as sharding_lib
    from trainer.config import to_trial_config, validate

    cfg = to_trial_config(cfg)
    validate(cfg)
    if cfg.model.kind != "llama":
        raise ConfigError(f"model.kind={cfg.model.kind!r} trains no JAX step; plan a llama model, e.g. model=tiny")
    mesh = sharding_lib.make_mesh(cfg.train.mesh, devices)
    sharding_lib.check_batch_size(cfg.train.batch_size, mesh)
    step, state, batch = abstract_step(cfg, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    weights = _sharded_bytes((state.params, state.frozen), (shardings.params, shardings.frozen))
    everything = _sharded_bytes(state, shardings)
    batch_bytes = _sharded_bytes(batch, jax.tree.map(lambda x: x.sharding, batch))
    try:
        analysis = step.lower(state, batch).compile().memory_analysis()
    except Exception as error:  # TPU's compiler checks HBM itself and stops when the step can't fit
        message = next((line for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line), "")
        if not message:
            raise
        needed = re.search(r"HLO temporaries \(([0-9.]+)G\)", message)
        return Plan(
            devices=len(mesh.devices.flat), mesh=dict(mesh.shape), params=weights, optimizer=everything - weights,
            batch=batch_bytes, temporaries=int(float(needed.group(1)) * 2**30) if needed else 0,
            arguments=everything + batch_bytes, outputs=0, aliased=0, code=0, device_memory=device_memory,
            refused=message.split("RESOURCE_EXHAUSTED:", 1)[-1].strip(),
        )
    arguments, outputs = int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes)
    aliased, code = int(analysis.alias_size_in_bytes), int(analysis.generated_code_size_in_bytes)
    # TPU's compiler reports its buffer assignment's peak, of which temp_size is only a part; the
    # CPU's "peak" counts the arguments alone. The larger reading of what is live beside the state wins.
    reported_peak = int(getattr(analysis, "peak_memory_in_bytes", 0) or 0)
    temporaries = max(int(analysis.temp_size_in_bytes), reported_peak - (arguments + outputs - aliased) - code)
    return Plan(
        devices=len(mesh.devices.flat), mesh=dict(mesh.shape), params=weights, optimizer=everything - weights,
        batch=batch_bytes, temporaries=temporaries,
        arguments=arguments, outputs=outputs, aliased=aliased, code=code, device_memory=device_memory,
    )


def split_arguments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(plan.* options, the trainer's Hydra overrides)."""
    options, overrides = {}, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.startswith("plan."):
            if key not in ("plan.device_memory", "plan.devices", "plan.tpu"):
                raise ConfigError(
                    f"{key} is not a planner option; use plan.device_memory=16GiB, plan.devices=8 or plan.tpu=v4-8"
                )
            options[key[len("plan."):]] = value
        else:
            overrides.append(arg)
    return options, overrides


def mesh_devices(mesh: list[int], devices: Optional[str]) -> int:
    """How many devices to simulate: plan.devices, else the product of a mesh without -1."""
    if devices:
        return int(devices)
    if -1 in mesh:
        raise ConfigError(
            f"train.mesh={mesh} infers an axis (-1), so the device count is unknown; pass plan.devices=8 "
            "or a full mesh, e.g. train.mesh=[1,8,1]"
        )
    return math.prod(mesh)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        options, overrides = split_arguments(argv)
        device_memory = parse_bytes(options["device_memory"]) if "device_memory" in options else None
        from trainer.distributed import compose_trial

        cfg = compose_trial(overrides, output_dir="unused")
        os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts; a TPU target is compiled for, not run on
        if options.get("tpu"):
            os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU VM metadata server to ask
            devices, memory = tpu_devices(options["tpu"])
            device_memory = device_memory if device_memory is not None else memory
            target = f"TPU {options['tpu']} (libtpu's compiler)"
        else:
            count = mesh_devices(list(cfg.train.mesh), options.get("devices"))
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
            import jax

            if len(jax.devices()) < count:
                raise ConfigError(f"only {len(jax.devices())} simulated devices started; run the planner in a fresh process")
            devices, target = jax.devices()[:count], "simulated CPU devices (the CPU compiler)"
        result = plan(cfg, device_memory, devices)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"model {cfg.model.name}, batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens "
          f"(grad_accum {cfg.train.grad_accum}), finetune {cfg.finetune.method}, params {cfg.model.param_dtype}, "
          f"on {target}")
    print(result.table())
    return 0 if result.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
