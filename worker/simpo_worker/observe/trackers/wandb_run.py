"""A Weights & Biases run: every metric at its training step, the run's config, and a table of the completions
sampled at each pause.

Online when WANDB_API_KEY is set, else offline: the run directory (`wandb/offline-run-<time>-<id>` under the output
dir) is uploaded later with `wandb sync`. wandb writes only to local disk, so for a URL output dir the run directory
is made locally and copied under `<output_dir>/wandb` when the run closes.

The run id is derived from the job's identity (its namespace and name, from the pod environment, and its output
dir, where its checkpoints live), with resume="allow": every restart of a job, which resumes from the same
checkpoints, continues the same W&B run. W&B keeps a run's steps increasing: the steps a restart redoes after a
crash (deterministic, so the same values) are already there and W&B ignores them, with a warning.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any, Mapping

import fsspec
import wandb

from simpo_worker.contract import api
from simpo_worker.contract.config import WorkerConfig
from simpo_worker.contract.schema import to_data
from simpo_worker.observe.trackers import SAMPLE_COLUMNS, sample_table, scalars
from simpo_worker.store import storage

SAMPLES_KEY = "inference/samples"


def run_identity(output_dir: str, env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(run id, display name) of the job running in `env` with `output_dir`; a bare `simpo-interleave worker`
    (no job in its environment) is named by its output dir alone."""
    namespace, name = env.get(api.ENV_JOB_NAMESPACE, ""), env.get(api.ENV_JOB_NAME, "")
    identity = "\n".join((namespace, name, output_dir.rstrip("/")))
    run_id = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    return run_id, name or output_dir.rstrip("/").rsplit("/", 1)[-1]


class WandbTracker:
    takes_samples = True

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.target = storage.join(config.output_dir, "wandb")
        fs, path = fsspec.core.url_to_fs(config.output_dir)
        self._staging = None if storage.is_local(fs) else tempfile.mkdtemp(prefix="simpo-wandb-")
        self._dir = path if self._staging is None else self._staging
        self._run = None

    def start(self, step: int) -> None:
        run_id, name = run_identity(self.config.output_dir)
        settings = self.config.trainer.wandb
        os.makedirs(self._dir, exist_ok=True)
        self._run = wandb.init(
            project=settings.project, entity=settings.entity, id=run_id, name=name, resume="allow",
            mode="online" if os.environ.get("WANDB_API_KEY") else "offline", dir=self._dir,
            config=to_data(self.config),
            # console off: the worker's stdout and stderr stay its own (wandb would wrap them to capture logs).
            settings=wandb.Settings(init_timeout=settings.init_timeout_s, finish_timeout=settings.finish_timeout_s,
                                    console="off"))

    def record(self, record: dict[str, Any]) -> None:
        self._run.log(dict(scalars(record)), step=record["step"])

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._run.log({SAMPLES_KEY: wandb.Table(columns=list(SAMPLE_COLUMNS), data=sample_table(rows))}, step=step)

    def flush(self) -> None:
        pass  # wandb's service writes (and, online, uploads) as the records come

    def close(self, error: BaseException | None) -> None:
        if self._run is None:
            return
        run_dir = self._run.settings.sync_dir
        exit_code = 0 if error is None else 1
        self._run.finish(exit_code=exit_code)
        self._run = None
        # Stops wandb's service process now, not at interpreter exit (which a failing worker skips), and only then is
        # the run's file complete on disk.
        wandb.teardown(exit_code)
        if self._staging is not None:
            self._upload(run_dir)
            shutil.rmtree(self._staging)

    def _upload(self, run_dir: str) -> None:
        """The finished run directory to `<output_dir>/wandb/<its name>`."""
        storage.upload_tree(run_dir, storage.join(self.target, os.path.basename(run_dir)), "W&B run files")
