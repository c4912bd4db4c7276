"""Experiment tracking: the leader's metrics records, sent to every tracker in `trainer.trackers`.

A tracker takes, in order: `start(step)` once the run knows where it resumes (the checkpoint's step, 0 when fresh;
what was recorded past it is lost work that the run redoes), then `record(record)` for each metrics record (a
train step, and at each pause the eval and inference records: see simpo_worker.interleave) and `samples(step,
rows)` for a sample of the pause's completions, `flush()` whenever the run checkpoints or finishes a pause, and
`close(error)` once at the end (`error`: what ended the run, None when it finished).

jsonl (simpo_worker.observe.metrics) is always on: the records are the run's own history, which resumes and tests read.
tensorboard and wandb are imported only when configured. Only the leader (process 0) tracks; every other process
gets no trackers.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

from simpo_worker.contract.config import WorkerConfig
from simpo_worker.observe.metrics import MetricsWriter
from simpo_worker.parallel.distributed import is_leader

# Completions each host contributes to a pause's sample (its first rows, in global prompt order).
SAMPLES_PER_HOST = 4
SAMPLE_COLUMNS = ("step", "process_index", "global_prompt_index", "prompt", "completion", "finish_reason")


class Tracker(Protocol):
    takes_samples: bool

    def start(self, step: int) -> None: ...
    def record(self, record: dict[str, Any]) -> None: ...
    def samples(self, step: int, rows: list[dict[str, Any]]) -> None: ...
    def flush(self) -> None: ...
    def close(self, error: BaseException | None) -> None: ...


class JsonlTracker:
    """The metrics records under `<output_dir>/metrics` (simpo_worker.store.outputs); completions are in inference/."""

    takes_samples = False

    def __init__(self, output_dir: str):
        self.writer = MetricsWriter(output_dir)

    def start(self, step: int) -> None:
        self.writer.discard_after(step)

    def record(self, record: dict[str, Any]) -> None:
        self.writer.write(record)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def flush(self) -> None:
        pass  # every record is its own file, written whole

    def close(self, error: BaseException | None) -> None:
        pass


class Trackers:
    """Every configured tracker, called in turn; a context manager that closes them with the error, if any."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    @property
    def takes_samples(self) -> bool:
        return any(tracker.takes_samples for tracker in self.trackers)

    def start(self, step: int) -> None:
        for tracker in self.trackers:
            tracker.start(step)

    def record(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.record(record)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        for tracker in self.trackers:
            if tracker.takes_samples:
                tracker.samples(step, rows)

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self, error: BaseException | None = None) -> None:
        for tracker in self.trackers:
            tracker.close(error)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(error)


def open_trackers(config: WorkerConfig) -> Trackers:
    """The leader's trackers for `config` (nothing is started yet); none on the other processes."""
    if not is_leader():
        return Trackers([])
    trackers: list[Tracker] = [JsonlTracker(config.output_dir)]
    if "tensorboard" in config.trainer.trackers:
        from simpo_worker.observe.trackers.tensorboard_events import TensorBoardTracker

        trackers.append(TensorBoardTracker(config.output_dir))
    if "wandb" in config.trainer.trackers:
        from simpo_worker.observe.trackers.wandb_run import WandbTracker

        trackers.append(WandbTracker(config))
    return Trackers(trackers)


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """A record's numbers as `<event>/<name>` tags, and those of a mapping one level down as
    `<event>/<name>/<key>` (phase_seconds, finish_reasons). Deeper detail (compile_cache's per-program counts),
    booleans, strings and missing values stay in the jsonl records alone."""
    event = record["event"]
    for key, value in record.items():
        if key in ("event", "step"):
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for inner, number in items:
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                yield (f"{event}/{key}" if inner is None else f"{event}/{key}/{inner}"), float(number)


def sample_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The sample's rows as SAMPLE_COLUMNS lists."""
    return [[row[column] for column in SAMPLE_COLUMNS] for row in rows]
