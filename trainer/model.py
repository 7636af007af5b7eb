"""A LLaMA decoder in Flax NNX: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Weights follow the Hugging Face LLaMA layout (rotate-half rotary convention, untied head), so a
`transformers` checkpoint loads without permuting anything. Packed rows are supported: a token
attends only to earlier tokens of its own segment, and positions restart per segment.

Shape suffixes: B batch, T query length, S key length, D hidden, N query heads, K key/value
heads, H head dimension, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.config import ModelConfig


@dataclass(frozen=True)
class LlamaShape:
    """The static shape of a LLaMA model; hashable so compiled steps can be keyed by it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "LlamaShape":
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
        )

    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attention = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attention + 3 * d * f + 2 * d
        return self.num_layers * per_layer + 2 * self.vocab_size * d + d


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype=dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype=dtype))
        self.eps = eps

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x_BxTxD.dtype) * x.astype(x_BxTxD.dtype)


def rotary(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the rotate-half convention of Hugging Face LLaMA."""
    head_dim = x_BxTxNxH.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
    sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def attention_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """Causal and within-segment: (B, 1, T, T) booleans. Padding (segment 0) sees only padding."""
    length = segment_ids_BxT.shape[1]
    causal_TxT = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (causal_TxT[None] & same_BxTxT)[:, None]


def masked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS):
    """Softmax attention with grouped key/value heads, scores and softmax in float32.

    Written as plain einsums over repeated key/value heads: on XLA's CPU backend this is about
    2.8x faster forward + backward than jax.nn.dot_product_attention with a mask on the tiny
    preset (17 -> 6 ms per layer, measured with benchmarks/step_profile.py's method).
    """
    groups = q_BxTxNxH.shape[2] // k_BxSxKxH.shape[2]
    k_BxSxNxH = jnp.repeat(k_BxSxKxH, groups, axis=2)
    v_BxSxNxH = jnp.repeat(v_BxSxKxH, groups, axis=2)
    scale = q_BxTxNxH.shape[-1] ** -0.5
    scores_BxNxTxS = jnp.einsum("BTNH,BSNH->BNTS", q_BxTxNxH * scale, k_BxSxNxH).astype(jnp.float32)
    scores_BxNxTxS = jnp.where(mask_Bx1xTxS, scores_BxNxTxS, jnp.finfo(jnp.float32).min)
    probs_BxNxTxS = jax.nn.softmax(scores_BxNxTxS, axis=-1).astype(v_BxSxNxH.dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", probs_BxNxTxS, v_BxSxNxH)


class Attention(nnx.Module):
    def __init__(self, shape: LlamaShape, *, rngs: nnx.Rngs):
        d, n, k, h = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
        std, pdtype = shape.init_std, jnp.dtype(shape.param_dtype)
        self.q_DxNxH = _param(rngs, (d, n, h), std, pdtype)
        self.k_DxKxH = _param(rngs, (d, k, h), std, pdtype)
        self.v_DxKxH = _param(rngs, (d, k, h), std, pdtype)
        self.o_NxHxD = _param(rngs, (n, h, d), std, pdtype)
        self.rope_theta = shape.rope_theta
        self.dtype = jnp.dtype(shape.dtype)

    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS):
        dt = self.dtype
        q = jnp.einsum("BTD,DNH->BTNH", x_BxTxD, self.q_DxNxH[...].astype(dt))
        k = jnp.einsum("BSD,DKH->BSKH", x_BxTxD, self.k_DxKxH[...].astype(dt))
        v = jnp.einsum("BSD,DKH->BSKH", x_BxTxD, self.v_DxKxH[...].astype(dt))
        q = rotary(q, positions_BxT, self.rope_theta)
        k = rotary(k, positions_BxT, self.rope_theta)
        out_BxTxNxH = masked_attention(q, k, v, mask_Bx1xTxS)
        return jnp.einsum("BTNH,NHD->BTD", out_BxTxNxH, self.o_NxHxD[...].astype(dt))


class MLP(nnx.Module):
    def __init__(self, shape: LlamaShape, *, rngs: nnx.Rngs):
        d, f = shape.hidden_size, shape.intermediate_size
        std, pdtype = shape.init_std, jnp.dtype(shape.param_dtype)
        self.gate_DxF = _param(rngs, (d, f), std, pdtype)
        self.up_DxF = _param(rngs, (d, f), std, pdtype)
        self.down_FxD = _param(rngs, (f, d), std, pdtype)
        self.dtype = jnp.dtype(shape.dtype)

    def __call__(self, x_BxTxD):
        dt = self.dtype
        gate = jax.nn.silu(x_BxTxD @ self.gate_DxF[...].astype(dt))
        return (gate * (x_BxTxD @ self.up_DxF[...].astype(dt))) @ self.down_FxD[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, shape: LlamaShape, *, rngs: nnx.Rngs):
        pdtype = jnp.dtype(shape.param_dtype)
        self.attention_norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, pdtype)
        self.attention = Attention(shape, rngs=rngs)
        self.mlp_norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, pdtype)
        self.mlp = MLP(shape, rngs=rngs)

    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS):
        x_BxTxD = x_BxTxD + self.attention(self.attention_norm(x_BxTxD), positions_BxT, mask_Bx1xTxS)
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))


class Llama(nnx.Module):
    def __init__(self, shape: LlamaShape, *, rngs: nnx.Rngs):
        pdtype = jnp.dtype(shape.param_dtype)
        self.shape = shape
        self.embed_VxD = _param(rngs, (shape.vocab_size, shape.hidden_size), shape.init_std, pdtype)
        self.layers = nnx.List([Block(shape, rngs=rngs) for _ in range(shape.num_layers)])
        self.final_norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, pdtype)
        self.head_DxV = _param(rngs, (shape.hidden_size, shape.vocab_size), shape.init_std, pdtype)

    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
        """Logits (float32) for every position; positions/segments default to one unpacked sequence."""
        return self.logits(self.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT))

    def hidden_states(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
        """The final-normed hidden states, before the output head."""
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones_like(tokens_BxT)
        mask = attention_mask(segment_ids_BxT)
        dt = jnp.dtype(self.shape.dtype)
        x_BxTxD = jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(dt)
        for layer in self.layers:
            x_BxTxD = layer(x_BxTxD, positions_BxT, mask)
        return self.final_norm(x_BxTxD)

    def logits(self, x_BxTxD):
        dt = jnp.dtype(self.shape.dtype)
        return (x_BxTxD @ self.head_DxV[...].astype(dt)).astype(jnp.float32)


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Per-token cross-entropy in float32."""
    logits = logits_BxTxV.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def head_losses(model: "Llama", hidden_BxTxD: jax.Array, targets_BxT: jax.Array, chunk_tokens: int = 512) -> jax.Array:
    """Per-token cross-entropy of the output head, computed `chunk_tokens` tokens at a time.

    The full (B*T, V) logits of a large vocabulary overflow the CPU's caches and every pass over
    them is memory-bound; chunks that are recomputed in the backward pass (jax.checkpoint) make
    the tiny preset's full-loss step 1.66x faster (benchmarks/README.md, step_profile). Equal to
    `token_losses(model.logits(hidden), targets)`.
    """
    batch, length, dim = hidden_BxTxD.shape
    tokens = batch * length
    if tokens <= chunk_tokens or tokens % chunk_tokens:
        return token_losses(model.logits(hidden_BxTxD), targets_BxT)
    head_DxV = model.head_DxV[...]
    dt = jnp.dtype(model.shape.dtype)

    @jax.checkpoint
    def chunk_losses(args):
        hidden_CxD, targets_C = args
        logits_CxV = (hidden_CxD @ head_DxV.astype(dt)).astype(jnp.float32)
        return token_losses(logits_CxV, targets_C)

    losses = jax.lax.map(
        chunk_losses,
        (hidden_BxTxD.reshape(-1, chunk_tokens, dim), targets_BxT.reshape(-1, chunk_tokens)),
    )
    return losses.reshape(batch, length)


def gather_positions(k: int, mask_BxT: jax.Array, *arrays_BxT: jax.Array):
    """The first k positions of each row where mask > 0 (in order), and the arrays there.

    Computing the output head only where a loss is taken saves most of its cost when few
    tokens carry a loss (answer-only training, label scoring). Rows with fewer than k marked
    positions are filled with unmarked ones, whose mask comes back 0.
    """
    index_BxK = jnp.argsort(mask_BxT <= 0, axis=1, stable=True)[:, :k]
    return index_BxK, tuple(jnp.take_along_axis(a, index_BxK.reshape(index_BxK.shape + (1,) * (a.ndim - 2)), axis=1) for a in (mask_BxT,) + arrays_BxT)


def init_model(shape: LlamaShape, seed: int) -> Llama:
    return Llama(shape, rngs=nnx.Rngs(params=seed))
