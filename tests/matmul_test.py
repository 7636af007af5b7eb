"""trainer/matmul.py: float32-accumulating products of bfloat16 operands, forward and backward,
against jax's own float32 product and derivative."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.matmul import matmul

# (contract, a's shape, b's shape): a @ b, a @ b.T, a.T @ b, a.T @ b.T; with and without batch
# axes; an even contracted row count goes as two axes (matmul._product), an odd one as one.
CASES = [
    ((-1, -2), (6, 16), (16, 12)),
    ((-1, -1), (2, 3, 6, 16), (2, 3, 12, 16)),
    ((-2, -2), (3, 16, 6), (3, 16, 12)),
    ((-2, -1), (16, 6), (12, 16)),
    ((-1, -2), (7, 16), (16, 12)),  # an odd row count: a.T @ g over one axis
    ((-2, -2), (2, 9, 6), (2, 9, 12)),
]


def reference(a, b, contract):
    """The same product in float32 written as an einsum."""
    lead = "xyz"[: a.ndim - 2]
    a_axes = lead + ("mk" if contract[0] == -1 else "km")
    b_axes = lead + ("kn" if contract[1] == -2 else "nk")
    return jnp.einsum(f"{a_axes},{b_axes}->{lead}mn", a.astype(jnp.float32), b.astype(jnp.float32))


def bf16_exact(key, shape):
    """Random values that bfloat16 holds exactly, as float32."""
    return jax.random.normal(key, shape).astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("contract,a_shape,b_shape", CASES)
def test_float32_products_and_derivatives_equal_an_einsums(contract, a_shape, b_shape):
    keys = jax.random.split(jax.random.key(0), 3)
    a, b = jax.random.normal(keys[0], a_shape), jax.random.normal(keys[1], b_shape)
    weights = jax.random.normal(keys[2], reference(a, b, contract).shape)
    ours = jax.value_and_grad(lambda a, b: jnp.sum(matmul(a, b, contract) * weights), (0, 1))(a, b)
    theirs = jax.value_and_grad(lambda a, b: jnp.sum(reference(a, b, contract) * weights), (0, 1))(a, b)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("contract,a_shape,b_shape", CASES)
def test_bfloat16_operands_accumulate_in_float32_forward_and_backward(contract, a_shape, b_shape):
    keys = jax.random.split(jax.random.key(1), 3)
    a, b = bf16_exact(keys[0], a_shape), bf16_exact(keys[1], b_shape)
    weights = bf16_exact(keys[2], reference(a, b, contract).shape)  # the cotangent, exact in bfloat16

    def loss(a, b):
        return jnp.sum(matmul(a, b, contract) * weights)

    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    product = matmul(a16, b16, contract)
    assert product.dtype == jnp.float32
    # The operands are exact in bfloat16, so a float32-accumulated product equals float32's.
    np.testing.assert_allclose(product, reference(a, b, contract), rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss, (0, 1))(a16, b16)
    expected = jax.grad(lambda a, b: jnp.sum(reference(a, b, contract) * weights), (0, 1))(a, b)
    for got, want in zip(grads, expected):
        assert got.dtype == jnp.bfloat16
        # float32 sums rounded once to bfloat16: within half a bfloat16 step (2**-8 relative).
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("contract,a_shape,b_shape", CASES)
def test_every_product_of_the_bfloat16_derivative_multiplies_bfloat16_operands(contract, a_shape, b_shape):
    # jax's own derivative of a float32-accumulating product multiplies the float32 cotangent
    # with a bfloat16 operand, which XLA's CPU backend runs as a float32 product.
    a = jnp.ones(a_shape, jnp.bfloat16)
    b = jnp.ones(b_shape, jnp.bfloat16)
    program = jax.jit(jax.grad(lambda a, b: jnp.sum(matmul(a, b, contract) ** 2), (0, 1))).lower(a, b).as_text()
    products = [line for line in program.splitlines() if "stablehlo.dot_general" in line]
    assert len(products) == 3  # forward, and one for each operand's gradient
    for line in products:
        operands, result = re.search(r": \((.*)\) -> (tensor<[^>]*>)", line).groups()
        assert re.fullmatch(r"tensor<[0-9x]*xbf16>, tensor<[0-9x]*xbf16>", operands), line
        assert result.endswith("xf32>"), line


@pytest.mark.parametrize("contract,a_shape,b_shape", CASES)
def test_a_float32_weight_multiplied_in_bfloat16_gets_its_gradient_unrounded(contract, a_shape, b_shape):
    # A bfloat16 model's float32 weight: rounded to bfloat16 inside the product; its gradient is
    # the float32 accumulation itself (not rounded to bfloat16 and back), the input's is bfloat16.
    keys = jax.random.split(jax.random.key(2), 3)
    a, b = bf16_exact(keys[0], a_shape), jax.random.normal(keys[1], b_shape)
    b_rounded = b.astype(jnp.bfloat16).astype(jnp.float32)
    weights = bf16_exact(keys[2], reference(a, b, contract).shape)
    product = matmul(a.astype(jnp.bfloat16), b, contract, dtype=jnp.bfloat16)
    np.testing.assert_allclose(product, reference(a, b_rounded, contract), rtol=1e-5, atol=1e-5)
    da, db = jax.grad(lambda a, b: jnp.sum(matmul(a, b, contract, dtype=jnp.bfloat16) * weights), (0, 1))(
        a.astype(jnp.bfloat16), b)
    want_da, want_db = jax.grad(lambda a, b: jnp.sum(reference(a, b, contract) * weights), (0, 1))(a, b_rounded)
    assert da.dtype == jnp.bfloat16 and db.dtype == jnp.float32
    np.testing.assert_allclose(da.astype(jnp.float32), want_da, rtol=2**-8, atol=1e-6)
    # a and the cotangent are exact in bfloat16, so float32 sums of their products are float32's.
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5)
    program = jax.jit(jax.grad(lambda a, b: jnp.sum(matmul(a, b, contract, dtype=jnp.bfloat16) ** 2), (0, 1))).lower(
        a.astype(jnp.bfloat16), b).as_text()
    for line in (line for line in program.splitlines() if "stablehlo.dot_general" in line):
        assert re.search(r": \(tensor<[0-9x]*xbf16>, tensor<[0-9x]*xbf16>\)", line), line


def test_operands_it_cannot_multiply_are_named():
    with pytest.raises(ValueError, match="differ in dtype: bfloat16 and float32.*dtype="):
        matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="matmul in bfloat16 takes bfloat16 or float32 operands, got float16"):
        matmul(jnp.ones((2, 3), jnp.float16), jnp.ones((3, 4)), dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"got \(0, -2\)"):
        matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), contract=(0, -2))
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(5, 3, 4\)"):
        matmul(jnp.ones((2, 3)), jnp.ones((5, 3, 4)))
