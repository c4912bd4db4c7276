"""Sampling: top-k/top-p filtering against a NumPy statement of the rule, draws that follow the filtered softmax,
and per-prompt keys built from (seed, step, global index, token index) only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simpo_worker.infer.sampling import SamplingParams, filter_logits, next_tokens, prompt_keys, token_keys


def numpy_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The published rules: keep the k largest, then the smallest prefix of the sorted distribution whose mass
    reaches top_p (the token that crosses it included)."""
    out = logits / temperature
    if top_k:
        kth = np.sort(out, axis=-1)[:, -top_k][:, None]
        out = np.where(out < kth, -np.inf, out)
    if top_p < 1.0:
        for row in out:
            order = np.argsort(-row, kind="stable")
            probs = np.exp(row[order] - row[order][0])
            probs /= probs.sum()
            keep = np.searchsorted(np.cumsum(probs), top_p) + 1
            row[order[keep:]] = -np.inf
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 20, 0.6), (1.0, 1, 1.0)])
def test_filter_matches_the_numpy_rule(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32) * 3
    ours = np.asarray(filter_logits(jnp.asarray(logits), SamplingParams(temperature, top_k, top_p)))
    expected = numpy_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    finite = ~np.isinf(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6)


def test_draws_follow_the_filtered_distribution():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    expected = np.asarray(jax.nn.softmax(filter_logits(logits, params)))[0]
    draws = 20000
    keys = token_keys(prompt_keys(3, 1, jnp.arange(draws)), 0)
    tokens = np.asarray(next_tokens(jnp.broadcast_to(logits, (draws, 6)), keys, params))
    frequencies = np.bincount(tokens, minlength=6) / draws
    assert frequencies[expected == 0].sum() == 0  # filtered tokens never drawn
    np.testing.assert_allclose(frequencies, expected, atol=0.015)


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 0.0]])
    assert np.asarray(next_tokens(logits, None, SamplingParams())).tolist() == [1, 0]


def test_keys_are_a_function_of_seed_step_index_and_token():
    indices = jnp.asarray([5, 9, 2])
    keys = token_keys(prompt_keys(7, 3, indices), 4)
    fold = jax.random.fold_in
    expected = [fold(fold(fold(jax.random.key(7), 3), i), 4) for i in (5, 9, 2)]
    for ours, theirs in zip(keys, expected):
        assert np.array_equal(jax.random.key_data(ours), jax.random.key_data(theirs))
    # The same prompt index gives the same key in any position of the batch.
    swapped = token_keys(prompt_keys(7, 3, indices[::-1]), 4)
    assert np.array_equal(jax.random.key_data(swapped[::-1]), jax.random.key_data(keys))
