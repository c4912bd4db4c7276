"""Blockwise (flash-style) causal grouped-query attention for training, in portable JAX.

The dense attention (model.grouped_query_attention) materialises [batch, heads, T, T] float32 scores and
probabilities, and its backward keeps them: at 2048 tokens and 32 heads that is 512 MiB per sequence per layer.
Here queries and keys are cut into blocks of `block` tokens; for each query block a `lax.scan` over the key
blocks keeps a running max, normaliser and output (the online softmax), so a step holds one
[batch, heads, block, block] score tile. The backward is a custom VJP that recomputes each tile from q, k and
the saved per-query log-sum-exp, as FlashAttention does: the only residuals are the inputs, the output and the
log-sum-exp. Tiles that the causal rule masks entirely (every key after every query of the tile) are skipped.

The math is the dense path's: the causal rule `key position <= query position` from explicit positions, scores
scaled by 1/sqrt(head_dim) and masked to the float32 minimum, softmax in float32, matmuls on compute-dtype inputs
with float32 accumulation. In float32 it agrees with the dense path to rounding (tests/worker/test_memory.py).
llama.py sends sequences no longer than one block down the dense path itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_F32 = jnp.float32
# Padding tokens get this position: padded keys are after every real query (masked), padded queries see every
# key (finite results, sliced off).
_PAD_POSITION = jnp.iinfo(jnp.int32).max


def blockwise_attention(q, k, v, q_positions, k_positions, block: int):
    """q [B,T,H,hd], k/v [B,S,KV,hd], positions [B,T] / [B,S] -> [B,T,H,hd] in q's dtype."""
    batch, length, heads, hd = q.shape
    kv_heads = k.shape[2]
    q, q_positions = _pad(q, q_positions, block)
    v, _ = _pad(v, k_positions, block)
    k, k_positions = _pad(k, k_positions, block)
    # Blocks on a leading axis: q [nq, B, block, KV, G, hd], k/v [nk, B, block, KV, hd], positions [n, B, block].
    qb = _blocks(q.reshape(batch, -1, kv_heads, heads // kv_heads, hd), block)
    kb, vb = _blocks(k, block), _blocks(v, block)
    out = _flash(qb, kb, vb, _blocks(q_positions, block), _blocks(k_positions, block))
    out = jnp.moveaxis(out, 0, 1).reshape(batch, -1, heads, hd)
    return out[:, :length]


def _pad(x, positions, block):
    extra = -x.shape[1] % block
    if not extra:
        return x, positions
    x = jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
    return x, jnp.pad(positions, [(0, 0), (0, extra)], constant_values=_PAD_POSITION)


def _blocks(x, block):
    """[B, n * block, ...] -> [n, B, block, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _needed(q_positions, k_positions):
    """[nq, nk]: whether any key of key block j may be seen by some query of query block i."""
    return k_positions.min(axis=(1, 2))[None, :] <= q_positions.max(axis=(1, 2))[:, None]


def _scores(q, k, q_positions, k_positions):
    """One tile: q [B,bq,KV,G,hd], k [B,bk,KV,hd] -> masked float32 scores [B,KV,G,bq,bk]."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(_F32) / math.sqrt(q.shape[-1])
    mask = k_positions[:, None, :] <= q_positions[:, :, None]  # [B, bq, bk]
    return jnp.where(mask[:, None, None], scores, jnp.finfo(_F32).min)


def _forward(qb, kb, vb, qpos, kpos):
    """Outputs [nq, B, bq, KV, G, hd] (q's dtype) and log-sum-exp [nq, B, KV, G, bq] (float32)."""
    needed = _needed(qpos, kpos)

    def query_block(args):
        q, q_pos, need = args
        batch, bq, kv_heads, groups, hd = q.shape
        stats = (jnp.full((batch, kv_heads, groups, bq), jnp.finfo(_F32).min, _F32),  # running max
                 jnp.zeros((batch, kv_heads, groups, bq), _F32),                      # normaliser
                 jnp.zeros((batch, kv_heads, groups, bq, hd), _F32))                  # unnormalised output

        def key_block(carry, args):
            k, v, k_pos, need_tile = args

            def tile(carry):
                m, l, acc = carry
                s = _scores(q, k, q_pos, k_pos)
                m_new = jnp.maximum(m, s.max(axis=-1))
                correction = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new[..., None])
                pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v, preferred_element_type=_F32)
                return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

            return jax.lax.cond(need_tile, tile, lambda c: c, carry), None

        (m, l, acc), _ = jax.lax.scan(key_block, stats, (kb, vb, kpos, need))
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        # No key at all (only when every tile was skipped): out 0, and +inf makes the backward's p exactly 0.
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return jnp.moveaxis(out, 3, 1).astype(q.dtype), lse

    return jax.lax.map(query_block, (qb, qpos, needed))


@jax.custom_vjp
def _flash(qb, kb, vb, qpos, kpos):
    return _forward(qb, kb, vb, qpos, kpos)[0]


def _flash_fwd(qb, kb, vb, qpos, kpos):
    # Under a checkpoint, so that autodiff's partial evaluation cannot hoist the parts that depend on positions
    # alone (the tile masks) out of an enclosing scan, such as the one over the decoder layers, as stacked
    # [query blocks, key blocks, tile] residuals, i.e. the whole [T, T] mask again.
    out, lse = jax.checkpoint(_forward, policy=jax.checkpoint_policies.nothing_saveable)(qb, kb, vb, qpos, kpos)
    return out, (qb, kb, vb, qpos, kpos, out, lse)


def _flash_bwd(residuals, d_out):
    qb, kb, vb, qpos, kpos, out, lse = residuals
    needed = _needed(qpos, kpos)
    # D_i = rowsum(dO_i * O_i): the softmax backward's per-query term.
    delta = jnp.einsum("nbtkgd,nbtkgd->nbkgt", d_out.astype(_F32), out.astype(_F32))
    dtype = qb.dtype

    def key_block(dq, args):
        k, v, k_pos, need_column = args

        def query_block(carry, args):
            q, q_pos, do, lse_i, delta_i, need_tile = args

            def tile(carry):
                dk, dv = carry
                s = _scores(q, k, q_pos, k_pos)
                p = jnp.exp(s - lse_i[..., None])  # the forward's probabilities, recomputed
                dv = dv + jnp.einsum("bkgts,btkgd->bskd", p.astype(dtype), do, preferred_element_type=_F32)
                dp = jnp.einsum("btkgd,bskd->bkgts", do, v, preferred_element_type=_F32)
                ds = (p * (dp - delta_i[..., None]) / math.sqrt(q.shape[-1])).astype(dtype)
                dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds, q, preferred_element_type=_F32)
                dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=_F32)
                return (dk, dv), dq

            def skip(carry):
                return carry, jnp.zeros(q.shape, _F32)

            return jax.lax.cond(need_tile, tile, skip, carry)

        zeros = jnp.zeros(k.shape, _F32)
        (dk, dv), dq_column = jax.lax.scan(query_block, (zeros, zeros),
                                           (qb, qpos, d_out, lse, delta, need_column))
        return dq + dq_column, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, _F32), (kb, vb, kpos, needed.T))
    return dq.astype(dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
