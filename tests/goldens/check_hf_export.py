"""The peers' anchor for the Hugging Face export: transformers' LlamaForCausalLM.from_pretrained loads what
export_hf writes, with no missing, unexpected or mismatched tensors, and its float32 logits match our forward of
the params that were exported; for SmolLM2 (a GGUF source), AutoTokenizer loads the exported tokenizer and
encodes as ours.

    .venv/bin/python tests/goldens/check_hf_export.py      (make check-hf-export; needs the `peers` extra)

Two models, each exported from params split over a 2 x 2 CPU mesh (fsdp x model), so the gather runs across
shards (SmolLM2 into several safetensors files: a small max_shard_mb):
- the tiny golden Llama (tiny_llama/: GQA, head_dim != hidden / heads, Llama-3 rope scaling, untied head), random
  tokens at positions near 0 and far from it;
- SmolLM2-135M-Instruct (the wheel's GGUF, tied head), real text including a chat-rendered conversation.
Prints the largest |logit| difference of each; exits non-zero past TOLERANCE x the largest |logit|.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402  (the device count is fixed when jax starts)
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from simpo_worker.contract.config import SMOLLM2, ExportConfig, MeshConfig  # noqa: E402
from simpo_worker.data.tokenizer import load_tokenizer  # noqa: E402
from simpo_worker.parallel.mesh import make_mesh  # noqa: E402
from simpo_worker.weights.export import export_hf, tokenizer_files  # noqa: E402
from simpo_worker.weights.hf_load import INDEX_FILE  # noqa: E402
from simpo_worker.weights.pretrained import load_pretrained  # noqa: E402

HERE = Path(__file__).parent
TOLERANCE = 1e-4  # relative to the largest |logit|, as tests/worker/test_model_parity.py
TEXTS = ["The capital of France is",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"]
CHAT = [{"role": "user", "content": "Give me three tips for writing clear Python code."}]


def ours(model, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Our float32 forward of the exported params, gathered onto one device."""
    whole = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), model)
    return np.asarray(jax.jit(whole.__call__)(jnp.asarray(tokens), jnp.asarray(positions)))


def theirs(hf_model, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(tokens), position_ids=torch.from_numpy(positions))
    return out.logits.float().numpy()


def batch(sequences: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Right-padded rows (causal attention: padding after a row's tokens cannot change their logits)."""
    longest = max(len(tokens) for tokens, _ in sequences)
    tokens, positions = np.zeros((len(sequences), longest), np.int64), np.zeros((len(sequences), longest), np.int64)
    for i, (row, pos) in enumerate(sequences):
        tokens[i, :len(row)] = row
        positions[i] = np.arange(pos[0], pos[0] + longest)
    return tokens, positions, [len(row) for row, _ in sequences]


def same_tokenizer(name: str, export_dir: str) -> bool:
    """transformers' AutoTokenizer on the exported tokenizer files: the same ids and chat rendering as ours."""
    ours_tokenizer = load_tokenizer(SMOLLM2)
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    texts = TEXTS + ["Wie viel ist 7 × 8? 🎉  tabs\tand  spaces <|im_end|>"]
    same_ids = all(theirs_tokenizer.encode(t, add_special_tokens=False) == ours_tokenizer.encode(t) for t in texts)
    same_chat = (theirs_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
                 == ours_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    print(f"{name}: transformers' AutoTokenizer on the exported tokenizer: ids {'equal' if same_ids else 'DIFFER'}, "
          f"chat template {'equal' if same_chat else 'DIFFERS'}")
    return same_ids and same_chat


def check(name: str, source: str, sequences: list[tuple[np.ndarray, np.ndarray]], max_shard_mb: int) -> bool:
    model = load_pretrained(source, make_mesh(MeshConfig(data=1, fsdp=2, model=2)))
    files = tokenizer_files(SMOLLM2, load_tokenizer(SMOLLM2)) if source == SMOLLM2 else {}
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp, ExportConfig(hf_dir=tmp, max_shard_mb=max_shard_mb), files, 60)
        index = Path(tmp) / INDEX_FILE
        shards = len(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else 1
        hf_model, info = transformers.LlamaForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        if files and not same_tokenizer(name, tmp):
            return False
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:
        print(f"{name}: transformers did not load the export cleanly: {problems}")
        return False
    hf_model.eval()
    tokens, positions, lengths = batch(sequences)
    a, b = ours(model, tokens, positions), theirs(hf_model, tokens, positions)
    diff = max(float(np.abs(a[i, :n] - b[i, :n]).max()) for i, n in enumerate(lengths))
    scale = max(float(np.abs(b[i, :n]).max()) for i, n in enumerate(lengths))
    ok = diff <= TOLERANCE * scale
    print(f"{name}: {shards} safetensors files; max |logit diff| {diff:.3g} (max |logit| {scale:.3g}, "
          f"relative {diff / scale:.3g}): {'ok' if ok else 'TOO LARGE'}")
    return ok


def main() -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(7)
    tiny = [(rng.integers(0, 256, length).astype(np.int64), np.arange(start, start + length, dtype=np.int64))
            for length, start in [(17, 0), (40, 0), (12, 300)]]
    tokenizer = load_tokenizer(SMOLLM2)
    texts = TEXTS + [tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)]
    smollm2 = [(np.array(ids, np.int64), np.arange(len(ids), dtype=np.int64))
               for ids in (tokenizer.encode(text) for text in texts)]
    results = [check("tiny_llama", str(HERE / "tiny_llama"), tiny, max_shard_mb=1),
               check("smollm2", SMOLLM2, smollm2, max_shard_mb=200)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
