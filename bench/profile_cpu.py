"""Where one CPU train step and one decode step spend their time, by HLO op category (SmolLM2-135M, float32).

    python bench/profile_cpu.py [--what train decode] [--pairs 4] [--seq-len 128] [--batch 32]

Each program is traced with `jax.profiler` after a warm-up. XLA:CPU records one event per executed HLO instruction
(its thunk) with the instruction and module names as stats; the same process dumps the optimised HLO of every
module (--xla_dump_to), so each event is joined to its instruction's opcode and op_name (JAX's name stack:
`jax.named_scope`s of the model, `jvp`/`transpose` for the backward). Categories, first match wins:
  optimizer  under the `optimizer` scope (AdamW, clipping, the grad norm)
  loss       under `loss` (the output head's matmul, log-softmax, the SimPO terms)
  attention  under `attention` (scores, softmax, the value matmul; not the q/k/v/o projections)
  copies     layout changes: copy, transpose, and fusions XLA named after them (copy_*, transpose_*)
  dot        the remaining matmuls: the decoder layers' weight projections, forward and backward
  fusion     the remaining elementwise and reduction work (norms, rotary, SwiGLU, residuals, casts)
  other      everything else executed (loop control, dynamic slices, scatters)
Times are summed over XLA's threads (CPU seconds, not wall), per step; the wall time of the traced step is shown
beside them, and the instructions that took the most.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

DUMP_DIR = tempfile.mkdtemp(prefix="profile-cpu-hlo-")
# Before jax is imported: the dump of every compiled module's optimised HLO, joined to the trace below.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP_DIR} --xla_dump_hlo_as_text "
                           "--xla_dump_hlo_pass_re=^$").strip()

import numpy as np  # noqa: E402

from machine import describe  # noqa: E402

CATEGORIES = ("dot", "fusion", "attention", "loss", "optimizer", "copies", "other")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\b([a-z\-]+)\((.*)$")
OP_NAME = re.compile(r'op_name="([^"]*)"')


def read_module_instructions(module: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (opcode, op_name) of the top-level instructions (the ones that run as thunks) of the
    dumped, optimised module `module` (e.g. jit_train_step)."""
    files = [f for f in glob.glob(f"{DUMP_DIR}/*.{module}.*after_optimizations.txt")]
    if not files:
        raise FileNotFoundError(f"no optimised HLO dump for module {module} in {DUMP_DIR}")
    instructions: dict[str, tuple[str, str]] = {}
    for path in files:
        for line in Path(path).read_text().splitlines():
            match = INSTRUCTION.match(line)
            if match:
                name, opcode, rest = match.groups()
                op_name = OP_NAME.search(rest)
                instructions.setdefault(name, (opcode, op_name.group(1) if op_name else ""))
    return instructions


def category(name: str, opcode: str, op_name: str) -> str:
    # Scopes appear wrapped in the transformations applied to them: "jvp(loss)", "transpose(jvp(attention))".
    scopes = set(re.findall(r"[\w\-]+", op_name))
    for scope in ("optimizer", "loss", "attention"):
        if scope in scopes:
            return scope
    if opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        return "copies"
    # A YNNPACK fusion is a matmul when its root op is one (it also runs some reductions and elementwise ops).
    if opcode == "dot" or op_name.rsplit("/", 1)[-1] == "dot_general":
        return "dot"
    if opcode == "fusion":
        return "fusion"
    return "other"


def traced_events(run, repeats: int) -> tuple[dict[tuple[str, str], float], float]:
    """Run `run` `repeats` times under the profiler: (module, instruction) -> nanoseconds, and the wall seconds."""
    import jax
    from jax.profiler import ProfileData

    trace_dir = tempfile.mkdtemp(prefix="profile-cpu-trace-")
    with jax.profiler.trace(trace_dir):
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        wall = time.perf_counter() - started
    (xspace,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    durations: dict[tuple[str, str], float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(xspace).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats and "hlo_module" in stats:
                    durations[(stats["hlo_module"], stats["hlo_op"])] += event.duration_ns
    return durations, wall


def report(title: str, module: str, durations: dict[tuple[str, str], float], wall_s: float, steps: int,
           top: int = 8) -> None:
    instructions = read_module_instructions(module)
    per_category = collections.Counter()
    per_instruction = collections.Counter()
    for (event_module, op), ns in durations.items():
        if event_module != module:
            continue
        opcode, op_name = instructions.get(op, ("?", ""))
        per_category[category(op, opcode, op_name)] += ns / steps / 1e6
        per_instruction[op] += ns / steps / 1e6
    total = sum(per_category.values())
    print(f"\n{title}: {wall_s / steps * 1e3:.1f} ms wall per step (traced), {total:.1f} ms of XLA thread time "
          f"in {module}")
    print(f"  {'category':<11}{'ms/step':>10}{'share':>8}")
    for name in CATEGORIES:
        print(f"  {name:<11}{per_category[name]:>10.1f}{per_category[name] / total:>8.1%}")
    print(f"  top instructions:")
    for op, ms in per_instruction.most_common(top):
        opcode, op_name = instructions.get(op, ("?", ""))
        print(f"    {ms:8.1f} ms  {op:<28} {category(op, opcode, op_name):<10} {op_name[-90:]}")


def profile_train(pairs: int, seq_len: int, steps: int) -> None:
    import equinox as eqx
    import jax.numpy as jnp

    from simpo_worker.contract.config import MeshConfig, OptimizerConfig, SimpoConfig
    from simpo_worker.parallel.mesh import make_mesh, place
    from simpo_worker.weights.pretrained import load_pretrained
    from simpo_worker.train.step import CompiledStep, init_state, make_optimizer

    model = load_pretrained("smollm2")
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-5, max_grad_norm=1.0), steps + 1)
    state = init_state(model, optimizer)
    step = CompiledStep(state, make_mesh(MeshConfig()), optimizer, schedule,
                        SimpoConfig(beta=2.5, gamma_beta_ratio=0.55), "float32")
    arrays = [place(eqx.filter(state, eqx.is_array), step.state_shardings)]
    del model, state
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, (1, pairs, 2, seq_len)).astype(np.int32)
    loss_mask = np.zeros((1, pairs, 2, seq_len), np.float32)
    loss_mask[..., seq_len // 3:] = 1.0
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask),
             "lengths": jnp.full((1, pairs, 2), seq_len, jnp.int32)}

    def run() -> None:
        arrays[0], metrics = step(arrays[0], batch)
        float(metrics["loss"])

    run()  # compile
    durations, wall = traced_events(run, steps)
    report(f"train step, {pairs} pairs x 2 x {seq_len} tokens", "jit_train_step", durations, wall, steps)


def profile_decode(batch: int, prompt_tokens: int, new_tokens: int) -> None:
    from simpo_worker.contract.config import InferenceConfig
    from simpo_worker.infer.engine import Engine
    from simpo_worker.weights.pretrained import load_pretrained

    model = load_pretrained("smollm2")
    ids = np.random.default_rng(0).integers(17, model.config.vocab_size, (batch, prompt_tokens)).tolist()
    engine = Engine(model.config, InferenceConfig(max_new_tokens=new_tokens, max_prompt_len=prompt_tokens,
                                                  batch_size=batch, ignore_eos=True), eos_token_ids=[])

    def run() -> None:
        engine.generate(model, ids, list(range(batch)), step=0, seed=0)

    run()  # compile
    durations, wall = traced_events(run, 1)
    decode_ms = sum(ns for (module, _), ns in durations.items() if module == "jit_decode_chunk") / 1e6
    print(f"\n(decode: {decode_ms / (new_tokens - 1):.1f} ms of thread time per token in jit_decode_chunk)")
    report(f"decode, batch {batch}, {prompt_tokens} prompt + {new_tokens} new tokens (per generated token)",
           "jit_decode_chunk", durations, wall, new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", nargs="+", choices=["train", "decode"], default=["train", "decode"])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="train steps traced")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    print("\n".join(describe()))
    if "train" in args.what:
        profile_train(args.pairs, args.seq_len, args.steps)
    if "decode" in args.what:
        profile_decode(args.batch, args.prompt_tokens, args.new_tokens)


if __name__ == "__main__":
    sys.exit(main())
