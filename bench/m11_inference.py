"""The reference inference workload on the real model: 128 prompts x 2048 new tokens on one host.

    nice -n 10 .venv/bin/python bench/m11_inference.py [--batch-size 32] [--measure-prompts 128]

Two runs of SmolLM2-135M-Instruct (f32) on the synthetic chat prompts, host_data_parallel on this host's devices:
1. ignore_eos: exactly 2048 tokens per prompt (128 x 2048 = 262,144 tokens): wall-clock and tokens/s.
2. EOS honoured: the tokens actually generated, wall-clock, and the slot utilisation (generated tokens / batch
   rows x sampling steps the engine ran, after compaction): what continuous refill of finished slots could win
   back at most.
On a slow machine, `--measure-prompts N` runs only the first N prompts (whole waves) and extrapolates to all of
them linearly; the output says so. Wall-clock includes compilation (the compile count is printed).
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from simpo_worker.contract.config import InferenceConfig
from simpo_worker.data.prompts import render_prompts, synthetic_prompts
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.infer.engine import Engine
from simpo_worker.weights.pretrained import load_pretrained


def run(model, tokenizer, prompts, args, ignore_eos: bool) -> None:
    label = "ignore_eos" if ignore_eos else "EOS honoured"
    inference = InferenceConfig(max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
                                batch_size=args.batch_size, ignore_eos=ignore_eos)
    engine = Engine(model.config, inference, eos_token_ids=tokenizer.eos_token_ids)
    measured = prompts[:args.measure_prompts]
    bar = tqdm(total=len(measured) * args.max_new_tokens if ignore_eos else None, unit="tok", desc=label)

    def progress(done: int, tokens: int) -> None:
        bar.update(tokens - bar.n)

    start = time.perf_counter()
    completions = engine.generate(model, measured, list(range(len(measured))), step=0, seed=0, progress=progress)
    wall = time.perf_counter() - start
    bar.close()
    tokens = sum(len(c.token_ids) for c in completions)
    scale = len(prompts) / len(measured)
    print(f"\n== {label}: {len(measured)} prompts x max {args.max_new_tokens} new tokens, batch {args.batch_size} ==")
    print(f"measured: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s; {engine.compilations} compilations")
    if scale != 1:
        print(f"EXTRAPOLATED to {len(prompts)} prompts (x{scale:g}, linear in waves): {tokens * scale:.0f} tokens, "
              f"{wall * scale:.1f} s wall-clock")
    if not ignore_eos:
        reasons = [c.finish_reason for c in completions]
        lengths = sorted(len(c.token_ids) for c in completions)
        print(f"finish: {reasons.count('stop')} stop, {reasons.count('length')} length; completion tokens "
              f"min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}; slot utilisation "
              f"{tokens / engine.row_steps:.0%} ({tokens} of {engine.row_steps} row-steps; {engine.compactions} "
              "compactions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--measure-prompts", type=int, help="run only the first N prompts (whole waves) and "
                        "extrapolate; default: all")
    parser.add_argument("--only", choices=["ignore_eos", "eos"])
    args = parser.parse_args()
    args.measure_prompts = args.measure_prompts or args.prompts
    if args.measure_prompts < args.prompts and args.measure_prompts % args.batch_size:
        parser.error("--measure-prompts must be a multiple of --batch-size (whole waves)")

    model = load_pretrained("smollm2")
    tokenizer = load_tokenizer("smollm2")
    prompts = render_prompts(synthetic_prompts(args.prompts), tokenizer, args.max_prompt_len).token_ids
    print(f"SmolLM2-135M-Instruct f32, {args.prompts} synthetic chat prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens)")
    if args.only != "eos":
        run(model, tokenizer, prompts, args, ignore_eos=True)
    if args.only != "ignore_eos":
        run(model, tokenizer, prompts, args, ignore_eos=False)


if __name__ == "__main__":
    main()
