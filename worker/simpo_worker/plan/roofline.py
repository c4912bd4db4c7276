"""Roofline estimates of a job's time, from its plan (plan.report) and a chip's published peak FLOP/s and HBM bandwidth.

Each program takes as long as the slower of its FLOPs at the chip's peak (the train step's with the forward that
full rematerialisation runs again) and its HBM traffic at the chip's bandwidth: a lower bound on time (an upper bound on speed). Left out: the interconnect (FSDP all-gathers and
gradient reductions; global_mesh inference's collectives), host work between decode chunks, compilation,
checkpoints and data loading. The traffic counted:
- train step: the weights read twice in the compute dtype (forward and backward, after FSDP's all-gather) and the
  optimizer update of the chip's float32 shard (read params, grads, two moments; write params, two moments);
  activations are not counted (the step is compute-bound at these sizes);
- prefill: the inference weights read once, the KV cache written;
- decode, each step: the inference weights and the whole cache window read (the code reads every slot);
each chip's weights and cache as the compiled programs lay them out, the FLOPs split evenly over the wave's chips.
Inference assumes every prompt runs to max_new_tokens (a fixed-length measurement, as the anchor below); the real
engine stops a wave once every row has stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from simpo_worker.model import flops
from simpo_worker.plan.report import DECODE, TRAIN_STEP, Plan

OPTIMIZER_TRAFFIC = 7  # float32 arrays of the chip's shard read or written by the update


@dataclass(frozen=True)
class Anchor:
    """A measured run of the reference workflow's inference, to set beside the estimate."""

    what: str
    slice: str
    prompts: int
    new_tokens: int
    wall_s: float
    tokens_per_s_per_host: float


# The reference implementation's measured inference (DESIGN.md: the known state of the art).
LEVANTER_V5P_32 = Anchor(what="Levanter train_simpo.py, host-data-parallel inference", slice="v5p-32",
                         prompts=128, new_tokens=2048, wall_s=221.8, tokens_per_s_per_host=290.0)


@dataclass(frozen=True)
class Estimates:
    train_step_s: float
    train_bound: str  # "compute" | "memory"
    prefill_s: float
    decode_wave_s: float  # one wave, every row to max_new_tokens
    decode_bound: str
    decode_tokens_per_s_per_host: float
    inference_pause_s: float  # every wave of one pause
    workflow_s: float  # num_train_steps train steps + every pause
    train_steps: int
    pauses: int

    def to_json(self) -> dict:
        data = asdict(self)
        data["seconds"] = {"train_step": self.train_step_s, "prefill": self.prefill_s,
                           "decode_wave": self.decode_wave_s, "inference_pause": self.inference_pause_s,
                           "workflow": self.workflow_s}
        return data


def _time(flop_count: float, bytes_moved: float, peak_flops: float, bytes_per_s: float) -> tuple[float, str]:
    compute, memory = flop_count / peak_flops, bytes_moved / bytes_per_s
    return (compute, "compute") if compute >= memory else (memory, "memory")


def estimate(plan: Plan, peak_flops: float, hbm_bytes_per_s: float, train_steps: int, pauses: int) -> Estimates:
    """Per-chip peak bf16 FLOP/s and HBM bytes/s -> the job's times (see the module docstring)."""
    a = plan.arch
    train = next(p for p in plan.programs if p.name == TRAIN_STEP)
    weights_read = 2 * flops.param_count(a) * plan.compute_itemsize
    train_s, train_bound = _time((train.flops + plan.train_recompute_flops) / plan.chips,
                                 weights_read + OPTIMIZER_TRAFFIC * train.params_bytes, peak_flops, hbm_bytes_per_s)

    prefill_s = decode_s = tokens_per_host = pause_s = 0.0
    decode_bound = "n/a"
    wave = plan.wave
    if wave is not None:
        # A wave's work splits over the devices it runs on (an ideal split); the bytes each chip reads are its own
        # weights and cache, from the compiled programs' shardings (the cache scaled to the window of each step).
        sharing = plan.inference_devices
        weights = plan.decode_weight_bytes_per_chip
        decode = next(p for p in plan.programs if p.name == DECODE)
        cache = lambda window: decode.kv_cache_bytes * window / wave.full_window  # noqa: E731
        prefill_s, _ = _time(flops.prefill_flops(a, wave.slots, wave.prompt_length) / sharing,
                             weights + cache(wave.windows[0][0]), peak_flops, hbm_bytes_per_s)
        bounds, steps = set(), 0
        for window, count in wave.windows:
            step_s, bound = _time(flops.decode_step_flops(a, wave.slots, window) / sharing,
                                  weights + cache(window), peak_flops, hbm_bytes_per_s)
            decode_s += count * step_s
            steps += count
            bounds.add(bound)
        decode_bound = "/".join(sorted(bounds)) if bounds else "n/a"
        # Tokens each host gets from one wave: its rows (host-DP), or its share of the one global wave.
        hosts_sharing = 1 if plan.inference_mode == "host_data_parallel" else plan.hosts
        tokens_per_host = wave.slots * steps / hosts_sharing / decode_s if decode_s else 0.0
        pause_s = plan.waves_per_pause * (prefill_s + decode_s)
    return Estimates(train_step_s=train_s, train_bound=train_bound, prefill_s=prefill_s, decode_wave_s=decode_s,
                     decode_bound=decode_bound, decode_tokens_per_s_per_host=tokens_per_host,
                     inference_pause_s=pause_s, workflow_s=train_steps * train_s + pauses * pause_s,
                     train_steps=train_steps, pauses=pauses)
