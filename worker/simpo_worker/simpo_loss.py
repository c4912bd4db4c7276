"""SimPO (Meng, Xia, Chen 2024): reference-free, length-normalised preference loss.

    r(x, y)  = beta * avg_logp(y | x)                        (average over response tokens only)
    loss     = -log sigmoid(r(x, y_w) - r(x, y_l) - gamma),   gamma = gamma_beta_ratio * beta

With label smoothing eps the loss is the conservative mix (as the authors' trainer):
    (1 - eps) * -log sigmoid(z) + eps * -log sigmoid(-z),    z = r_w - r_l - gamma
and an optional SFT term adds `sft_weight * -avg_logp(y_w | x)`.

Defaults (SimpoConfig) are the published Llama-3-Instruct recipe: beta 2.5, gamma_beta_ratio 0.55.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from simpo_worker.config import SimpoConfig
from simpo_worker.model import PLAIN, Llama, MemoryOptions


def response_logps(model: Llama, tokens, loss_mask, compute_dtype=jnp.float32,
                   memory: MemoryOptions = PLAIN):
    """Sum of log p(token_t | tokens_<t) over response tokens, and their count, per sequence.

    tokens, loss_mask: [N, T]; loss_mask[n, t] = 1 where token t is a response token (a prediction target).
    `memory`: remat, blockwise attention, chunked logits (model.MemoryOptions); the same result either way.
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden = model.hidden_states(tokens[:, :-1], positions[:, :-1], compute_dtype, memory)
    token_logps = model.target_logps(hidden, tokens[:, 1:], memory.loss_chunk_tokens)
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(token_logps * mask, axis=-1), jnp.sum(mask, axis=-1)


def simpo_loss(chosen_avg_logps, rejected_avg_logps, simpo: SimpoConfig):
    """Mean SimPO loss over pairs, and the per-step metrics (means over pairs).

    chosen_avg_logps, rejected_avg_logps: [B] average log-probabilities of the responses.
    """
    beta = simpo.beta
    chosen_rewards = beta * chosen_avg_logps
    rejected_rewards = beta * rejected_avg_logps
    z = chosen_rewards - rejected_rewards - simpo.gamma
    eps = simpo.label_smoothing
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    if simpo.sft_weight:
        losses = losses - simpo.sft_weight * chosen_avg_logps
    metrics = {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": jnp.mean(chosen_avg_logps),
        "logps/rejected": jnp.mean(rejected_avg_logps),
    }
    loss = jnp.mean(losses)
    metrics["loss"] = loss
    return loss, metrics


def batch_loss(model: Llama, tokens, loss_mask, lengths, simpo: SimpoConfig, compute_dtype=jnp.float32,
               memory: MemoryOptions = PLAIN):
    """SimPO loss of a batch of pairs. tokens, loss_mask: [B, 2, T], index 0 chosen, 1 rejected;
    lengths [B, 2]: non-padding tokens per sequence (for the `tokens` metric).

    Chosen and rejected run as one forward of 2B sequences.
    """
    pairs, _, length = tokens.shape
    sums, counts = response_logps(model, tokens.reshape(2 * pairs, length),
                                  loss_mask.reshape(2 * pairs, length), compute_dtype, memory)
    avg_logps = (sums / jnp.maximum(counts, 1.0)).reshape(pairs, 2)
    loss, metrics = simpo_loss(avg_logps[:, 0], avg_logps[:, 1], simpo)
    metrics["tokens"] = jnp.sum(lengths)
    return loss, metrics
