"""What a CPU benchmark ran on, and what each library's matmul can do there: shared by the bench scripts.

A ratio between two implementations means little without the machine under it (the same code measured 0.6x on one
2-core VM and 1.1x on another). Each benchmark prints:
- `describe()`: the CPU model and the ISA extensions that decide the matmul kernels (AVX-512, AMX), the CPUs this
  process may use, the load average, the versions and XLA_FLAGS;
- per side, `Clock`'s CPU seconds per wall second: the threads a library really kept busy (a thread-count setting
  says what it may use, not what it did);
- per side, `matmul_rate`: that library's own matmul throughput on the shapes of the work measured, one matmul at a
  time, so "XLA's matmul is slower than MKL's" is a number: the side's achieved GFLOP/s over that rate is the share
  of its time the matmuls could explain.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16")
PACKAGES = ("jax", "jaxlib", "numpy", "torch", "transformers")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        fields = dict(line.split(":", 1) for line in cpuinfo.read().split("\n\n")[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    isa = set(fields.get("flags", "").split())
    return (f"{fields.get('model name', platform.processor())} (family {fields.get('cpu family')} model "
            f"{fields.get('model')}), ISA: {' '.join(f for f in ISA_FLAGS if f in isa) or 'none of ' + str(ISA_FLAGS)}")


def versions() -> str:
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join([f"python {platform.python_version()}", *found])


def describe() -> list[str]:
    return [f"CPU: {cpu_model()}",
            f"CPUs usable: {len(os.sched_getaffinity(0))}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"versions: {versions()}",
            f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '(unset)')}"]


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


@dataclass
class Clock:
    """Wall and CPU seconds of this process over a `with` block; `threads` = CPU seconds per wall second."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def __enter__(self) -> "Clock":
        self._wall, self._cpu = time.perf_counter(), process_cpu_seconds()
        return self

    def __exit__(self, *_) -> None:
        self.wall_s += time.perf_counter() - self._wall
        self.cpu_s += process_cpu_seconds() - self._cpu

    @property
    def threads(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


def matmul_rate(library: str, shapes: Sequence[tuple[int, int, int]], dtype: str = "float32",
                seconds_per_shape: float = 0.5) -> dict:
    """GFLOP/s of `library`'s ("jax" or "torch") matmul over `shapes` ([m, k] @ [k, n], each timed alone after a
    warm-up), the total FLOPs over the total time, and its CPU seconds per wall second."""
    rng = np.random.default_rng(0)
    if library == "jax":
        import jax
        import jax.numpy as jnp

        matmul = jax.jit(jnp.matmul)

        def make(shape):
            return jnp.asarray(rng.standard_normal(shape), getattr(jnp, dtype))

        def run(a, b) -> None:
            matmul(a, b).block_until_ready()
    elif library == "torch":
        import torch

        def make(shape):
            return torch.from_numpy(rng.standard_normal(shape)).to(getattr(torch, dtype))

        def run(a, b) -> None:
            torch.matmul(a, b)
    else:
        raise ValueError(f"unknown library {library!r}")
    clock, flops = Clock(), 0.0
    for m, k, n in shapes:
        a, b = make((m, k)), make((k, n))
        repeats = _repeats(lambda: run(a, b), seconds_per_shape)
        with clock:
            for _ in range(repeats):
                run(a, b)
        flops += 2.0 * m * k * n * repeats
    return {"gflops": flops / clock.wall_s / 1e9, "threads": clock.threads}


def _repeats(run: Callable[[], None], seconds: float) -> int:
    run()  # compile / first-call allocations
    started = time.perf_counter()
    run()
    return max(3, int(seconds / max(time.perf_counter() - started, 1e-6)))


def llama_matmul_shapes(config, rows: int, backward: bool = False) -> list[tuple[int, int, int]]:
    """One decoder layer's weight matmuls and the output head for `rows` tokens (`config`: an ArchitectureConfig):
    the shapes a decode step (rows = batch) multiplies, or with `backward` a train step (rows = tokens), whose
    backward adds the input gradient [rows, n] @ [n, k] and the weight gradient [k, rows] @ [rows, n] of each."""
    q, kv = config.num_heads * config.resolved_head_dim, config.num_kv_heads * config.resolved_head_dim
    hidden, intermediate = config.hidden_size, config.intermediate_size
    forward = [(rows, hidden, q), (rows, hidden, kv), (rows, hidden, kv), (rows, q, hidden),
               (rows, hidden, intermediate), (rows, hidden, intermediate), (rows, intermediate, hidden),
               (rows, hidden, config.vocab_size)]
    if not backward:
        return forward
    return forward + [(m, n, k) for m, k, n in forward] + [(k, m, n) for m, k, n in forward]
