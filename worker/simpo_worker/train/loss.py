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

from simpo_worker.contract.config import SimpoConfig
from simpo_worker.model.llama import PLAIN, Llama, MemoryOptions


def response_logps(model: Llama, tokens, loss_mask, compute_dtype=jnp.float32,
                   memory: MemoryOptions = PLAIN):
    """Sum of log p(token_t | tokens_<t) over response tokens, and their count, per sequence.

    tokens, loss_mask: [N, T]; loss_mask[n, t] = 1 where token t is a response token (a prediction target).
    `memory`: remat, blockwise attention, chunked logits (model.MemoryOptions); the same result either way.
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden = model.hidden_states(tokens[:, :-1], positions[:, :-1], compute_dtype, memory)
    with jax.named_scope("loss"):
        token_logps = model.target_logps(hidden, tokens[:, 1:], memory.loss_chunk_tokens)
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(token_logps * mask, axis=-1), jnp.sum(mask, axis=-1)


def pair_terms(chosen_avg_logps, rejected_avg_logps, simpo: SimpoConfig) -> dict[str, jax.Array]:
    """Per pair: the SimPO loss and each reward metric, [B] each. The train step reports their means over its batch
    (simpo_loss), held-out evaluation their means over the whole held-out set (batch_sums).

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
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "logps/chosen": chosen_avg_logps,
        "logps/rejected": rejected_avg_logps,
        "loss": losses,
    }


def simpo_loss(chosen_avg_logps, rejected_avg_logps, simpo: SimpoConfig):
    """Mean SimPO loss over pairs, and the per-step metrics (means over pairs)."""
    metrics = {name: jnp.mean(value) for name, value in
               pair_terms(chosen_avg_logps, rejected_avg_logps, simpo).items()}
    return metrics["loss"], metrics


def pair_avg_logps(model: Llama, tokens, loss_mask, compute_dtype=jnp.float32, memory: MemoryOptions = PLAIN):
    """Average log-probability of each response, [B, 2] (0 chosen, 1 rejected). tokens, loss_mask: [B, 2, T].

    Chosen and rejected run as one forward of 2B sequences.
    """
    pairs, _, length = tokens.shape
    sums, counts = response_logps(model, tokens.reshape(2 * pairs, length),
                                  loss_mask.reshape(2 * pairs, length), compute_dtype, memory)
    return (sums / jnp.maximum(counts, 1.0)).reshape(pairs, 2)


def batch_loss(model: Llama, tokens, loss_mask, lengths, simpo: SimpoConfig, compute_dtype=jnp.float32,
               memory: MemoryOptions = PLAIN):
    """SimPO loss of a batch of pairs. tokens, loss_mask: [B, 2, T], index 0 chosen, 1 rejected;
    lengths [B, 2]: non-padding tokens per sequence (for the `tokens` metric)."""
    avg_logps = pair_avg_logps(model, tokens, loss_mask, compute_dtype, memory)
    loss, metrics = simpo_loss(avg_logps[:, 0], avg_logps[:, 1], simpo)
    metrics["tokens"] = jnp.sum(lengths)
    return loss, metrics


def batch_sums(model: Llama, tokens, loss_mask, lengths, pair_mask, simpo: SimpoConfig, compute_dtype=jnp.float32,
               memory: MemoryOptions = PLAIN) -> dict[str, jax.Array]:
    """Held-out evaluation of a batch: each of batch_loss's metrics summed over the batch's pairs rather than
    averaged, `pairs` their count. pair_mask [B]: 1 for a pair, 0 for a padding row (which counts nowhere), so the
    sums of all batches divided by the pairs are the means over the whole held-out set."""
    avg_logps = pair_avg_logps(model, tokens, loss_mask, compute_dtype, memory)
    real = pair_mask > 0
    sums = {name: jnp.sum(jnp.where(real, value, 0.0))
            for name, value in pair_terms(avg_logps[:, 0], avg_logps[:, 1], simpo).items()}
    sums["tokens"] = jnp.sum(jnp.where(real[:, None], lengths, 0))
    sums["pairs"] = jnp.sum(real.astype(jnp.int32))
    return sums
