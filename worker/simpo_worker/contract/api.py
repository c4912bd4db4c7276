"""The contract between the operator and the worker, in one dependency-free module (standard library only).

Both halves import it: the API identity of the SimpoInterleaveJob resource, the `status.progress` the worker
leader writes, the environment a pod gives its worker, and the exit codes the pod failure policy reads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Optional

# ---- the resource ------------------------------------------------------------------------------------------
GROUP = "simpo.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SimpoInterleaveJob"
PLURAL = "simpointerleavejobs"
SINGULAR = "simpointerleavejob"
SHORT_NAMES = ["sij"]
CATEGORIES = ["simpo", "all-jobs"]


# ---- status.progress: written by the worker leader, never by the operator -----------------------------------
Stage = Literal["train", "infer", "eval", "done"]


@dataclass(frozen=True)
class Progress:
    """Where the run is, written by the worker leader through the status subresource (best effort)."""

    stage: Stage
    step: int
    totalSteps: int
    promptsDone: Optional[int] = None
    promptsTotal: Optional[int] = None
    tokens: Optional[int] = None
    # The latest held-out evaluation (data.eval_files, at each inference pause), kept in every later report: the
    # step it ran at, the SimPO loss and the reward accuracy, each the mean over every held-out pair.
    evalStep: Optional[int] = None
    evalLoss: Optional[float] = None
    evalAccuracy: Optional[float] = None
    # RFC 3339, set by the reporter when it sends the update.
    updateTime: Optional[str] = None


# ---- the pod environment (see simpo_operator.pod_env for how a pod gets each value) -------------------------
ENV_CONFIG = "SIMPO_CONFIG"
ENV_JOB_NAME = "SIMPO_JOB_NAME"
ENV_JOB_NAMESPACE = "SIMPO_JOB_NAMESPACE"
ENV_NUM_SLICES = "SIMPO_NUM_SLICES"
ENV_HOSTS_PER_SLICE = "SIMPO_HOSTS_PER_SLICE"
ENV_SLICE_INDEX = "SIMPO_SLICE_INDEX"
ENV_HOST_INDEX = "SIMPO_HOST_INDEX"
# `json`: one JSON object per log line (severity, message, host, step), which Cloud Logging parses; `text` otherwise.
ENV_LOG_FORMAT = "SIMPO_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Set by GKE on TPU pods; jax.distributed.initialize() reads them itself.
ENV_TPU_WORKER_HOSTNAMES = "TPU_WORKER_HOSTNAMES"
ENV_MEGASCALE_COORDINATOR_ADDRESS = "MEGASCALE_COORDINATOR_ADDRESS"
ENV_MEGASCALE_NUM_SLICES = "MEGASCALE_NUM_SLICES"
ENV_MEGASCALE_SLICE_ID = "MEGASCALE_SLICE_ID"
ENV_MEGASCALE_PORT = "MEGASCALE_PORT"

# Where the pod mounts the worker config (the ConfigMap's one key).
CONFIG_DIR = "/etc/simpo"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
COORDINATOR_PORT = 8476  # JAX's default coordinator port
MEGASCALE_PORT = 8080


# ---- exit codes -------------------------------------------------------------------------------------------
class ExitCode(enum.IntEnum):
    """The worker's exit codes. The non-retryable ones fail the JobSet at once (its pod failure policy); any
    other non-zero code restarts every host, which resumes from the newest complete checkpoint."""

    DONE = 0
    RETRYABLE = 1
    PREEMPTED = 3
    BAD_CONFIG = 10
    BAD_DATA = 11
    BAD_MODEL = 12
    OUTPUT_UNUSABLE = 13
    OUT_OF_MEMORY = 14


EXIT_CODE_MEANINGS = {
    ExitCode.DONE: "done",
    ExitCode.RETRYABLE: "retryable failure (the JobSet restarts and every host resumes from its checkpoint)",
    ExitCode.PREEMPTED: "stopped on a termination notice (SIGTERM: preemption, maintenance) after checkpointing; "
                        "the restart resumes there",
    ExitCode.BAD_CONFIG: "bad config",
    ExitCode.BAD_DATA: "bad data (preference data, prompts)",
    ExitCode.BAD_MODEL: "bad or missing model (weights, tokenizer)",
    ExitCode.OUTPUT_UNUSABLE: "output dir not usable",
    ExitCode.OUT_OF_MEMORY: "out of device memory (XLA RESOURCE_EXHAUSTED at compile time or run time): the same "
                            "config fails the same way; `simpo-interleave plan` shows which program and the knobs "
                            "that shrink it",
}
# Sorted, for the JobSet pod failure policy (onExitCodes In [...]).
NON_RETRYABLE_EXIT_CODES = tuple(int(code) for code in sorted(ExitCode) if code >= ExitCode.BAD_CONFIG)
