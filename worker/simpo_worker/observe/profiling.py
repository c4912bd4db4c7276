"""jax.profiler traces of chosen train steps and of the inference pauses (trainer.profile_steps,
inference.profile), each written under {output_dir}/profiles/{what}_step_{step}/host_{i}/.

A trace is recorded into a local temporary folder and then copied to the output dir, so gs:// works without the
profiler's own filesystem support. Each holds the XSpace (`*.xplane.pb`, for TensorBoard's profile plugin /
XProf) and a Perfetto trace (`*.trace.json.gz`, for https://ui.perfetto.dev).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Iterator

import jax

from simpo_worker.contract.config import WorkerConfig
from simpo_worker.store import storage

log = logging.getLogger(__name__)

PROFILES = "profiles"


def profile_dir(output_dir: str, what: str, step: int, process_index: int) -> str:
    return storage.join(output_dir, PROFILES, f"{what}_step_{step}", f"host_{process_index}")


class Profiler:
    def __init__(self, config: WorkerConfig):
        self.output_dir = config.output_dir
        self.train_steps = set(config.trainer.profile_steps)
        self.inference = config.inference.profile
        self.this_host = config.trainer.profile_hosts == "all" or jax.process_index() == 0

    def train_step(self, step: int) -> contextlib.AbstractContextManager:
        """Around the train step that makes `step`."""
        return self._trace("train", step) if step in self.train_steps else contextlib.nullcontext()

    def inference_pause(self, step: int) -> contextlib.AbstractContextManager:
        return self._trace("inference", step) if self.inference else contextlib.nullcontext()

    @contextlib.contextmanager
    def _trace(self, what: str, step: int) -> Iterator[None]:
        if not self.this_host:
            yield
            return
        target = profile_dir(self.output_dir, what, step, jax.process_index())
        with tempfile.TemporaryDirectory(prefix="simpo-profile-") as local:
            with jax.profiler.trace(local, create_perfetto_trace=True):
                yield
            storage.upload_tree(local, target, f"{what} profile")
        log.info("%s step %d: profile written to %s", what, step, target)
