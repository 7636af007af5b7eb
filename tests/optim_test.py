import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.config import OptimConfig
from trainer.optim import Hyperparams, Optimizer, learning_rate, reference_learning_rate


@pytest.mark.parametrize(
    "lr,warmup,end_lr,total",
    [(2e-3, 184, 2e-3, 1000), (1e-3, 10, 1e-5, 100), (5e-4, 0, 0.0, 50), (2e-4, 30, 2e-5, 30)],
)
def test_schedule_matches_optax_reference(lr, warmup, end_lr, total):
    h = Hyperparams.create(lr=lr, warmup=warmup, total_steps=total, cfg=OptimConfig(end_lr=end_lr))
    for step in [0, 1, warmup // 2, max(warmup - 1, 0), warmup, warmup + 1, (warmup + total) // 2, total - 1, total, total + 5]:
        ours = float(learning_rate(jnp.asarray(step), h))
        ref = reference_learning_rate(step, lr=lr, warmup=warmup, end_lr=end_lr, decay_steps=total)
        # optax's linear schedule computes lr - lr * (1 - s / warmup) in float32, whose
        # cancellation error is a few float32 ulps of lr, not of the result.
        assert ours == pytest.approx(ref, rel=1e-6, abs=4 * float(np.finfo(np.float32).eps) * lr), step


def test_warmup_starts_at_zero_and_constant_when_end_lr_is_lr():
    h = Hyperparams.create(lr=2e-3, warmup=184, total_steps=500, cfg=OptimConfig())  # end_lr None -> lr
    assert float(learning_rate(jnp.asarray(0), h)) == 0.0
    assert float(learning_rate(jnp.asarray(92), h)) == pytest.approx(1e-3, rel=1e-6)
    for step in (184, 300, 499, 800):
        assert float(learning_rate(jnp.asarray(step), h)) == pytest.approx(2e-3, rel=1e-6)


def _params():
    return {
        "embed_VxD": jnp.ones((4, 3)),
        "layers": {"mlp": {"up_DxF": jnp.ones((3, 5))}, "attention_norm": {"scale": jnp.ones((3,))}},
    }


def test_weight_decay_mask_skips_norms_and_embeddings():
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    h = Hyperparams.create(lr=0.1, warmup=0, total_steps=10, cfg=OptimConfig(weight_decay=0.5))
    for kind, decayed in [("all", {"embed_VxD", "up_DxF", "scale"}), ("no_norms_or_embeddings", {"up_DxF"})]:
        opt = Optimizer(weight_decay_mask=kind)
        updates, *_ = opt.update(zeros, opt.init(params), params, step=jnp.asarray(0), h=h)
        flat = {str(path[-1].key): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]}
        for name, update in flat.items():
            # With zero gradients, AdamW's update is -lr * wd * param exactly where decay applies.
            expected = -0.1 * 0.5 if name in decayed else 0.0
            np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=f"{kind}: {name}")


def test_clipping_scales_to_the_limit_and_zero_disables_it():
    params = {"w": jnp.zeros((4,))}
    grads = {"w": jnp.full((4,), 3.0)}  # norm 6
    for clip, expected_norm in [(1.0, 1.0), (0.0, 6.0)]:
        h = Hyperparams.create(lr=1.0, warmup=0, total_steps=1, cfg=OptimConfig(clip_grad_norm=clip, b1=0.0, b2=0.0))
        opt = Optimizer()
        state = opt.init(params)
        _, state, lr, grad_norm = opt.update(grads, state, params, step=jnp.asarray(0), h=h)
        assert float(grad_norm) == pytest.approx(6.0)
        # With b1 = 0 Adam's first moment is the (clipped) gradient itself.
        mu = state.inner_state[0].mu["w"]
        assert float(jnp.linalg.norm(mu)) == pytest.approx(expected_norm, rel=1e-6)


def test_bfloat16_first_moment():
    params = _params()
    opt = Optimizer(mu_dtype="bfloat16")
    state = opt.init(params)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(state.inner_state[0].mu))
