"""`simpo-interleave plan JOB.yaml [--json]`: compile a job's programs for its slice, without one, and say whether
they fit the chips' memory and how long the job would take.

The job's model shapes come from model.architecture, the HF config.json or the GGUF metadata (no weights are read);
the programs are the worker's own, compiled by XLA for the job's TPU topology (libtpu's compile-only devices: the
`tpu` extra) or, for a CPU pool, for this machine's CPU devices standing in for its hosts (simpo_worker.plan).
The roofline estimate uses the generation's published figures (simpo_operator.tpu) (simpo_worker.plan.roofline).

Exit codes: 0 every program fits; 10 one does not (stderr names the program, its need against the capacity, and
the config knobs that would shrink it), or the job is invalid; 2 no verdict: libtpu cannot describe the slice, or
XLA fails to compile a program for a reason other than memory.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any, Optional

import jax  # importing JAX (the plan modules do too) starts no backend: _start_jax still configures it

from simpo_operator import tpu
from simpo_operator.resource import Job, load_job, validate_job
from simpo_worker.contract.api import ExitCode
from simpo_worker.contract.config import DEFAULT_LOSS_CHUNK_TOKENS, WorkerConfig
from simpo_worker.contract.errors import ConfigError
from simpo_worker.model.llama import MemoryOptions
from simpo_worker.plan import roofline, targets
from simpo_worker.plan.memory import CompileFailed
from simpo_worker.plan.programs import plan_programs
from simpo_worker.weights.pretrained import load_architecture

GIB = 2**30
# Kubernetes quantity suffixes, for a CPU pool's memory limit.
_QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "k": 1e3, "M": 1e6,
                   "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "m": 1e-3, "": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="a SimpoInterleaveJob YAML (the file you would kubectl apply)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def run(args: argparse.Namespace) -> int:
    job = validate_job(load_job(args.job))
    try:
        result = plan_job(job)
    except (targets.TopologyUnavailable, CompileFailed) as error:
        print(f"simpo-interleave plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result))
    if not result["fits"]:
        print(f"simpo-interleave plan: {does_not_fit_message(result)}", file=sys.stderr)
        return int(ExitCode.BAD_CONFIG)
    return 0


# ---- the plan as data (the --json object; the tables are rendered from it) ------------------------------------

def plan_job(job: Job) -> dict[str, Any]:
    config = job.spec.config
    _start_jax(job)
    arch = load_architecture(config.model)
    if job.shape is not None:
        target = targets.tpu_target(tpu.libtpu_topology(job.shape, job.slices),
                                    tpu.libtpu_topology(tpu.host_block(job.shape)))
        chip = tpu.generation(job.shape).chip
        capacity, capacity_source = chip.compiler_hbm_bytes, "HBM XLA lets one program use per chip"
    else:
        target, chip = targets.cpu_target(job.num_processes), None
        capacity = memory_limit(job)
        capacity_source = ("the worker container's memory limit (spec.resources)" if capacity
                           else "none: spec.resources sets no memory, so nothing is checked")
    started = time.perf_counter()
    plan = plan_programs(config, arch, target)
    compile_s = time.perf_counter() - started

    found = plan.to_json(config, capacity, lambda program: knobs(config, job, program.name, plan))
    estimates: dict[str, Any] = {"seconds": None, "note": "no published figures for a CPU pool"}
    if chip is not None:
        pauses = len(config.inference.schedule(config.trainer.num_train_steps))
        estimated = roofline.estimate(plan, chip.peak_bf16_flops, chip.hbm_bytes_per_s,
                                      config.trainer.num_train_steps, pauses)
        estimates = {**estimated.to_json(), "hardware": {
            "generation": job.shape.generation, "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
            "hbm_bytes_per_s_per_chip": chip.hbm_bytes_per_s, "hbm_bytes_per_chip": chip.hbm_bytes,
            "source": chip.source}}
    return {
        "job": job.name,
        "fits": found["fits"],
        "target": {"platform": target.platform,
                   "type": job.shape.accelerator_type if job.shape else f"{job.num_processes} CPU host(s)",
                   "topology": job.shape.topology if job.shape else None, "slices": job.slices, **found["target"]},
        "capacity_bytes_per_chip": capacity, "capacity_source": capacity_source,
        **{part: found[part] for part in ("model", "train", "inference", "programs")},
        "compile_seconds": round(compile_s, 1),
        "estimates": estimates,
        "anchor": vars(roofline.LEVANTER_V5P_32),
    }


def _start_jax(job: Job) -> None:
    """Before any JAX backend starts: compile-only work on the CPU platform (no TPU is opened; libtpu still
    describes the topology), with one CPU device per host of a CPU pool."""
    jax.config.update("jax_platforms", "cpu")
    if job.shape is None:
        jax.config.update("jax_num_cpu_devices", job.num_processes)


def memory_limit(job: Job) -> Optional[int]:
    """A CPU pool's capacity per host: the container's memory limit, else its request; None if neither."""
    resources = job.spec.resources
    quantity = resources.limits.memory or resources.requests.memory
    if quantity is None:
        return None
    match = re.fullmatch(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)([KMGTPE]i|[kMGTPEm]?)", quantity.strip())
    if match is None:
        raise ConfigError(f"spec.resources: cannot read the memory quantity {quantity!r}")
    return int(float(match.group(1)) * _QUANTITY_UNITS[match.group(2)])


# ---- what would help ----------------------------------------------------------------------------------------

def knobs(config: WorkerConfig, job: Job, program: str, plan) -> list[str]:
    """The config settings that shrink `program`'s memory, each with its value now and what to try."""
    trainer, inference, found = config.trainer, config.inference, []
    data, fsdp, model = (plan.mesh_shape[axis] for axis in ("data", "fsdp", "model"))
    report = next(p for p in plan.programs if p.name == program)
    capacity = memory_limit(job) if job.shape is None else tpu.generation(job.shape).chip.compiler_hbm_bytes
    # float32 params, their gradients and AdamW's two moments: no activation setting shrinks these.
    state_alone = capacity is not None and report.params_bytes * 2 + report.optimizer_bytes > capacity
    if program == "train_step" and state_alone:
        if data > 1:
            found.append(f"trainer.mesh: data {data} -> fsdp (data: 1, fsdp: -1 shards params and optimizer "
                         f"state over the data-parallel devices too)")
    elif program == "train_step":
        more = [m for m in range(trainer.microbatches + 1, trainer.batch_size + 1)
                if trainer.batch_size % m == 0 and (trainer.batch_size // m) % (data * fsdp) == 0]
        if more:
            found.append(f"trainer.microbatches: {trainer.microbatches} -> {more[0]} (activations scale with the "
                         f"pairs per microbatch: {trainer.batch_size // trainer.microbatches} now)")
        if data > 1:
            found.append(f"trainer.mesh: data {data} -> fsdp (data: 1, fsdp: -1 shards params and optimizer "
                         f"state over the data-parallel devices too)")
        found.append(f"data.max_seq_len: {config.data.max_seq_len} -> {config.data.max_seq_len // 2} (activations "
                     f"scale with it; attention scores with its square)")
        for name, value, hint in _memory_options(trainer, "cpu" if job.shape is None else "tpu"):
            found.append(f"trainer.{name}: {value} -> {hint}")
        if trainer.compute_dtype == "float32":
            found.append("trainer.compute_dtype: float32 -> bfloat16 (halves the activations)")
    else:
        found.append(f"inference.batch_size: {inference.batch_size} -> {max(1, inference.batch_size // 2)} (the KV "
                     f"cache and activations scale with the rows)")
        found.append(f"inference.max_new_tokens: {inference.max_new_tokens} / inference.max_prompt_len: "
                     f"{inference.max_prompt_len} (the cache window is their sum)")
        if inference.mode == "host_data_parallel" and inference.tensor_parallel < plan.chips_per_host:
            found.append(f"inference.tensor_parallel: {inference.tensor_parallel} -> {plan.chips_per_host} (each "
                         f"host's copy of the weights split over its {plan.chips_per_host} chips)")
        if inference.mode == "host_data_parallel":
            found.append("inference.mode: host_data_parallel -> global_mesh (the weights stay sharded over every "
                         "chip instead of a whole copy per host)")
        if trainer.compute_dtype == "float32":
            found.append("trainer.compute_dtype: float32 -> bfloat16 (the inference weights and cache are in it)")
    if job.shape is not None:
        found.append(f"spec.tpu: a larger slice than {job.shape.accelerator_type}, with trainer.mesh.fsdp over its "
                     f"chips (the sharded state shrinks per chip; more slices would not: fsdp stays within a slice)")
    else:
        found.append("spec.resources.limits.memory (the container's memory)")
    return found


def _memory_options(trainer, platform: str) -> list[tuple[str, Any, str]]:
    """The train step's compute-for-memory settings (as they resolve on `platform`) not yet at their most frugal."""
    memory = MemoryOptions.from_config(trainer).resolve(platform)
    found = []
    if memory.remat != "full":
        found.append(("remat", trainer.remat, "full (the backward recomputes each layer's activations)"))
    if not memory.attention_block:
        found.append(("attention", trainer.attention, "blockwise (no [T, T] attention scores)"))
    if not memory.loss_chunk_tokens or memory.loss_chunk_tokens > DEFAULT_LOSS_CHUNK_TOKENS:
        found.append(("loss_chunk_tokens", trainer.loss_chunk_tokens,
                      f"{DEFAULT_LOSS_CHUNK_TOKENS} (no [sequences, T, vocab] logits at once)"))
    return found


def does_not_fit_message(result: dict[str, Any]) -> str:
    lines = []
    for program in result["programs"]:
        if program["fits"]:
            continue
        need = _gib(program["peak_bytes_per_chip"])
        why = " (XLA refused to compile it)" if program["refused"] else ""
        lines.append(f"{program['name']} does not fit: needs {need} GiB per chip against "
                     f"{_gib(program['capacity_bytes_per_chip'])} GiB ({result['capacity_source']}, "
                     f"{result['target']['type']}){why}. Config knobs that would help:")
        lines += [f"  - {knob}" for knob in program["knobs"]]
    return "\n".join(lines)


# ---- the tables ---------------------------------------------------------------------------------------------

def _gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def render(result: dict[str, Any]) -> str:
    t, m, tr, inf = result["target"], result["model"], result["train"], result["inference"]
    mesh = " x ".join(f"{axis} {size}" for axis, size in t["mesh"].items())
    out = [
        f"plan for {result['job']}: {t['type']}" + (f" ({t['topology']})" if t["topology"] else "")
        + f" x {t['slices']} slice(s): {t['hosts']} hosts x {t['chips_per_host']} chips = {t['chips']} chips; "
          f"trainer.mesh {mesh}",
        f"model: {m['params'] / 1e9:.2f} B params, {m['layers']} layers, d {m['hidden_size']}, ffn "
        f"{m['intermediate_size']}, {m['heads']}/{m['kv_heads']} heads, vocab {m['vocab_size']} ({m['source']})",
        f"train step: {tr['pairs']} pairs x 2 x {tr['seq_len']} tokens in {tr['microbatches']} microbatch(es), "
        f"{tr['compute_dtype']} compute, float32 params and AdamW",
    ]
    if inf:
        out.append(f"inference ({inf['mode']}): waves of {inf['rows']} rows x {inf['prompt_length']}-token prompts "
                   f"+ {inf['max_new_tokens']} new tokens, cache window {inf['first_window']} -> "
                   f"{inf['full_window']} slots, {inf['waves_per_pause']} wave(s) per pause")
    out += ["", f"memory per chip, GiB (capacity: {result['capacity_source']})"]
    header = ("program", "params", "optimizer", "inputs", "KV cache", "outputs", "temporaries", "peak", "capacity",
              "peak/cap", "fits", "compile s")
    rows = [header]
    for p in result["programs"]:
        capacity = p["capacity_bytes_per_chip"]
        ratio = "-" if not capacity else f"{100 * p['peak_bytes_per_chip'] / capacity:.0f}%"
        rows.append((p["name"], _gib(p["params_bytes_per_chip"]), _gib(p["optimizer_bytes_per_chip"]),
                     _gib(p["input_bytes_per_chip"]), _gib(p["kv_cache_bytes_per_chip"]),
                     _gib(p["output_bytes_per_chip"]), _gib(p["temp_bytes_per_chip"] + p["code_bytes_per_chip"]),
                     _gib(p["peak_bytes_per_chip"]), _gib(capacity), ratio,
                     ("yes" if p["fits"] else "NO") + (" (refused)" if p["refused"] else ""),
                     f"{p['compile_seconds']:.0f}"))
    out += _table(rows)
    out += [
        "  params: the program's weight arguments (inference: the compute-dtype copy), plus, for the inference",
        "  programs, the float32 training params that stay resident beside them; optimizer: AdamW state (resident",
        "  during inference); inputs/outputs: the other arguments and non-donated results; temporaries: XLA's",
        "  buffer assignment (and generated code); peak: the sum, an upper bound on what is live at once.",
    ]
    out += [f"  {p['name']}: {note}" for p in result["programs"] for note in p["notes"]]
    train = next((p for p in result["programs"] if p["name"] == "train_step" and not p["refused"]), None)
    if train and t["slices"] > 1:
        out += ["", f"train step collectives per chip: {train['ici_bytes_per_chip'] / 2**20:.1f} MiB within a "
                    f"slice (ICI), {train['dcn_bytes_per_chip'] / 2**20:.1f} MiB between slices (DCN: the gradient "
                    f"sums of data parallelism over the slices)"]
    out += ["", "FLOPs (counted from the shapes; XLA's cost analysis skips loop bodies): "
            + ", ".join(f"{p['name']} {p['flops']:.3g}" for p in result["programs"] if p["flops"])
            + " (train_step: one optimizer step; prefill: one wave; decode: one token step of a wave at the full "
              "window)"]
    if tr["recompute_flops"]:
        out.append(f"  the train step's rematerialisation runs its layers' forward again: {tr['recompute_flops']:.3g} "
                   f"more FLOPs on the chips (in the estimate, not in the model FLOPs above)")
    out += ["", f"compile time: {result['compile_seconds']:.0f} s in all (this machine)"]
    out += _render_estimates(result)
    return "\n".join(out)


def _render_estimates(result: dict[str, Any]) -> list[str]:
    e, anchor = result["estimates"], result["anchor"]
    if e["seconds"] is None:
        return ["", f"roofline estimate: none ({e['note']})"]
    hw, s = e["hardware"], e["seconds"]
    inf = result["inference"]
    out = ["", f"roofline estimate on {hw['generation']}: {hw['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16, "
               f"{hw['hbm_bytes_per_s_per_chip'] / 1e9:.0f} GB/s HBM, {hw['hbm_bytes_per_chip'] / 1e9:.0f} GB HBM "
               f"per chip ({hw['source']})"]
    rows = [("", "estimate", "anchor (measured)"),
            ("train step", f"{s['train_step']:.2f} s ({e['train_bound']}-bound)", "")]
    if inf:
        prompts = f"{inf['waves_per_pause']} wave(s) of {inf['rows']} x {inf['max_new_tokens']}"
        rows += [("prefill, one wave", f"{s['prefill']:.2f} s", ""),
                 ("decode tokens/s per host", f"{e['decode_tokens_per_s_per_host']:.0f} ({e['decode_bound']}-bound)",
                  f"~{anchor['tokens_per_s_per_host']:.0f}"),
                 (f"inference pause ({prompts})", f"{s['inference_pause']:.1f} s", f"{anchor['wall_s']} s wall")]
    rows.append((f"workflow: {e['train_steps']} train steps + {e['pauses']} pause(s)", f"{s['workflow']:.1f} s", ""))
    out += _table(rows)
    out += [f"  anchor: {anchor['what']} on {anchor['slice']}, {anchor['prompts']} prompts x {anchor['new_tokens']} "
            f"new tokens: {anchor['wall_s']} s wall, about {anchor['tokens_per_s_per_host']:.0f} tokens/s per host",
            "  the estimate is a lower bound on time: each program at the chip's peak FLOP/s or HBM bandwidth,",
            "  whichever binds; no interconnect, host work, compilation or checkpoints; every prompt runs to",
            "  max_new_tokens"]
    return out


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [str(cell).ljust(width) if i == 0 else str(cell).rjust(width) for i, (cell, width) in
                 enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines
