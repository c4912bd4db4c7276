"""What `simpo-interleave plan` finds about a job's programs: each compiled program's memory per chip, FLOPs and
collectives (ProgramReport), and the job's plan (Plan: every program and the shapes the estimates need).

What each byte count per chip holds, and where it comes from:
- params, optimizer state, KV cache: the program's arguments of that kind (and the KV cache it outputs), from their
  shapes and shardings; during inference the training params and optimizer state stay resident beside the
  programs, so they are added to the inference programs too;
- inputs: XLA's argument size minus the above (batches, prompts, per-row state; includes layout padding);
- outputs: XLA's output size, minus what aliases a donated argument and the KV cache counted above;
- temporaries and generated code: XLA's memory analysis;
- peak: the sum of the above, an upper bound on what is live at once;
- FLOPs: model.flops' count (XLA's cost analysis skips loop bodies; its figure is kept as xla_flops_per_chip).
- collectives: the bytes one call moves per chip inside a slice (ICI) and between slices (DCN, multislice), read
  from the compiled HLO (plan.hlo).
When XLA refuses to compile for lack of memory (RESOURCE_EXHAUSTED), its message states the program's whole need
(arguments, outputs and temporaries: what it calls "HLO temporaries"); the program is reported with the arguments
counted above and the rest of that need as temporaries, and `refused` holding the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from simpo_worker.contract.config import ArchitectureConfig, WorkerConfig
from simpo_worker.infer.engine import WaveShapes
from simpo_worker.model import flops

# The programs, in the order a job runs them (plan.programs, plan.inference).
TRAIN_STEP, PREFILL, GROW, DECODE = "train_step", "prefill", "decode_grow_window", "decode"


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

    def fits(self, capacity: Optional[int]) -> bool:
        """Compiled, and its peak within `capacity` bytes per chip (None: no capacity to check against)."""
        return self.refused is None and (capacity is None or self.peak_bytes <= capacity)

    def to_json(self, capacity: Optional[int], knobs: list[str]) -> dict[str, Any]:
        """`simpo-interleave plan --json`'s record of the program; `knobs`: the config settings that would shrink
        it, where it does not fit."""
        return {
            "name": self.name, "fits": self.fits(capacity),
            "peak_bytes_per_chip": self.peak_bytes, "capacity_bytes_per_chip": capacity,
            "params_bytes_per_chip": self.params_bytes, "optimizer_bytes_per_chip": self.optimizer_bytes,
            "input_bytes_per_chip": self.input_bytes, "kv_cache_bytes_per_chip": self.kv_cache_bytes,
            "output_bytes_per_chip": self.output_bytes, "temp_bytes_per_chip": self.temp_bytes,
            "code_bytes_per_chip": self.code_bytes, "flops": self.flops,
            "ici_bytes_per_chip": self.ici_bytes, "dcn_bytes_per_chip": self.dcn_bytes,
            "xla_flops_per_chip": self.xla_flops_per_chip, "compile_seconds": round(self.compile_seconds, 1),
            "refused": self.refused, "notes": self.notes, "knobs": knobs,
        }


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

    def to_json(self, config: WorkerConfig, capacity: Optional[int],
                knobs: Callable[[ProgramReport], list[str]]) -> dict[str, Any]:
        """`simpo-interleave plan --json`'s records of what the plan knows: the devices' shape, the model, the
        train step, the inference waves and every program (`knobs(program)`: the settings that would shrink a
        program that does not fit `capacity`)."""
        trainer, inference, wave = config.trainer, config.inference, self.wave
        programs = [program.to_json(capacity, [] if program.fits(capacity) else knobs(program))
                    for program in self.programs]
        return {
            "fits": all(program["fits"] for program in programs),
            "target": {"chips": self.chips, "hosts": self.hosts, "chips_per_host": self.chips_per_host,
                       "mesh": self.mesh_shape},
            "model": {"source": config.model.source or "model.architecture", "params": flops.param_count(self.arch),
                      "layers": self.arch.num_layers, "hidden_size": self.arch.hidden_size,
                      "intermediate_size": self.arch.intermediate_size, "heads": self.arch.num_heads,
                      "kv_heads": self.arch.num_kv_heads, "vocab_size": self.arch.vocab_size},
            "train": {"recompute_flops": self.train_recompute_flops, "pairs": trainer.batch_size,
                      "microbatches": trainer.microbatches, "seq_len": config.data.max_seq_len,
                      "compute_dtype": trainer.compute_dtype, "steps": trainer.num_train_steps},
            "inference": None if wave is None else {
                "mode": inference.mode, "rows": wave.slots, "prompt_length": wave.prompt_length,
                "max_new_tokens": inference.max_new_tokens, "first_window": wave.windows[0][0],
                "full_window": wave.full_window, "waves_per_pause": self.waves_per_pause,
                "pauses": len(inference.schedule(trainer.num_train_steps))},
            "programs": programs,
        }
