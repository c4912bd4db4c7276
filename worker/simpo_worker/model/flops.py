"""FLOPs and bytes of the worker's programs, counted from the architecture and the shapes they run at.

Why not XLA's cost analysis: it counts a loop body once, whatever its trip count, and the training forward is a
`lax.scan` over the layers (the decode loop a `while_loop` over tokens), so its figure leaves out nearly all of the
work. These are the standard dense counts instead (2 FLOPs per multiply-add):
- every weight matmul: 2 x params x tokens forward, twice that backward (6 x params x tokens for a train step);
- attention as the code computes it: scores and the value matmul over the whole [queries, keys] square
  (2 x 2 x queries x keys x query width per layer; the causal half is masked, not skipped);
- the output head on every training position, and on one position per row at inference.
Norms, rotary embeddings, softmax and sampling are left out (under 1 % at Llama sizes).
"""

from __future__ import annotations

from simpo_worker.contract.config import ArchitectureConfig


def layer_matmul_params(a: ArchitectureConfig) -> int:
    """Weights of one decoder layer's matmuls: q, k, v, o projections and the SwiGLU MLP."""
    q_width, kv_width = a.num_heads * a.resolved_head_dim, a.num_kv_heads * a.resolved_head_dim
    return a.hidden_size * (q_width + 2 * kv_width) + q_width * a.hidden_size + 3 * a.hidden_size * a.intermediate_size


def head_params(a: ArchitectureConfig) -> int:
    return a.hidden_size * a.vocab_size


def param_count(a: ArchitectureConfig) -> int:
    """Every parameter: the matmuls, the embedding (a separate output head unless tied) and the norms."""
    embeddings = a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
    norms = (2 * a.num_layers + 1) * a.hidden_size
    return a.num_layers * layer_matmul_params(a) + embeddings + norms


def _attention(a: ArchitectureConfig, queries: int, keys: int) -> float:
    """Scores and value matmul of one sequence, all layers."""
    return 4.0 * a.num_layers * queries * keys * a.num_heads * a.resolved_head_dim


def forward_flops(a: ArchitectureConfig, sequences: int, length: int, head_positions: int) -> float:
    """One forward over `sequences` x `length` tokens, with the output head on `head_positions` per sequence."""
    matmuls = 2.0 * sequences * (length * a.num_layers * layer_matmul_params(a) + head_positions * head_params(a))
    return matmuls + sequences * _attention(a, length, length)


def train_step_flops(a: ArchitectureConfig, pairs: int, seq_len: int) -> float:
    """One optimizer step over `pairs` preference pairs (chosen + rejected, seq_len tokens each): forward and
    backward (2x the forward) of 2 x pairs sequences; the model reads seq_len - 1 tokens and predicts the next."""
    positions = seq_len - 1
    return 3.0 * forward_flops(a, 2 * pairs, positions, positions)


def layers_forward_flops(a: ArchitectureConfig, pairs: int, seq_len: int) -> float:
    """The decoder layers' forward of a train step's sequences, head excluded: what full rematerialisation runs a
    second time in the backward (hardware FLOPs beyond the model FLOPs above)."""
    return forward_flops(a, 2 * pairs, seq_len - 1, 0)


def prefill_flops(a: ArchitectureConfig, rows: int, prompt_length: int) -> float:
    """The prompt forward of `rows` padded prompts; the head only at each row's last prompt token."""
    return forward_flops(a, rows, prompt_length, 1)


def decode_step_flops(a: ArchitectureConfig, rows: int, window: int) -> float:
    """One token for each of `rows` rows, attending over a cache of `window` slots (the whole window is read)."""
    return rows * (2.0 * (a.num_layers * layer_matmul_params(a) + head_params(a)) + _attention(a, 1, window))

