"""Compile the worker's own programs for devices this machine does not have, and read what XLA says of them.

`simpo-interleave plan` builds, from shapes alone (no weights are read), the programs a job's worker runs, at
their largest, with the worker's own code:
- `train_step`: the trainer's CompiledStep (simpo_step under jit, state donated) on trainer.mesh over every device
  of the job, for one global batch of max_seq_len tokens;
- `prefill`, `decode_grow_window`, `decode`: the engine's jitted programs (decode.py) with the Engine's own
  DecodeSpec and placement, for the largest wave its bucketing makes (Engine.largest_wave: prompts of
  max_prompt_len tokens that all run to max_new_tokens), in the order the engine runs them: the prefill at its
  first window, the last growth of the cache to the full window (old and new cache both live: no donation), and
  the decode loop at the full window. Each program gets the shardings the previous one's compile produced, as at
  run time. (`compact` is left out: its output is a smaller batch, so it needs less than the last growth.)
XLA compiles them for the target's devices: a libtpu compile-only topology (jax.experimental.topologies; the `tpu`
extra installs libtpu) or this machine's CPU devices standing in for a CPU pool's hosts.

What is reported per program and per chip, and where each number comes from:
- params, optimizer state, KV cache: the program's arguments of that kind (and the KV cache it outputs), from their
  shapes and shardings; during inference the training params and optimizer state stay resident beside the
  programs, so they are added to the inference programs too;
- inputs: XLA's argument size minus the above (batches, prompts, per-row state; includes layout padding);
- outputs: XLA's output size, minus what aliases a donated argument and the KV cache counted above;
- temporaries and generated code: XLA's memory analysis;
- peak: the sum of the above, an upper bound on what is live at once;
- FLOPs: flops.py's count (XLA's cost analysis skips loop bodies; its figure is kept as xla_flops_per_chip).
- collectives: the bytes one call moves per chip inside a slice (ICI) and between slices (DCN, multislice), read
  from the compiled HLO (`collectives`).
When XLA refuses to compile for lack of memory (RESOURCE_EXHAUSTED), its message states the program's whole need
(arguments, outputs and temporaries: what it calls "HLO temporaries"); the program is reported with the arguments
counted above and the rest of that need as temporaries, and `refused` holding the message.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

# Compile-only use of libtpu opens no TPU, so another process holding libtpu's lock (a test, a worker) must not
# stop it. Set before libtpu loads (when the first topology is made).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from simpo_worker import decode, flops  # noqa: E402
from simpo_worker.config import ArchitectureConfig, WorkerConfig  # noqa: E402
from simpo_worker.decode import DecodeState, decode_weights  # noqa: E402
from simpo_worker.engine import Engine, WaveShapes  # noqa: E402
from simpo_worker.errors import ConfigError, is_out_of_memory  # noqa: E402
from simpo_worker.mesh import make_mesh  # noqa: E402
from simpo_worker.model import MemoryOptions, init_llama  # noqa: E402
from simpo_worker.prompts import host_shard  # noqa: E402
from simpo_worker.train_step import COMPUTE_DTYPES, CompiledStep, init_state, make_optimizer  # noqa: E402

TRAIN_STEP, PREFILL, GROW, DECODE = "train_step", "prefill", "decode_grow_window", "decode"


# ---- targets ------------------------------------------------------------------------------------------------

class TopologyUnavailable(RuntimeError):
    """libtpu cannot describe the slice (not installed, or a name it does not know)."""


class CompileFailed(RuntimeError):
    """XLA failed to compile a program for a reason other than memory: plan cannot give a verdict."""


@dataclass(frozen=True)
class Target:
    """The devices a job runs on: every device (all hosts, all slices, in jax.devices() order), the first
    host's (a host-data-parallel replica lives on them), and how many slices they are in."""

    platform: str
    devices: tuple
    host_devices: tuple
    process_count: int
    slices: int = 1


def _topology_devices(topology) -> tuple:
    from jax.experimental import topologies

    try:
        return tuple(topologies.get_topology_desc(
            platform="tpu", topology_name=topology.topology_name, chip_config_name=topology.chip_config_name,
            chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=topology.num_slices).devices)
    except Exception as error:  # noqa: BLE001 - libtpu missing or the name unknown to it
        raise TopologyUnavailable(f"cannot describe TPU topology {topology.topology_name} x {topology.num_slices} "
                                  f"slice(s) ({type(error).__name__}: {error}); is the `tpu` extra (libtpu) "
                                  f"installed?") from error


def tpu_target(topology, host_topology=None) -> Target:
    """A TPU slice (or identical slices) as libtpu describes it, without one. `topology` and `host_topology` have
    get_topology_desc's arguments as attributes (simpo_operator.tpu.LibtpuTopology). `host_topology`: one host's
    chips as a single-host slice of their own, for the host-data-parallel programs (libtpu's compile-only path
    refuses collectives over one host's chips inside a larger v5e/v6e topology, whose device ids are not
    contiguous: 0, 1, 4, 5); default: the first host's devices of `topology`."""
    devices = _topology_devices(topology)
    first = devices[0].process_index
    host = (_topology_devices(host_topology) if host_topology is not None
            else tuple(d for d in devices if d.process_index == first))
    return Target("tpu", devices, host, len({d.process_index for d in devices}),
                  len({getattr(d, "slice_index", 0) for d in devices}))  # single slices may lack it


def cpu_target(hosts: int) -> Target:
    """A CPU pool of `hosts` hosts, one device each (as the worker sees them), stood in for by this machine's CPU
    devices: jax_num_cpu_devices must be >= hosts before JAX starts."""
    devices = jax.devices("cpu")
    if len(devices) < hosts:
        raise ConfigError(f"{hosts} CPU hosts need {hosts} local CPU devices, JAX has {len(devices)}; set "
                          f"jax_num_cpu_devices before JAX starts")
    return Target("cpu", tuple(devices[:hosts]), tuple(devices[:1]), hosts)


# ---- reports ------------------------------------------------------------------------------------------------

@dataclass
class ProgramReport:
    """One compiled program; byte counts per chip (see the module docstring for each one's source)."""

    name: str
    params_bytes: int
    optimizer_bytes: int
    input_bytes: int
    kv_cache_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float  # one call, over every device it runs on (decode: one token step of the wave)
    xla_flops_per_chip: Optional[float]
    compile_seconds: float
    refused: Optional[str] = None  # XLA's message when it refused to compile for lack of memory
    notes: list[str] = field(default_factory=list)
    # What one call's collectives move per chip (see `collectives`): inside a slice, and between slices.
    ici_bytes: int = 0
    dcn_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return (self.params_bytes + self.optimizer_bytes + self.input_bytes + self.kv_cache_bytes
                + self.output_bytes + self.temp_bytes + self.code_bytes)


@dataclass
class Plan:
    """Every program of a job, and the shapes the estimates need."""

    programs: list[ProgramReport]
    arch: ArchitectureConfig
    chips: int
    chips_per_host: int
    hosts: int
    mesh_shape: dict[str, int]
    wave: Optional[WaveShapes]
    waves_per_pause: int
    inference_devices: int  # the devices one wave runs on (host-DP: one host's; global_mesh: all)
    decode_weight_bytes_per_chip: int
    compute_itemsize: int
    inference_mode: str
    train_recompute_flops: float = 0.0  # the train step's hardware FLOPs beyond its model FLOPs (rematerialisation)


def per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
# XLA's two wordings of a program that does not fit (sizes in its binary units: 95.74G = 95.74 GiB).
_NEED_PATTERNS = (re.compile(r"\(([\d.]+)([KMGTP]?)\) exceeds available HBM \(([\d.]+)([KMGTP]?)\)"),
                  re.compile(r"Used ([\d.]+)([KMGTP]?) of ([\d.]+)([KMGTP]?) hbm"))


def out_of_memory_need(message: str) -> Optional[tuple[int, int]]:
    """(needed, available) bytes from XLA's out-of-memory message; None if it says neither."""
    for pattern in _NEED_PATTERNS:
        match = pattern.search(message)
        if match:
            need, need_unit, have, have_unit = match.groups()
            return round(float(need) * _UNITS[need_unit]), round(float(have) * _UNITS[have_unit])
    return None


def _compile(name: str, lowered):
    """(compiled or None, seconds, refusal message or None)."""
    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 - jax raises JaxRuntimeError
        if not is_out_of_memory(error):
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CompileFailed(f"{name}: XLA could not compile it for this target: {first}") from error
        return None, time.perf_counter() - started, str(error).strip()
    return compiled, time.perf_counter() - started, None


def _report(name: str, lowered, *, params: int, optimizer: int, kv_args: int, flop_count: float,
            kv_out: Callable[[Any], int] = lambda output_shardings: 0,
            resident: tuple[int, int] = (0, 0)) -> tuple[ProgramReport, Any]:
    """Compile `lowered` and account its memory per chip. `kv_out(output shardings, or None if XLA refused)`: the
    KV cache bytes among its outputs; `resident` = (params, optimizer) bytes that live on the chip beside the
    program without being its arguments."""
    compiled, seconds, refused = _compile(name, lowered)
    if compiled is None:
        # XLA states the program's whole need (arguments, outputs and temporaries together).
        need = out_of_memory_need(refused)
        rest = max(0, need[0] - params - optimizer - kv_args) if need else 0
        report = ProgramReport(name, params + resident[0], optimizer + resident[1], 0, kv_args, 0, rest, 0,
                               flop_count, None, seconds, refused,
                               ["XLA refused to compile it for lack of memory: temporaries is the rest of XLA's "
                                "stated need (temporaries, outputs and the other inputs)"])
        return report, None
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cache_out = kv_out(compiled.output_shardings)
    inputs = max(0, memory.argument_size_in_bytes - params - optimizer - kv_args)
    outputs = max(0, memory.output_size_in_bytes - memory.alias_size_in_bytes - cache_out)
    report = ProgramReport(name, params + resident[0], optimizer + resident[1], inputs, kv_args + cache_out,
                           outputs, memory.temp_size_in_bytes, memory.generated_code_size_in_bytes, flop_count,
                           (cost or {}).get("flops"), seconds)
    for collective in collectives(compiled.as_text()):
        moved = collective.bytes * collective.count
        if collective.network == "dcn":
            report.dcn_bytes += moved
        else:
            report.ici_bytes += moved
    return report, compiled


# ---- collectives: what a compiled program sends over ICI and over DCN -----------------------------------------
#
# For a mesh over several slices libtpu compiles one SPMD program per slice: its collectives (replica groups of
# the slice's own devices) run on the slice's links (ICI), and what crosses slices (the data-center network, DCN)
# is sent to the multislice runtime as host transfers (`send`, is_host_transfer, with
# _xla_megascale_transfer_type naming the collective: ALL_REDUCE, ALL_GATHER, ...).

_ICI_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclass(frozen=True)
class Collective:
    """One collective of a compiled program, per chip: `network` "ici" or "dcn"; `kind` the HLO op (ICI) or the
    multislice transfer type (DCN); `bytes` what its result holds (an all-gather's gathered arrays, an
    all-reduce's operands; dtype and shape: its largest array); `count` how many times one call of the program
    runs it (its loops' trip counts)."""

    network: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    count: int
    replica_groups: Optional[str]


def _arrays(hlo_type: str) -> list[tuple[str, tuple[int, ...], int]]:
    found = []
    for dtype, dims in _ARRAY.findall(hlo_type):
        if dtype in _DTYPE_BYTES:
            shape = tuple(int(d) for d in dims.split(",") if d)
            found.append((dtype, shape, math.prod(shape) * _DTYPE_BYTES[dtype]))
    return found


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled program's HLO text (Compiled.as_text()), each with how often it runs."""
    computations: dict[str, list[tuple[str, str, str]]] = {}  # name -> its instructions' (type, op, rest)
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and line.rstrip().endswith("{"):
            current = computations.setdefault(head.group(1), [])
            entry = head.group(1) if line.startswith("ENTRY") else entry
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction:
            current.append(instruction.groups()[1:])
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    counts: dict[str, int] = {}

    def visit(name: str, count: int) -> None:
        counts[name] = counts.get(name, 0) + count
        for hlo_type, op, rest in computations[name]:
            called = _CALLED.findall(rest) + [c.strip().lstrip("%") for m in _BRANCHES.findall(rest)
                                               for c in m.split(",") if c.strip()]
            body = re.search(r"\bbody=%([\w.-]+)", rest) if op == "while" else None
            for callee in called:
                if callee in computations:
                    visit(callee, count * (_trip_count(computations, rest) if body and callee == body.group(1)
                                           else 1))

    visit(entry, 1)
    found = []
    for name, count in counts.items():
        for hlo_type, op, rest in computations[name]:
            transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', rest)
            if op == "send" and transfer:
                dtype, shape, size = _arrays(hlo_type)[0]  # (data, context, token)
                found.append(Collective("dcn", transfer.group(1), dtype, shape, size, count, None))
            elif op.removesuffix("-start") in _ICI_OPS:
                arrays = _arrays(hlo_type)
                # A combined collective's result is a tuple of its arrays; an asynchronous start's holds its
                # input and output (and context), of which the largest is what it moves.
                dtype, shape, size = max(arrays, key=lambda array: array[2])
                size = size if op.endswith("-start") else sum(array[2] for array in arrays)
                groups = re.search(r"replica_groups=(\{[{}\d,]*\}|\[[^ ]*)", rest)
                found.append(Collective("ici", op.removesuffix("-start"), dtype, shape, size, count,
                                        groups.group(1) if groups else None))
    return found


def _trip_count(computations, while_rest: str) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the bound its condition compares the counter
    with (jax's scans and fori_loops count from 0 while i < N); 1 for a loop without one bound (the decode loop
    runs until its rows are done: its collectives are counted per iteration)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_rest)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.-]+)", while_rest).group(1)
    bounds = {int(m) for _, op, rest in computations[condition] if op == "constant"
              for m in re.findall(r"^(-?\d+)\)", rest)}
    return bounds.pop() if len(bounds) == 1 else 1


# ---- the programs -------------------------------------------------------------------------------------------

def plan_programs(config: WorkerConfig, arch: ArchitectureConfig, target: Target) -> Plan:
    """Compile every program of the job for `target`; see the module docstring."""
    trainer = config.trainer
    trainer.check_devices(len(target.devices), slices=target.slices)
    mesh = make_mesh(trainer.mesh, list(target.devices), target.slices)
    compute_dtype = COMPUTE_DTYPES[trainer.compute_dtype]
    step, arrays, lowered = lower_train_step(config, arch, mesh)
    params, optimizer_bytes = per_chip_bytes(arrays.model), per_chip_bytes((arrays.opt_state, arrays.step))
    # XLA compiles outside the GIL: the train step compiles on a thread while the inference programs (which need
    # none of its results) compile here, so the two longest compiles overlap on a machine with spare cores.
    with ThreadPoolExecutor(1) as pool:
        train = pool.submit(_report, TRAIN_STEP, lowered, params=params, optimizer=optimizer_bytes, kv_args=0,
                            flop_count=flops.train_step_flops(arch, trainer.batch_size, config.data.max_seq_len))
        plan = _empty_plan(config, arch, target, mesh, compute_dtype)
        if config.inference.enabled:
            _plan_inference(plan, config, arch, target, mesh, arrays.model, compute_dtype,
                            (params, optimizer_bytes))
        plan.programs.insert(0, train.result()[0])
    if step.memory.remat == "full":
        plan.train_recompute_flops = flops.layers_forward_flops(arch, trainer.batch_size, config.data.max_seq_len)
    return plan


def lower_train_step(config: WorkerConfig, arch: ArchitectureConfig, mesh: Mesh):
    """The trainer's step on `mesh`, lowered for one global batch on abstract state (init_llama and
    optimizer.init traced, never run): (the CompiledStep, the state's ShapeDtypeStructs, the Lowered)."""
    trainer = config.trainer
    optimizer, schedule = make_optimizer(config.optimizer, trainer.num_train_steps)
    state = jax.eval_shape(lambda: init_state(init_llama(arch, jax.random.key(0)), optimizer))
    step = CompiledStep(state, mesh, optimizer, schedule, config.simpo, trainer.compute_dtype,
                        MemoryOptions.from_config(trainer))
    arrays = _with_shardings(eqx.filter(state, lambda x: isinstance(x, jax.ShapeDtypeStruct)),
                             step.state_shardings)
    pairs = trainer.batch_size // trainer.microbatches
    batch = {name: jax.ShapeDtypeStruct((trainer.microbatches, pairs, *shape), dtype)
             for name, shape, dtype in (("tokens", (2, config.data.max_seq_len), jnp.int32),
                                        ("loss_mask", (2, config.data.max_seq_len), jnp.float32),
                                        ("lengths", (2,), jnp.int32))}
    return step, arrays, step.program.lower(arrays, batch)


def _empty_plan(config: WorkerConfig, arch: ArchitectureConfig, target: Target, mesh: Mesh,
                compute_dtype) -> Plan:
    return Plan(programs=[], arch=arch, chips=len(target.devices), chips_per_host=len(target.host_devices),
                hosts=target.process_count, mesh_shape=dict(mesh.shape), wave=None, waves_per_pause=0, inference_devices=0, decode_weight_bytes_per_chip=0,
                compute_itemsize=jnp.dtype(compute_dtype).itemsize, inference_mode=config.inference.mode)


def _prompts_per_call(config: WorkerConfig, hosts: int) -> Optional[int]:
    """Prompts one host passes to Engine.generate at a pause (None: a prompts file, not read here)."""
    count = config.inference.synthetic_prompt_count
    if count is None:
        return None
    if config.inference.mode == "global_mesh":
        return count  # every host runs the whole, sharded computation
    return len(host_shard(count, 0, hosts))  # host 0 holds the largest shard


def _plan_inference(plan: Plan, config: WorkerConfig, arch: ArchitectureConfig, target: Target, train_mesh: Mesh,
                    model_arrays, compute_dtype, resident: tuple[int, int]) -> None:
    inference = config.inference
    # The stop ids come from the tokenizer at run time, and stop strings are matched on the host: neither changes
    # a program.
    engine = Engine(arch, dataclasses.replace(inference, stop_tokens=[]), arch.eos_token_ids or [0],
                    compute_dtype=compute_dtype, mesh=train_mesh, local_devices=list(target.host_devices))
    spec = engine.spec
    prompts = _prompts_per_call(config, target.process_count)
    wave = engine.largest_wave(prompts)
    plan.wave = wave
    plan.waves_per_pause = 1 if prompts is None else -(-prompts // wave.slots)

    # The inference weights as Engine._weights lays them out on the engine's mesh (cast to the compute dtype).
    weights_shape = jax.eval_shape(partial(decode_weights, dtype=compute_dtype), model_arrays)
    weights = _with_shardings(weights_shape, decode.weight_shardings(weights_shape, arch, engine.mesh))
    weight_bytes = per_chip_bytes(weights)
    plan.decode_weight_bytes_per_chip = weight_bytes
    plan.inference_devices = engine.mesh.devices.size

    rows = NamedSharding(engine.mesh, spec.batch_spec)
    scalar = NamedSharding(engine.mesh, P())
    per_row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)  # noqa: E731
    slots, length = wave.slots, wave.prompt_length
    prefill_args = (weights, per_row((slots, length), jnp.int32), per_row((slots,), jnp.int32),
                    per_row((slots,), jnp.int32), per_row((slots,), jnp.bool_),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar))
    first_window, full_window = wave.windows[0][0], wave.full_window

    def state_at(window: int, shardings) -> DecodeState:
        """The decode state at `window` slots: shapes from tracing the prefill, shardings from the program that
        made it (None: XLA refused it; then the batch sharding on every per-row array)."""
        shapes = jax.eval_shape(partial(decode.prefill.jitted, spec, window=window), *prefill_args)
        if shardings is None:
            shardings = jax.tree.map(lambda s: rows if s.ndim else scalar, shapes)
        return _with_shardings(shapes, shardings)

    def kv(state: DecodeState) -> int:
        return per_chip_bytes((state.k, state.v))

    report, compiled = _report(
        PREFILL, decode.prefill.lower(spec, *prefill_args, window=first_window), params=weight_bytes, optimizer=0,
        kv_args=0, kv_out=lambda made: kv(state_at(first_window, made)),
        flop_count=flops.prefill_flops(arch, slots, length), resident=resident)
    plan.programs.append(report)
    state_shardings = compiled.output_shardings if compiled is not None else None

    if len(wave.windows) > 1:
        before = state_at(wave.windows[-2][0], state_shardings)
        # grow_window takes no weights: they stay live beside it, resident like the training state.
        report, compiled = _report(GROW, decode.grow_window.lower(before, window=full_window), params=0,
                                   optimizer=0, kv_args=kv(before), flop_count=0.0,
                                   kv_out=lambda made: kv(state_at(full_window, made or state_shardings)),
                                   resident=(resident[0] + weight_bytes, resident[1]))
        plan.programs.append(report)
        if compiled is not None:
            state_shardings = compiled.output_shardings
    full = state_at(full_window, state_shardings)
    stop_at = jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar)
    report, _ = _report(DECODE, decode.decode_chunk.lower(spec, weights, full, stop_at), params=weight_bytes,
                        optimizer=0, kv_args=kv(full), flop_count=flops.decode_step_flops(arch, slots, full_window),
                        resident=resident)
    plan.programs.append(report)
