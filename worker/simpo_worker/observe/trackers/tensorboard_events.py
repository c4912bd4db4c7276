"""TensorBoard event files under `<output_dir>/tensorboard`: a scalar per metric at its step, and a text table of
the completions sampled at each pause. Written with TensorBoard's own event writer and summary protos (no
TensorFlow). Open them with `tensorboard --logdir <output_dir>/tensorboard`.

Each start writes a new event file that opens with a SessionLog START at the step after the resume point: TensorBoard
then drops what earlier files hold from that step on (work lost in a crash and redone), as it does for TensorFlow's
own restarts.

A local output dir gets the events as they are written. An object store cannot: TensorBoard's writer, without
TensorFlow, appends to its file through fsspec, and gcsfs has no append (it overwrites, warning, and keeps only the
last event). So for a URL the events go to a local file and the whole file is uploaded (simpo_worker.store.storage) at
every flush: each checkpoint, each pause, and the end. A crash loses at most what the restart redoes anyway.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import fsspec
import numpy as np
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from simpo_worker.observe.trackers import SAMPLE_COLUMNS, sample_table, scalars
from simpo_worker.store import storage

SAMPLES_TAG = "inference/samples"


def logdir(output_dir: str) -> str:
    return storage.join(output_dir, "tensorboard")


class TensorBoardTracker:
    takes_samples = True

    def __init__(self, output_dir: str):
        self.target = logdir(output_dir)
        fs, path = fsspec.core.url_to_fs(self.target)
        self._staging = None if storage.is_local(fs) else tempfile.mkdtemp(prefix="simpo-tensorboard-")
        self._logdir = path if self._staging is None else self._staging
        self._writer: EventFileWriter | None = None

    def start(self, step: int) -> None:
        self._writer = EventFileWriter(self._logdir)
        self._writer.add_event(Event(wall_time=time.time(), step=step + 1,
                                     session_log=SessionLog(status=SessionLog.START)))

    def record(self, record: dict[str, Any]) -> None:
        event = Event(wall_time=time.time(), step=record["step"])
        for tag, value in scalars(record):
            event.summary.value.extend(scalar_pb(tag, value).value)
        self._writer.add_event(event)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        # A 2-D string tensor: the text plugin shows it as a table, the first row as its header.
        table = np.array([list(SAMPLE_COLUMNS)] + [[str(cell) for cell in row] for row in sample_table(rows)],
                         dtype=np.object_)
        event = Event(wall_time=time.time(), step=step)
        event.summary.value.extend(text_pb(SAMPLES_TAG, table).value)
        self._writer.add_event(event)

    def flush(self) -> None:
        if self._writer is None:
            return
        self._writer.flush()
        if self._staging is not None:
            # This start's one event file, under the writer's own unique name.
            for name in os.listdir(self._staging):
                with open(os.path.join(self._staging, name), "rb") as handle:
                    storage.write_atomic(storage.join(self.target, name), handle.read(), "TensorBoard event file")

    def close(self, error: BaseException | None) -> None:
        if self._writer is None:
            return
        self.flush()
        self._writer.close()
        self._writer = None
        if self._staging is not None:
            shutil.rmtree(self._staging)
