"""Kubernetes' termination notice (SIGTERM: preemption, node maintenance, eviction, deletion) and the orderly stop it
asks for, within the pod's terminationGracePeriodSeconds.

The signal handler only records the notice; the run acts on it where every host can act together:
- between train steps, the hosts agree (a one-integer allgather after every step, which every host runs), so all
  of them checkpoint the same step and stop;
- in an inference pause, decoding is abandoned at the next chunk: host_data_parallel hosts decode alone, so each
  acts on its own notice; global_mesh hosts decode together, so they agree first, at the same chunk. The pause's
  own checkpoint (trainer.checkpoint.at_eval) is what the restart resumes from.
Then the worker exits ExitCode.PREEMPTED (retryable). The JobSet restarts without spending maxRestarts when the pod
carries the DisruptionTarget condition (simpo_operator.render's failure policies).

Why not jax's preemption service (multihost_utils.reached_preemption_sync_point): it takes over SIGTERM and answers
only at train-step sync points, so a notice during an inference pause, or in a single-process run, goes unseen.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped on a termination notice; `checkpointed_step` is where the restart resumes (None: the newest
    checkpoint from before)."""

    def __init__(self, where: str, checkpointed_step: int | None):
        self.checkpointed_step = checkpointed_step
        resumes = "the newest earlier checkpoint" if checkpointed_step is None else f"step {checkpointed_step}"
        super().__init__(f"termination notice (SIGTERM) {where}; the restart resumes from {resumes}")


class TerminationNotice:
    """Records SIGTERM from the moment it is installed (main thread only, as Python's signal handlers)."""

    def __init__(self) -> None:
        self._received = threading.Event()

    def install(self) -> "TerminationNotice":
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if not self._received.is_set():
            log.warning("SIGTERM: stopping at the next step or decode chunk")
        self._received.set()

    @property
    def received(self) -> bool:
        """This host's own notice."""
        return self._received.is_set()

    def received_anywhere(self) -> bool:
        """Whether any host has the notice. A collective: every host must call it at the same point."""
        if jax.process_count() == 1:
            return self.received
        flags = multihost_utils.process_allgather(np.array([self.received], np.int32))
        return bool(np.asarray(flags).any())


def disable_jax_preemption_service() -> None:
    """Keep SIGTERM ours: jax.distributed.initialize would otherwise install the preemption service's handler."""
    jax.config.update("jax_enable_preemption_service", False)
