"""The SimPO loss and its metrics against a plain NumPy evaluation of the published formula.

NumPy gets only the model's logits; the log-softmax, the response-only length normalisation, the sigmoid loss,
label smoothing, the SFT term and every metric are recomputed here independently.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simpo_worker.contract.config import ArchitectureConfig, SimpoConfig
from simpo_worker.model.llama import init_llama
from simpo_worker.train.loss import batch_loss as eager_batch_loss, simpo_loss

batch_loss = eqx.filter_jit(eager_batch_loss)

TINY = ArchitectureConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2)


def numpy_simpo(logits, tokens, response_mask, beta, gamma_beta_ratio, label_smoothing=0.0, sft_weight=0.0):
    """The published SimPO loss, token by token. logits [N, T-1, V] predict tokens[:, 1:]; N = 2 * pairs."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    avg = []
    for n in range(tokens.shape[0]):
        picked = [log_probs[n, t - 1, tokens[n, t]] for t in range(1, tokens.shape[1]) if response_mask[n, t]]
        avg.append(sum(picked) / len(picked))
    avg = np.array(avg).reshape(-1, 2)
    chosen, rejected = avg[:, 0], avg[:, 1]
    gamma = gamma_beta_ratio * beta
    z = beta * chosen - beta * rejected - gamma
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))
    losses = -(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z) - sft_weight * chosen
    return {
        "loss": losses.mean(),
        "rewards/chosen": (beta * chosen).mean(),
        "rewards/rejected": (beta * rejected).mean(),
        "rewards/margins": (beta * chosen - beta * rejected).mean(),
        "rewards/accuracies": (beta * chosen > beta * rejected).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
    }


def make_batch(pairs=3, length=12, seed=0):
    """Random tokens; per sequence a prompt of varying length, a response of varying length, then padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (pairs, 2, length)).astype(np.int32)
    mask = np.zeros((pairs, 2, length), np.float32)
    lengths = np.zeros((pairs, 2), np.int32)
    for p in range(pairs):
        for j in range(2):
            prompt = rng.integers(1, 5)
            total = rng.integers(prompt + 1, length + 1)
            mask[p, j, prompt:total] = 1.0
            lengths[p, j] = total
    return tokens, mask, lengths


@pytest.mark.parametrize("beta,ratio,smoothing,sft", [
    (2.5, 0.55, 0.0, 0.0),   # the published Llama-3-Instruct recipe
    (10.0, 0.3, 0.0, 0.0),
    (0.5, 1.6, 0.0, 0.0),
    (2.0, 0.5, 0.1, 0.0),    # label smoothing
    (2.0, 0.5, 0.0, 0.3),    # SFT term on chosen
])
def test_batch_loss_matches_numpy_formula(beta, ratio, smoothing, sft):
    model = init_llama(TINY, jax.random.key(1), std=0.5)  # large init: spread-out logits, non-trivial rewards
    tokens, mask, lengths = make_batch()
    simpo = SimpoConfig(beta=beta, gamma_beta_ratio=ratio, label_smoothing=smoothing, sft_weight=sft)
    loss, metrics = batch_loss(model, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths), simpo)

    flat = tokens.reshape(-1, tokens.shape[-1])
    positions = np.broadcast_to(np.arange(flat.shape[1] - 1), (flat.shape[0], flat.shape[1] - 1))
    logits = model(jnp.asarray(flat[:, :-1]), jnp.asarray(positions))
    expected = numpy_simpo(np.asarray(logits), flat, mask.reshape(flat.shape), beta, ratio, smoothing, sft)

    assert float(loss) == pytest.approx(expected["loss"], rel=1e-5)
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert float(metrics["tokens"]) == lengths.sum()


def test_padding_and_prompt_tokens_do_not_count():
    """Changing tokens outside the response mask (after the response) leaves the loss unchanged; inside, not."""
    model = init_llama(TINY, jax.random.key(2), std=0.5)
    tokens, mask, lengths = make_batch(seed=3)
    simpo = SimpoConfig()
    base, _ = batch_loss(model, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths), simpo)
    padded = tokens.copy()
    for p in range(tokens.shape[0]):
        for j in range(2):
            padded[p, j, lengths[p, j]:] = (padded[p, j, lengths[p, j]:] + 1) % TINY.vocab_size
    after_padding, _ = batch_loss(model, jnp.asarray(padded), jnp.asarray(mask), jnp.asarray(lengths), simpo)
    assert float(after_padding) == float(base)
    changed = tokens.copy()
    p, j = 0, 0
    last_response = lengths[p, j] - 1
    changed[p, j, last_response] = (changed[p, j, last_response] + 1) % TINY.vocab_size
    after_response, _ = batch_loss(model, jnp.asarray(changed), jnp.asarray(mask), jnp.asarray(lengths), simpo)
    assert float(after_response) != float(base)


def test_loss_formula_on_fixed_average_logps():
    chosen = jnp.array([-0.5, -1.2, -2.0, -0.1])
    rejected = jnp.array([-0.9, -1.0, -2.6, -3.0])
    for beta, ratio in [(2.5, 0.55), (1.0, 0.0), (8.0, 1.2)]:
        loss, metrics = simpo_loss(chosen, rejected, SimpoConfig(beta=beta, gamma_beta_ratio=ratio))
        z = beta * (np.array(chosen) - np.array(rejected)) - ratio * beta
        assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-z))), rel=1e-6)
        assert float(metrics["rewards/accuracies"]) == 0.75
        assert float(metrics["rewards/margins"]) == pytest.approx(beta * np.mean(np.array(chosen - rejected)),
                                                                  rel=1e-6)
