import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from trainer.evaluate import (
    INVALID, classification_report, generate_answers, parse_answer, score_candidates,
)
from trainer.model import LlamaShape, init_model

SHAPE = LlamaShape(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, init_std=0.5,
)


def test_report_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    predictions = np.where(rng.random(200) < 0.1, INVALID, rng.integers(0, 2, 200))
    report = classification_report("test", labels, predictions)
    p, r, f, _ = precision_recall_fscore_support(labels, predictions, labels=[0, 1], zero_division=0)
    np.testing.assert_allclose(report.precision, p)
    np.testing.assert_allclose(report.recall, r)
    np.testing.assert_allclose(report.f1, f)
    assert report.accuracy == pytest.approx(np.mean(labels == predictions))
    assert report.invalid_rate == pytest.approx(np.mean(predictions == INVALID))
    cm = confusion_matrix(labels, predictions, labels=[0, 1, INVALID])
    assert report.confusion == cm[:2].tolist()
    assert not report.degenerate


def test_one_class_for_everything_is_flagged():
    labels = np.array([0, 1] * 50)
    report = classification_report("test", labels, np.ones(100, int))
    assert report.accuracy == 0.5 and report.majority_share == 1.0 and report.degenerate


@pytest.mark.parametrize(
    "text,label",
    [(" Positive", 1), ("negative.", 0), ("Positive\n[Text]", 1), ("", INVALID), (" Neutral", INVALID), ("Pos", INVALID)],
)
def test_parse_answer(text, label):
    assert parse_answer(text) == label


def _model():
    model = init_model(SHAPE, 0)
    return nnx.split(model, nnx.Param)


def test_scores_equal_the_naive_sum_of_token_log_probabilities():
    graphdef, params = _model()
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(1)
    prompts = [np.concatenate([[1], rng.integers(3, 64, n)]).astype(np.int32) for n in (5, 11, 3, 17, 8)]
    candidates = [np.array([40], np.int32), np.array([41, 42], np.int32)]
    eos = 2
    scores = score_candidates(graphdef, params, prompts, candidates, eos, batch_size=4)
    for i, prompt in enumerate(prompts):
        for c, cand in enumerate(candidates):
            seq = np.concatenate([prompt, cand, [eos]])
            logp = jax.nn.log_softmax(model(jnp.asarray(seq[None, :-1]))[0], axis=-1)
            expected = sum(float(logp[t - 1, seq[t]]) for t in range(len(prompt), len(seq)))
            assert scores[i, c] == pytest.approx(expected, abs=1e-4), (i, c)


def _greedy_without_cache(model, prompt, max_new_tokens):
    """The reference: a full forward pass over the growing sequence, argmax at its last position."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(int(jnp.argmax(model(jnp.asarray([seq]))[0, -1])))
    return seq[len(prompt):]


def test_greedy_generation_equals_step_by_step_argmax():
    graphdef, params = _model()
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(2)
    prompts = [np.concatenate([[1], rng.integers(3, 64, n)]).astype(np.int32) for n in (4, 9, 6)]
    outputs = generate_answers(graphdef, params, prompts, max_new_tokens=3, temperature=0.0, batch_size=2, seed=0)
    for prompt, output in zip(prompts, outputs):
        assert output == _greedy_without_cache(model, prompt, 3)


def test_decode_after_prefill_equals_a_full_forward_pass():
    model = init_model(SHAPE, 0)
    rng = np.random.default_rng(3)
    lengths, new_tokens, width = [3, 9, 6], 5, 16
    sequences = [rng.integers(1, 64, n + new_tokens).astype(np.int32) for n in lengths]
    # Right-padded with other random tokens: their keys sit in the cache's later slots until
    # decode overwrites them, and must never reach the logits.
    buffer_BxL = rng.integers(1, 64, (len(lengths), width)).astype(np.int32)
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        buffer_BxL[row, :n] = seq[:n]
    _, cache = model.prefill(jnp.asarray(buffer_BxL))
    assert cache[0][0].shape == (len(lengths), SHAPE.num_kv_heads, width, SHAPE.head_dim)
    for t in range(new_tokens):
        position_B = np.asarray(lengths) + t
        token_B = np.array([seq[p] for seq, p in zip(sequences, position_B)], np.int32)
        hidden_BxD, cache = model.decode(jnp.asarray(token_B), jnp.asarray(position_B), cache)
        logits_BxV = model.logits(hidden_BxD)
        for row, (seq, p) in enumerate(zip(sequences, position_B)):
            expected_V = model(jnp.asarray(seq[None, : p + 1]))[0, -1]
            np.testing.assert_allclose(logits_BxV[row], expected_V, rtol=1e-5, atol=1e-5, err_msg=f"row {row} t {t}")


def test_cached_generation_equals_greedy_without_cache_on_rows_of_different_lengths():
    graphdef, params = _model()
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(4)
    # Sorted by length into batches of 4: [1, 3, 5, 10] in a 16-wide buffer that the longest row
    # fills to its last slot, then [15, 21] with two empty rows in a 32-wide one.
    prompts = [np.concatenate([[1], rng.integers(3, 64, n)]).astype(np.int32) for n in (0, 9, 4, 14, 2, 20)]
    outputs = generate_answers(graphdef, params, prompts, max_new_tokens=6, temperature=0.0, batch_size=4, seed=0)
    for prompt, output in zip(prompts, outputs):
        assert output == _greedy_without_cache(model, prompt, 6)


def test_sampling_is_seeded():
    graphdef, params = _model()
    prompts = [np.array([1, 5, 6, 7], np.int32)] * 4
    run = lambda seed: generate_answers(  # noqa: E731
        graphdef, params, prompts, max_new_tokens=4, temperature=1.0, batch_size=4, seed=seed
    )
    assert run(0) == run(0)
    assert run(0) != run(1)
