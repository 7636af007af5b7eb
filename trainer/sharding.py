"""Where every array of a trial lives: a (dp, fsdp, mp) device mesh and one table of rules.

Parameters are sharded by `PARTITION_RULES` (regex on the '/'-joined parameter path ->
PartitionSpec); Adam's moments follow their parameter; every scalar is replicated; batches are
split over dp and fsdp together. `train_step` is a plain `jax.jit`, so the compiler propagates
these input shardings through the step; `pin_state_shardings` also fixes the layout of the state
it returns (needed with gradient accumulation, see there).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trainer.config import ConfigError

MESH_AXES = ("dp", "fsdp", "mp")
BATCH_AXES = ("dp", "fsdp")  # the batch dimension is split over both data axes

# The one place that says how each LLaMA weight is split. First match wins; paths look like
# "embed_VxD" or "layers/3/attention/q_DxNxH". Scalars (0-d leaves) are always replicated and
# need no rule. fsdp shards the hidden dimension D of every matrix; mp shards heads, the
# feed-forward width F and the vocabulary V (Megatron-style column/row pairs). LoRA adapters
# (rule None) are small and replicated whatever their rank.
PARTITION_RULES: tuple[tuple[str, P | None], ...] = (
    (r"(^|/)adapters/\w+/(a_IxR|b_RxO)$", None),
    (r"(^|/)embed_VxD$", P("mp", "fsdp")),
    (r"(^|/)attention/(q_DxNxH|k_DxKxH|v_DxKxH)$", P("fsdp", "mp", None)),
    (r"(^|/)attention/o_NxHxD$", P("mp", None, "fsdp")),
    (r"(^|/)mlp/(gate_DxF|up_DxF)$", P("fsdp", "mp")),
    (r"(^|/)mlp/down_FxD$", P("mp", "fsdp")),
    (r"(^|/)\w*norm/scale$", P(None)),
    (r"(^|/)head_DxV$", P("fsdp", "mp")),
)


def _parse_sizes(sizes: Sequence[int] | str) -> list[int]:
    if isinstance(sizes, str):
        parts = [s for s in sizes.strip().strip("[]()").split(",") if s.strip()]
    else:
        parts = list(sizes)
    try:
        values = [int(s) for s in parts]
    except (TypeError, ValueError):
        raise ConfigError(
            f"train.mesh={sizes!r} must be three integers dp,fsdp,mp; use e.g. train.mesh=[1,-1,1]"
        ) from None
    if len(values) != len(MESH_AXES) or any(v == 0 or v < -1 for v in values):
        raise ConfigError(
            f"train.mesh={values} needs three sizes dp,fsdp,mp, each >= 1 or -1 (inferred); "
            f"use e.g. train.mesh=[1,-1,1]"
        )
    if values.count(-1) > 1:
        raise ConfigError(
            f"train.mesh={values} has more than one -1; infer at most one axis, e.g. train.mesh=[1,-1,1]"
        )
    return values


def make_mesh(sizes: Sequence[int] | str, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("dp", "fsdp", "mp") mesh over `devices` (default: all); one size may be -1 (inferred).

    `sizes` may also be a string such as "1,4,2". The product must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    requested = _parse_sizes(sizes)
    values = list(requested)
    known = math.prod(v for v in values if v != -1)
    if -1 in values and count % known == 0:
        values[values.index(-1)] = count // known
    if -1 in values or math.prod(values) != count:
        raise ConfigError(
            f"train.mesh={requested} (dp,fsdp,mp) does not fit {count} device(s): the product "
            f"of the sizes must equal the device count; use e.g. train.mesh=[1,-1,1] to put every "
            f"device on fsdp"
        )
    # Auto axes: the compiler propagates shardings from the inputs through the plain-jit step.
    # (jax.make_mesh defaults to Explicit axes, which would make every op's sharding part of its type.)
    return jax.make_mesh(tuple(values), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[name] for name in names)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one parameter, from the first rule whose regex matches `path`.

    A dimension that its mesh axes do not divide evenly is replicated instead, so a tiny model
    (e.g. 2 kv heads) still runs on a wider mesh (mp=4); only that dimension loses its split.
    """
    if len(shape) == 0:
        return P()
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, path):
            break
    else:
        raise ValueError(
            f"no partition rule matches parameter {path!r} with shape {shape}; "
            f"add one to PARTITION_RULES in trainer/sharding.py"
        )
    if spec is None:
        return P(*([None] * len(shape)))
    if len(spec) != len(shape):
        raise ValueError(f"partition rule {pattern!r} gives {spec} for parameter {path!r} of rank {len(shape)}")
    return P(*(axes if dim % _axis_size(mesh, axes) == 0 else None for axes, dim in zip(spec, shape)))


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_name(path: tuple) -> str:
    """'layers/0/attention/q_DxNxH' for a pytree key path; an nnx Variable's '.value' is dropped."""
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for a whole TrainState, as a pytree of the same structure.

    Parameters, trained or frozen, follow PARTITION_RULES; an optimizer leaf whose path ends with a parameter's path
    and has its shape (Adam's mu and nu) gets that parameter's sharding; scalars and the dropout key
    are replicated.
    """
    replicated = NamedSharding(mesh, P())
    param_specs: dict[str, tuple[P, tuple[int, ...]]] = {}

    def for_param(path, leaf):
        name = path_name(path)
        spec = param_spec(name, tuple(np.shape(leaf)), mesh)
        param_specs[name] = (spec, tuple(np.shape(leaf)))
        return NamedSharding(mesh, spec)

    params = jax.tree_util.tree_map_with_path(for_param, state.params)
    frozen = jax.tree_util.tree_map_with_path(for_param, state.frozen)
    # Longest first, so the most specific parameter path wins a suffix match.
    names = sorted(param_specs, key=len, reverse=True)

    def for_other(path, leaf):
        shape = tuple(np.shape(leaf))
        if not shape:
            return replicated
        name = path_name(path)
        for param in names:
            if name == param or name.endswith("/" + param):
                spec, param_shape = param_specs[param]
                if shape == param_shape:
                    return NamedSharding(mesh, spec)
        raise ValueError(
            f"state leaf {name!r} with shape {shape} mirrors no parameter (its path must end with a "
            f"parameter's path and share its shape); give it a rule in trainer/sharding.py"
        )

    rest = jax.tree_util.tree_map_with_path(for_other, state.replace(params=None, frozen=None, dropout_key=None))
    return rest.replace(params=params, frozen=frozen, dropout_key=replicated)


def shard_state(state, mesh: Mesh):
    """The train state placed on `mesh` by `state_shardings`."""
    return jax.device_put(state, state_shardings(state, mesh))


def pin_state_shardings(step_fn: Callable, state, mesh: Mesh) -> Callable:
    """`step_fn` (a jitted `train_step`) with the new state pinned to `state_shardings`.

    Plain jit follows the input shardings but picks output shardings itself: with
    grad_accum > 1 it returns the norm scales split over fsdp, so step 2 recompiles and the
    state drifts from the table. Pinning keeps one compilation and the planned layout.
    """
    return jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings(state, mesh), None))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(B, T) arrays: rows split over dp and fsdp, replicated over mp."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Fail early when the batch cannot be split evenly over the data axes."""
    data_parallel = _axis_size(mesh, BATCH_AXES)
    if batch_size % data_parallel:
        suggestion = max(data_parallel, batch_size // data_parallel * data_parallel)
        raise ConfigError(
            f"train.batch_size={batch_size} must be divisible by dp*fsdp={data_parallel} "
            f"(mesh {dict(mesh.shape)}); use e.g. train.batch_size={suggestion}"
        )


def put_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """A host batch dict of (B, T) arrays, placed on the mesh by `batch_sharding`."""
    arrays = {name: np.asarray(value) for name, value in batch.items()}
    for array in arrays.values():
        check_batch_size(array.shape[0], mesh)
    return jax.device_put(arrays, batch_sharding(mesh))
