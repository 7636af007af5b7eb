"""Matmuls of low-precision operands that accumulate in float32, forward and backward.

XLA's CPU backend runs a bfloat16 x bfloat16 product natively (AVX-512 BF16 through YNNPACK)
only when its result is float32 and its left operand contracts its last axis; any other
bfloat16 product (a bfloat16 result, one operand in float32, a.T @ b) is converted and run as a
float32 product. JAX's own derivative of `dot(a, b, preferred_element_type=float32)` multiplies
the float32 cotangent with a bfloat16 operand, a mixed product, and a dense layer's weight
gradient is x.T @ g, so the backward pass (two thirds of the work) ran at the float32 rate.
`matmul` keeps all three products of a training step bfloat16 x bfloat16 -> float32, as
PyTorch's autocast does (the incoming cotangent is rounded to the operands' dtype), and writes
a.T @ b so that XLA transposes a and runs the product in YNNPACK (see `_product`). float32
operands keep jax's own product and derivative. A float32 weight in a bfloat16 model is rounded
inside the product (`dtype=`), and its gradient is the float32 accumulation itself: no bfloat16
rounding and conversion back, one pass less over every weight gradient.

On the 2-core AMD EPYC (`avx512_bf16`, no AMX; 2026-11-30, idle), 2048 x 2048 products in
GFLOP/s: bfloat16 -> float32 907-947, float32 427-475, bfloat16 -> bfloat16 358; a.T @ b in
bfloat16 345 over one axis, 903-909 over two; forward + backward of x @ w (4096 x 1024 x 2048)
in bfloat16 406 with jax's derivative and the one-axis a.T @ b, 645 with both changes.

Operands share their leading (batch) axes; each contributes one of its last two axes to the
contraction: `contract=(-1, -2)` is a @ b, `(-1, -1)` is a @ b.T, `(-2, -2)` is a.T @ b.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _free(axis: int) -> int:
    return -3 - axis  # the other one of the last two axes


def _product(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    batch = a.ndim - 2
    rows = a.shape[-2]
    if contract[0] == -2 and rows % 2 == 0 and jax.default_backend() == "cpu":
        # a.T @ b: written as a contraction over two axes (the rows split in halves), which XLA
        # rewrites into a transpose of a and a product YNNPACK runs; over one axis XLA:CPU folds
        # any transpose into the product, which then runs as a float32 Eigen product. (GPU and
        # TPU compilers multiply a.T @ b as it stands.)
        a = a.reshape(*a.shape[:batch], 2, rows // 2, a.shape[-1])
        if contract[1] == -2:
            b = b.reshape(*b.shape[:batch], 2, rows // 2, b.shape[-1])
            b_axes = (batch, batch + 1)
        else:
            b = b.reshape(*b.shape[:batch], b.shape[-2], 2, rows // 2)
            b_axes = (batch + 1, batch + 2)
        dims = (((batch, batch + 1), b_axes), (tuple(range(batch)), tuple(range(batch))))
    else:
        dims = (((a.ndim + contract[0],), (b.ndim + contract[1],)), (tuple(range(batch)), tuple(range(batch))))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int], dtype: jnp.dtype) -> jax.Array:
    return _product(a.astype(dtype), b.astype(dtype), contract)


def _forward(a, b, contract, dtype):
    a_low, b_low = a.astype(dtype), b.astype(dtype)
    # The primal dtypes travel as empty arrays: residuals must be arrays.
    return _product(a_low, b_low, contract), (a_low, b_low, jnp.zeros(0, a.dtype), jnp.zeros(0, b.dtype))


def _backward(contract, dtype, saved, g):
    a, b, a_type, b_type = saved
    ca, cb = contract
    g = g.astype(dtype)  # (..., a's free axis, b's free axis)
    # da: g's b-axis against b's free axis, laid out as a is.
    da = _product(g, b, (-1, _free(cb))) if ca == -1 else _product(b, g, (_free(cb), -1))
    # db: g's a-axis against a's free axis, laid out as b is.
    db = _product(a, g, (_free(ca), -2)) if cb == -2 else _product(g, a, (-2, _free(ca)))
    # A float32 operand (a weight) gets its gradient straight from the float32 accumulation.
    return da.astype(a_type.dtype), db.astype(b_type.dtype)


_matmul.defvjp(_forward, _backward)


def matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (-1, -2), dtype=None) -> jax.Array:
    """The float32 product of a and b over their leading batch axes, multiplied in `dtype`.

    `dtype` (default: the operands' own, which must then agree) is what both operands are
    rounded to for the product; an operand may be float32 beside it (a float32 weight in a
    bfloat16 model), and then gets its gradient in float32, unrounded. For a dtype below float32
    the derivative multiplies in that dtype with float32 accumulation (see the module's text).
    """
    if a.ndim != b.ndim or a.ndim < 2:
        raise ValueError(f"matmul takes operands with the same number (>= 2) of axes, got {a.shape} and {b.shape}")
    if contract[0] not in (-1, -2) or contract[1] not in (-1, -2):
        raise ValueError(f"contract names one of each operand's last two axes (-1 or -2), got {contract}")
    if dtype is None:
        if a.dtype != b.dtype:
            raise ValueError(f"matmul operands differ in dtype: {a.dtype} and {b.dtype}; cast one first, or "
                             "name the dtype to multiply in (dtype=...)")
        dtype = a.dtype
    dtype = jnp.dtype(dtype)
    for operand in (a, b):
        if operand.dtype not in (dtype, jnp.float32):
            raise ValueError(f"matmul in {dtype} takes {dtype} or float32 operands, got {operand.dtype}")
    if dtype == jnp.float32:
        # jax's own derivative: the custom one below (with a.T @ b in YNNPACK) made a LoRA trial
        # on SmolLM2-135M 12% slower in float32 (30 steps: 143-148 s against 123-132 s).
        return _product(a, b, contract)
    return _matmul(a, b, contract, dtype)
