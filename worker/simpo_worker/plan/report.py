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
from typing import Optional

from simpo_worker.contract.config import ArchitectureConfig
from simpo_worker.infer.engine import WaveShapes

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

