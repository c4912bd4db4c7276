"""The SimPO train step on SmolLM2-135M: this project's JAX step against a PyTorch implementation of the same
step (HF LlamaForCausalLM from the same weights, the same loss, torch AdamW with the same clipping).

    python bench/bench_train_step.py [--pairs 4] [--seq-len 128] [--steps 3] [--warmup 1]

Same weights (the SmolLM2 GGUF, dequantized once and saved as an HF float32 checkpoint that both load), same
batch (fixed random tokens: 2 x pairs sequences of seq-len, the first third of each a prompt without loss
weight), same hyperparameters. Each implementation runs in its own fresh process, so the peak RSS it reports is
its own. Tokens/s counts every token of the batch (chosen and rejected) per optimizer step; warmup steps
(JAX's compilation, PyTorch's first-iteration allocations) are not timed. The first step's loss of both must
agree: the two are the same computation.

PyTorch gets its best settings: the fused CPU AdamW, and two thread counts (all CPUs, and 1: on a shared,
oversubscribed machine OpenMP's spinning threads can make torch several times slower); the ratio is taken against
the faster of the two.

Each side also reports (bench/machine.py) the threads it kept busy while stepping (CPU seconds per wall second),
its achieved GFLOP/s (flops.train_step_flops over the step time) and its own library's matmul GFLOP/s on this
step's matmul shapes, forward and backward, one at a time: "matmul share" = achieved / that rate, the most the
step's time could shrink to if everything but its matmuls were free.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import Clock, describe, llama_matmul_shapes, matmul_rate

BETA, GAMMA_BETA_RATIO, LR, MAX_GRAD_NORM = 2.5, 0.55, 1e-5, 1.0


def make_inputs(workdir: Path, pairs: int, seq_len: int) -> None:
    from simpo_worker.weights.hf_save import save_hf_model
    from simpo_worker.weights.pretrained import load_pretrained

    save_hf_model(load_pretrained("smollm2"), str(workdir / "model"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, (pairs, 2, seq_len)).astype(np.int32)
    loss_mask = np.zeros((pairs, 2, seq_len), np.float32)
    loss_mask[:, :, seq_len // 3:] = 1.0
    np.savez(workdir / "batch.npz", tokens=tokens, loss_mask=loss_mask)
    config = load_pretrained("smollm2").config
    (workdir / "matmul_shapes.json").write_text(
        json.dumps(llama_matmul_shapes(config, rows=pairs * 2 * (seq_len - 1), backward=True)))


def run_jax(workdir: Path, steps: int, warmup: int) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from simpo_worker.contract.config import MeshConfig, OptimizerConfig, SimpoConfig
    from simpo_worker.parallel.mesh import make_mesh, place
    from simpo_worker.weights.pretrained import load_pretrained
    from simpo_worker.train.step import CompiledStep, init_state, make_optimizer

    model = load_pretrained(str(workdir / "model"))
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=LR, max_grad_norm=MAX_GRAD_NORM),
                                         steps + warmup)
    state = init_state(model, optimizer)
    step = CompiledStep(state, make_mesh(MeshConfig()), optimizer, schedule,
                        SimpoConfig(beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO), "float32")
    arrays = place(eqx.filter(state, eqx.is_array), step.state_shardings)
    del model, state
    data = np.load(workdir / "batch.npz")
    lengths = np.full(data["tokens"].shape[:2], data["tokens"].shape[2], np.int32)
    batch = {"tokens": jnp.asarray(data["tokens"][None]), "loss_mask": jnp.asarray(data["loss_mask"][None]),
             "lengths": jnp.asarray(lengths[None])}
    losses, times, clock = [], [], Clock()
    for i in range(warmup + steps):
        started = time.perf_counter()
        with clock if i >= warmup else contextlib.nullcontext():
            arrays, metrics = step(arrays, batch)
            losses.append(float(metrics["loss"]))  # blocks until the step is done
        times.append(time.perf_counter() - started)
    peak = peak_rss_mib()  # the step's, before the matmul-rate arrays
    return {"losses": losses, "step_seconds": times[warmup:], "compilations": step.compilations,
            "threads": clock.threads, "peak_rss_mib": peak, "matmul": matmul_rate("jax", matmul_shapes(workdir))}


def run_torch(workdir: Path, steps: int, warmup: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(workdir / "model", torch_dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  fused=True)
    data = np.load(workdir / "batch.npz")
    pairs, _, length = data["tokens"].shape
    tokens = torch.from_numpy(data["tokens"].reshape(2 * pairs, length)).long()
    mask = torch.from_numpy(data["loss_mask"].reshape(2 * pairs, length))[:, 1:]

    def simpo_loss():
        logits = model(input_ids=tokens[:, :-1]).logits.float()
        token_logps = torch.gather(F.log_softmax(logits, -1), 2, tokens[:, 1:, None])[..., 0]
        avg = ((token_logps * mask).sum(-1) / mask.sum(-1)).view(pairs, 2)
        z = BETA * (avg[:, 0] - avg[:, 1]) - GAMMA_BETA_RATIO * BETA
        return -F.logsigmoid(z).mean()

    losses, times, clock = [], [], Clock()
    for i in range(warmup + steps):
        started = time.perf_counter()
        with clock if i >= warmup else contextlib.nullcontext():
            optimizer.zero_grad(set_to_none=True)
            loss = simpo_loss()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            losses.append(loss.item())
        times.append(time.perf_counter() - started)
    peak = peak_rss_mib()
    return {"losses": losses, "step_seconds": times[warmup:], "threads": clock.threads, "peak_rss_mib": peak,
            "matmul": matmul_rate("torch", matmul_shapes(workdir))}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_shapes(workdir: Path) -> list[tuple[int, int, int]]:
    return [tuple(shape) for shape in json.loads((workdir / "matmul_shapes.json").read_text())]


def child(args: argparse.Namespace) -> None:
    if args.impl == "jax":
        result = run_jax(Path(args.workdir), args.steps, args.warmup)
    else:
        result = run_torch(Path(args.workdir), args.steps, args.warmup, args.threads)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--impl", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        workdir = Path(tmp)
        make_inputs(workdir, args.pairs, args.seq_len)
        results = {}
        runs = {"jax": ["--impl", "jax"], "torch": ["--impl", "torch", "--threads", str(os.cpu_count())],
                "torch1": ["--impl", "torch", "--threads", "1"]}
        for impl, extra in runs.items():
            command = [sys.executable, __file__, *extra, "--workdir", tmp, "--steps", str(args.steps),
                       "--warmup", str(args.warmup)]
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
            if done.returncode != 0:
                sys.exit(f"{impl} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
            results[impl] = json.loads(line[len("RESULT "):])

    from simpo_worker.model.flops import train_step_flops
    from simpo_worker.weights.pretrained import load_pretrained

    tokens = args.pairs * 2 * args.seq_len
    step_flops = train_step_flops(load_pretrained("smollm2").config, args.pairs, args.seq_len)
    print("\n".join(describe()))
    print(f"SimPO train step, SmolLM2-135M, {args.pairs} pairs x 2 x {args.seq_len} tokens = {tokens} tokens/step "
          f"({step_flops / 1e9:.0f} GFLOP), float32, {args.steps} timed steps after {args.warmup} warmup")
    print(f"{'impl':<24}{'step s':>8}{'tokens/s':>10}{'threads':>9}{'GFLOP/s':>9}{'matmul GFLOP/s':>16}"
          f"{'matmul share':>14}{'peak RSS MiB':>14}{'first loss':>12}")
    rates = {}
    labels = {"jax": "JAX (this project)", "torch": f"PyTorch, {os.cpu_count()} threads",
              "torch1": "PyTorch, 1 thread"}
    for impl, label in labels.items():
        r = results[impl]
        median = float(np.median(r["step_seconds"]))
        rates[impl] = tokens / median
        achieved = step_flops / median / 1e9
        print(f"{label:<24}{median:>8.2f}{rates[impl]:>10.1f}{r['threads']:>9.2f}{achieved:>9.1f}"
              f"{r['matmul']['gflops']:>10.1f} ({r['matmul']['threads']:.1f}t){achieved / r['matmul']['gflops']:>14.0%}"
              f"{r['peak_rss_mib']:>14.0f}{r['losses'][0]:>12.6f}")
    best_torch = max(rates["torch"], rates["torch1"])
    print(f"ratio JAX / best PyTorch tokens/s: {rates['jax'] / best_torch:.2f}  "
          f"(JAX step compilations: {results['jax']['compilations']})")
    for impl in ("torch", "torch1"):
        first = (results["jax"]["losses"][0], results[impl]["losses"][0])
        if abs(first[0] - first[1]) > 1e-3 * max(1.0, abs(first[1])):
            sys.exit(f"the first-step losses disagree: JAX {first[0]} vs {labels[impl]} {first[1]}")


if __name__ == "__main__":
    main()
