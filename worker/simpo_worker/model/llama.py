"""Llama in equinox: the full-sequence forward that training uses (the inference engine decodes with the same
building blocks, rms_norm / rotary / attention math, over its own KV-cache layout).

Layout choices, for speed and sharding:
- Weights are plain arrays in `x @ W` orientation ([in, out]); HF stores [out, in], the loaders transpose.
- The decoder layers are stacked on a leading axis and run with `lax.scan`: one layer is traced and compiled
  once, whatever the depth (30 layers for SmolLM2), which keeps compile time flat.
- Rotary embeddings use HF's rotate-half convention (GGUF's interleaved q/k layout is undone when loading).
- Positions are explicit per token; sequences are right-padded, so the causal rule `key position <= query
  position` alone keeps real tokens from attending to padding.

Memory (MemoryOptions, from the trainer config): the training forward can trade compute for memory without
changing its result beyond float rounding: rematerialised decoder layers (the backward recomputes a layer's
activations from its input instead of keeping them), blockwise attention (model.attention: no [T, T] scores), and
per-token log-probs of the targets computed a chunk of positions at a time (no [sequences, T, vocab] float32
logits, each chunk recomputed in the backward).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from simpo_worker.contract.config import (DEFAULT_ATTENTION_BLOCK, DEFAULT_LOSS_CHUNK_TOKENS, ArchitectureConfig,
                                          TrainerConfig)
from simpo_worker.model.attention import blockwise_attention
from simpo_worker.model.layout import constrain_batch

WEIGHT_MATMUL = "weight_matmul"  # linear's outputs, by name (a custom VJP hides its dot from dot-based policies)

# What the backward pass keeps of a decoder layer's forward (jax.checkpoint policies); the rest is recomputed.
REMAT_POLICIES = {
    "full": None,  # only the layer's input: the whole layer runs again in the backward
    "dots": jax.checkpoint_policies.save_only_these_names(WEIGHT_MATMUL),  # the weight matmuls' outputs (linear)
}


@dataclass(frozen=True)
class MemoryOptions:
    """How the training forward trades compute for memory (see the module docstring). The defaults are the
    trainer config's (`trainer.remat`, `attention`, `attention_block_size`, `loss_chunk_tokens`); PLAIN is the
    path without any of it. Hashable: it is part of what fixes a compiled program."""

    remat: str = "auto"  # "none" | a REMAT_POLICIES key | "auto" (see `resolve`)
    attention_block: int = DEFAULT_ATTENTION_BLOCK  # 0: dense attention; else blockwise with this block size
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS  # 0: logits of every position at once; else per chunk

    @classmethod
    def from_config(cls, trainer: TrainerConfig) -> "MemoryOptions":
        return cls(remat=trainer.remat,
                   attention_block=trainer.attention_block_size if trainer.attention == "blockwise" else 0,
                   loss_chunk_tokens=trainer.loss_chunk_tokens)

    def resolve(self, platform: str) -> "MemoryOptions":
        """remat "auto" made concrete for the devices the step runs on: "full" on accelerators (TPU, GPU), where
        memory is what limits the model and batch and a third more compute is the usual price; "none" on CPU,
        where host memory is plentiful and compute is the bottleneck."""
        if self.remat != "auto":
            return self
        return dataclasses.replace(self, remat="none" if platform == "cpu" else "full")


PLAIN = MemoryOptions(remat="none", attention_block=0, loss_chunk_tokens=0)


class DecoderLayers(eqx.Module):
    """All decoder layers' weights, stacked on a leading layer axis L."""

    attn_norm: Float[Array, "L d"]
    wq: Float[Array, "L d qd"]
    wk: Float[Array, "L d kvd"]
    wv: Float[Array, "L d kvd"]
    wo: Float[Array, "L qd d"]
    mlp_norm: Float[Array, "L d"]
    w_gate: Float[Array, "L d f"]
    w_up: Float[Array, "L d f"]
    w_down: Float[Array, "L f d"]


class Llama(eqx.Module):
    config: ArchitectureConfig = eqx.field(static=True)
    embed: Float[Array, "V d"]
    layers: DecoderLayers
    final_norm: Float[Array, "d"]
    # None when the output head is tied to the embedding.
    lm_head: Optional[Float[Array, "d V"]]

    def __call__(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"],
                 compute_dtype=jnp.float32) -> Float[Array, "B T V"]:
        """Logits (float32) for every token."""
        return self.logits(self.hidden_states(tokens, positions, compute_dtype))

    def hidden_states(self, tokens, positions, compute_dtype=jnp.float32, memory: MemoryOptions = PLAIN):
        """Final-normed hidden states [B, T, d] in compute_dtype."""
        c = self.config
        cos, sin = rotary_tables(c, positions)
        x = constrain_batch(self.embed.astype(compute_dtype)[tokens])
        layers = jax.tree.map(lambda w: w.astype(compute_dtype), self.layers)

        def layer(x, w):
            return decoder_layer(c, w, x, positions, cos, sin, memory.attention_block)

        if memory.remat == "auto":
            raise ValueError("MemoryOptions.remat 'auto' must be resolved for a platform first (resolve())")
        if memory.remat != "none":
            # prevent_cse=False: inside a scan the recomputation cannot be merged with the forward anyway.
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[memory.remat], prevent_cse=False)
        x, _ = jax.lax.scan(lambda x, w: (layer(x, w), None), x, layers)
        return rms_norm(x, self.final_norm, c.rms_norm_eps)

    @property
    def head(self) -> Float[Array, "d V"]:
        """The output head (float32 params; the embedding transposed when tied)."""
        return self.embed.T if self.lm_head is None else self.lm_head

    def logits(self, hidden: Float[Array, "B T d"]) -> Float[Array, "B T V"]:
        return _logits(hidden, self.head)

    def target_logps(self, hidden: Float[Array, "B T d"], targets: Int[Array, "B T"],
                     chunk_tokens: int = 0) -> Float[Array, "B T"]:
        """log p(targets[b, t]) under the logits of hidden[b, t] (float32), without a [B, T, V] log-prob tensor.

        With chunk_tokens > 0 (and T longer than that), the logits exist for chunk_tokens positions of every
        sequence at a time: a scan over chunks whose body is checkpointed, so the backward recomputes each chunk's
        logits rather than keeping them. The head enters each chunk as float32 params (cast inside), so its
        gradient accumulates over chunks in float32."""
        batch, length, width = hidden.shape
        if not chunk_tokens or length <= chunk_tokens:
            return _target_logps(self.logits(hidden), targets)
        extra = -length % chunk_tokens
        hidden = jnp.pad(hidden, [(0, 0), (0, extra), (0, 0)])
        targets = jnp.pad(targets, [(0, 0), (0, extra)])
        # [chunks, B, chunk_tokens, ...]: the batch axis (the sharded one) stays whole in every chunk.
        hidden = jnp.moveaxis(hidden.reshape(batch, -1, chunk_tokens, width), 1, 0)
        targets = jnp.moveaxis(targets.reshape(batch, -1, chunk_tokens), 1, 0)

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def chunk(head, hidden, targets):
            return _target_logps(_logits(hidden, head), targets)

        _, logps = jax.lax.scan(lambda _, xs: (None, chunk(self.head, *xs)), None, (hidden, targets))
        return jnp.moveaxis(logps, 0, 1).reshape(batch, -1)[:, :length]


def _logits(hidden, head):
    # Accumulated and returned in float32 (free on the MXU): bfloat16 logits lose the differences between
    # tokens that the log-softmax and sampling depend on.
    return linear(hidden, head.astype(hidden.dtype), jnp.float32)


def linear(x: Float[Array, "... d"], w: Float[Array, "d n"], out_dtype=None) -> Float[Array, "... n"]:
    """x @ w, accumulated in float32 and returned in `out_dtype` (default x's); the backward's matmuls take their
    operands and return their results in the compute dtype.

    One 2-D matmul over every token: on [B, T, d] the weight gradient is a dot contracting two token axes, which
    XLA:CPU lowers through a transposed copy of the output gradient, a strided loop that took a quarter of the
    CPU train step (bench/profile_cpu.py); flattened, the smaller operand is transposed instead (same sums, same
    bits). The float32 accumulation is explicit because backends differ when it is not: XLA:CPU on an
    AVX512-BF16 machine rounded bfloat16 products further from float32 than HF's bfloat16 forward does
    (test_model_parity's bfloat16 anchor); the MXU accumulates in float32 anyway. The custom VJP keeps autodiff
    from running the backward's matmuls in float32 (a float32 cotangent against bfloat16 operands) and from
    summing the gradients across chips in float32."""
    y = _matmul_f32_accumulate(x.reshape(-1, x.shape[-1]), w)
    y = y.reshape(*x.shape[:-1], w.shape[-1]).astype(out_dtype or x.dtype)
    return checkpoint_name(y, WEIGHT_MATMUL)


@jax.custom_vjp
def _matmul_f32_accumulate(x, w):
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _matmul_forward(x, w):
    return _matmul_f32_accumulate(x, w), (x, w)


def _matmul_backward(residuals, cotangent):
    x, w = residuals
    cotangent = cotangent.astype(x.dtype)
    # In the operands' dtype, as autodiff of a plain matmul computes them: a float32 result here would be summed
    # across chips in float32 (the gradients' reduce-scatter and all-reduce at twice the bytes).
    return jnp.matmul(cotangent, w.T), jnp.matmul(x.T, cotangent)


_matmul_f32_accumulate.defvjp(_matmul_forward, _matmul_backward)


def _target_logps(logits, targets):
    """log_softmax at the target only: logit[target] - logsumexp(logits)."""
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def decoder_layer(c: ArchitectureConfig, w: DecoderLayers, x, positions, cos, sin, attention_block: int = 0):
    """One pre-norm Llama block. `w` holds a single layer's weights (no L axis)."""
    return decoder_layer_with_kv(c, w, x, positions, cos, sin, attention_block)[0]


def decoder_layer_with_kv(c: ArchitectureConfig, w: DecoderLayers, x, positions, cos, sin,
                          attention_block: int = 0):
    """The block's output and the rotated keys and values it attended to (the inference engine's prefill
    stores them in its KV cache). attention_block > 0: blockwise attention for sequences longer than a block."""
    batch, length, _ = x.shape
    q, k, v = attention_inputs(c, w, x, cos, sin)
    with jax.named_scope("attention"):  # scopes name the work in profiles (bench/profile_cpu.py, xprof)
        if 0 < attention_block < length:
            attn = blockwise_attention(q, k, v, positions, positions, attention_block)
        else:
            mask = positions[:, None, :] <= positions[:, :, None]  # [B, T(query), S(key)]
            attn = grouped_query_attention(q, k, v, mask)
    x = x + linear(attn.reshape(batch, length, -1), w.wo)
    return mlp_residual(c, w, x), k, v


def attention_inputs(c: ArchitectureConfig, w: DecoderLayers, x, cos, sin):
    """Pre-norm, then rotated queries [B, T, heads, hd], rotated keys and values [B, T, kv_heads, hd]."""
    batch, length, _ = x.shape
    hd = c.resolved_head_dim
    h = rms_norm(x, w.attn_norm, c.rms_norm_eps)
    q = apply_rotary(linear(h, w.wq).reshape(batch, length, c.num_heads, hd), cos, sin)
    k = apply_rotary(linear(h, w.wk).reshape(batch, length, c.num_kv_heads, hd), cos, sin)
    v = linear(h, w.wv).reshape(batch, length, c.num_kv_heads, hd)
    return q, k, v


def mlp_residual(c: ArchitectureConfig, w: DecoderLayers, x):
    """x plus the pre-norm SwiGLU MLP of x."""
    h = rms_norm(x, w.mlp_norm, c.rms_norm_eps)
    return x + linear(jax.nn.silu(linear(h, w.w_gate)) * linear(h, w.w_up), w.w_down)


def grouped_query_attention(q, k, v, mask):
    """q [B,T,H,hd], k/v [B,S,KV,hd], mask [B,T,S] -> [B,T,H,hd]. Softmax in float32."""
    batch, length, heads, hd = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, length, heads, hd)


def rms_norm(x, weight, eps):
    """As HF: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(c: ArchitectureConfig) -> jax.Array:
    dim = c.resolved_head_dim
    inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    s = c.rope_scaling
    if s is None:
        return inv_freq
    # Llama-3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rotary_tables(c: ArchitectureConfig, positions):
    """cos/sin [B, T, hd] in float32 for the given positions (rotate-half layout: frequencies repeated)."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(c)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x, cos, sin):
    """x [B, T, heads, hd]; rotate-half convention as HF Llama."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def init_llama(config: ArchitectureConfig, key: jax.Array, std: float = 0.02) -> Llama:
    """Random init as HF: normal(0, std) matrices, unit norms."""
    c = config
    d, f, hd, L = c.hidden_size, c.intermediate_size, c.resolved_head_dim, c.num_layers
    keys = iter(jax.random.split(key, 9))

    def normal(*shape):
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    layers = DecoderLayers(
        attn_norm=jnp.ones((L, d)),
        wq=normal(L, d, c.num_heads * hd),
        wk=normal(L, d, c.num_kv_heads * hd),
        wv=normal(L, d, c.num_kv_heads * hd),
        wo=normal(L, c.num_heads * hd, d),
        mlp_norm=jnp.ones((L, d)),
        w_gate=normal(L, d, f),
        w_up=normal(L, d, f),
        w_down=normal(L, f, d),
    )
    return Llama(
        config=c,
        embed=normal(c.vocab_size, d),
        layers=layers,
        final_norm=jnp.ones((d,)),
        lm_head=None if c.tie_word_embeddings else normal(d, c.vocab_size),
    )


def count_params(model: Llama) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
