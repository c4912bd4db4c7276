"""trainer.trackers: TensorBoard event files and W&B offline runs from real worker runs, read back with
TensorBoard's own reader and W&B's own record protos, against the run's jsonl metrics and completions."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import fsspec
import pytest
from gcs_emulator import BUCKET, gcs_emulator, point_this_process_at
from simpo_worker.contract.config import TrainerConfig, parse_worker_config
from simpo_worker.contract.errors import ConfigError
from simpo_worker.contract.schema import openapi_schema
from simpo_worker.observe.trackers import SAMPLE_COLUMNS, open_trackers
from simpo_worker.observe.trackers.tensorboard_events import TensorBoardTracker
from simpo_worker.observe.trackers.wandb_run import run_identity
from tracker_files import (scalar_steps, shard_rows, tensorboard_series, text_tables, wandb_history,
                           wandb_records)
from worker_runs import checked, eval_config, records, run_worker, tiny_config

JOB = {"SIMPO_JOB_NAMESPACE": "team-a", "SIMPO_JOB_NAME": "simpo-run"}
# No network: offline whatever the environment holds.
OFFLINE = {"WANDB_API_KEY": "", "WANDB_MODE": "offline"}


@cache
def tracked_run() -> tuple[str, list[float]]:
    """eval_config (pauses with held-out evaluation after steps 2 and 5) with every tracker, as a job: stopped and
    checkpointed at step 3, then restarted to the end. Its output dir and each start's wall time."""
    output_dir = Path(tempfile.mkdtemp(prefix="simpo-trackers-")) / "run"
    config = eval_config(output_dir, **{"trainer.trackers": ["jsonl", "tensorboard", "wandb"]})
    seconds = []
    for args in (("--stop-at-step", "3"), ()):
        started = time.perf_counter()
        checked(run_worker(config, *args, env={**JOB, **OFFLINE}))
        seconds.append(time.perf_counter() - started)
    return str(output_dir), seconds


def wandb_run_dirs(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "wandb", "offline-run-*")))


def test_tensorboard_holds_every_step_and_each_pause():
    output_dir, _ = tracked_run()
    logdir = os.path.join(output_dir, "tensorboard")
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 2  # one per start
    events = tensorboard_series(logdir)
    train = records(output_dir, "train")
    assert [r["step"] for r in train] == list(range(1, 8))
    for name in ("loss", "rewards/accuracies", "grad_norm", "learning_rate"):
        assert scalar_steps(events, f"train/{name}") == {
            r["step"]: pytest.approx(r[name], rel=1e-6) for r in train}, name
    evaluations = records(output_dir, "eval")
    assert [r["step"] for r in evaluations] == [2, 5]
    for name in ("loss", "rewards/accuracies", "rewards/margins", "pairs"):
        assert scalar_steps(events, f"eval/{name}") == {
            r["step"]: pytest.approx(r[name], rel=1e-6) for r in evaluations}, name
    inference = records(output_dir, "inference")
    assert scalar_steps(events, "inference/completion_tokens") == {r["step"]: r["completion_tokens"]
                                                                   for r in inference}
    assert scalar_steps(events, "inference/phase_seconds/total") == {
        r["step"]: pytest.approx(r["phase_seconds"]["total"], rel=1e-6) for r in inference}
    samples = text_tables(events, "inference/samples")
    assert sorted(samples) == [2, 5]
    for step, (header, *rows) in samples.items():
        assert header == list(SAMPLE_COLUMNS)
        assert rows == [[str(row[column]) for column in SAMPLE_COLUMNS] for row in shard_rows(output_dir, step)]


def test_wandb_offline_run_resumed_under_the_jobs_run_id():
    output_dir, seconds = tracked_run()
    run_id, name = run_identity(output_dir, JOB)
    assert name == "simpo-run"
    first, second = wandb_run_dirs(output_dir)  # one per start, the same run id
    for run_dir in (first, second):
        assert run_dir.endswith(f"-{run_id}")
        [run] = [r.run for r in wandb_records(os.path.join(run_dir, f"run-{run_id}.wandb"))
                 if r.WhichOneof("record_type") == "run"]
        assert (run.run_id, run.display_name, run.project) == (run_id, "simpo-run", "simpo-interleave")
    history = wandb_history(os.path.join(first, f"run-{run_id}.wandb"))
    resumed = wandb_history(os.path.join(second, f"run-{run_id}.wandb"))
    assert sorted(history) == [1, 2, 3] and sorted(resumed) == [4, 5, 6, 7]
    history.update(resumed)
    for r in records(output_dir, "train"):
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
    for r in records(output_dir, "eval"):
        assert history[r["step"]]["eval/loss"] == pytest.approx(r["loss"], rel=1e-12)
    for r in records(output_dir, "inference"):
        assert history[r["step"]]["inference/completion_tokens"] == r["completion_tokens"]
        table = history[r["step"]]["inference/samples"]
        assert table["_type"] == "table-file"
        run_dir = first if r["step"] <= 3 else second
        saved = json.loads(Path(run_dir, "files", table["path"]).read_text())
        assert saved["columns"] == list(SAMPLE_COLUMNS)
        assert saved["data"] == [[row[column] for column in SAMPLE_COLUMNS]
                                 for row in shard_rows(output_dir, r["step"])]
    print(f"tracked run: first start {seconds[0]:.1f}s, restart {seconds[1]:.1f}s")


def test_run_identity_is_the_jobs():
    base = run_identity("gs://b/run", JOB)[0]
    assert run_identity("gs://b/run/", JOB)[0] == base  # the same output dir
    assert run_identity("gs://b/run", {**JOB, "SIMPO_JOB_NAME": "other"})[0] != base
    assert run_identity("gs://b/run", {**JOB, "SIMPO_JOB_NAMESPACE": "team-b"})[0] != base
    assert run_identity("gs://b/run2", JOB)[0] != base
    assert run_identity("/data/run", {}) == (run_identity("/data/run", {})[0], "run")


def test_a_restart_drops_the_steps_it_redoes_from_tensorboard(tmp_path):
    """Steps 4 and 5 recorded, then lost in a crash after the checkpoint at step 3: the restart's values replace
    them (its file opens with SessionLog START at step 4)."""
    output_dir = str(tmp_path / "run")
    crashed = TensorBoardTracker(output_dir)
    crashed.start(0)
    for step in range(1, 6):
        crashed.record({"event": "train", "step": step, "loss": float(step)})
    crashed.close(RuntimeError("crash"))
    restarted = TensorBoardTracker(output_dir)
    restarted.start(3)
    for step in range(4, 7):
        restarted.record({"event": "train", "step": step, "loss": 10.0 * step})
    restarted.close(None)
    events = tensorboard_series(os.path.join(output_dir, "tensorboard"))
    assert scalar_steps(events, "train/loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0, 6: 60.0}


def test_trackers_on_object_storage(monkeypatch, tmp_path):
    """A gs:// output dir: TensorBoard events uploaded whole at every flush (gcsfs cannot append), the W&B run
    directory at the end; both read back from the bucket."""
    with gcs_emulator() as env:
        point_this_process_at(env, monkeypatch)
        for key, value in OFFLINE.items():
            monkeypatch.setenv(key, value)
        output_dir = f"gs://{BUCKET}/run"
        config = parse_worker_config(tiny_config(output_dir, **{"trainer.trackers": ["tensorboard", "wandb"]}))
        with open_trackers(config) as trackers:
            trackers.start(0)
            for step in (1, 2):
                trackers.record({"event": "train", "step": step, "loss": 1.0 / step})
            trackers.flush()
            fs = fsspec.filesystem("gs")
            [events_file] = fs.ls(f"{BUCKET}/run/tensorboard")
            fs.get(events_file, str(tmp_path / "early" / "events.out.tfevents.0"))
            trackers.record({"event": "train", "step": 3, "loss": 1.0 / 3})
            trackers.samples(3, [{"step": 3, "process_index": 0, "global_prompt_index": 0, "prompt": "p",
                                  "completion": "c", "finish_reason": "stop"}])
        assert scalar_steps(tensorboard_series(str(tmp_path / "early")), "train/loss") == {
            1: 1.0, 2: pytest.approx(0.5)}
        fs.get(f"{BUCKET}/run/tensorboard", str(tmp_path / "tensorboard"), recursive=True)
        assert scalar_steps(tensorboard_series(str(tmp_path / "tensorboard")), "train/loss") == {
            1: 1.0, 2: pytest.approx(0.5), 3: pytest.approx(1 / 3)}
        run_id = run_identity(output_dir)[0]
        [wandb_file] = fs.glob(f"{BUCKET}/run/wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
        fs.get(wandb_file, str(tmp_path / "run.wandb"))
        history = wandb_history(str(tmp_path / "run.wandb"))
        assert {step: values["train/loss"] for step, values in history.items()} == {1: 1.0, 2: 0.5, 3: 1 / 3}
        assert history[3]["inference/samples"]["_type"] == "table-file"


def test_trackers_config(tmp_path):
    def trackers(value):
        return parse_worker_config(tiny_config(str(tmp_path), **{"trainer.trackers": value})).trainer.trackers

    assert parse_worker_config(tiny_config(str(tmp_path))).trainer.trackers == ["jsonl"]
    assert trackers(["tensorboard"]) == ["tensorboard"]  # jsonl stays on, named or not
    with pytest.raises(ConfigError, match=r"trainer.trackers\[1\]: must be one of jsonl, tensorboard, wandb; "
                                          r"got 'mlflow'"):
        trackers(["jsonl", "mlflow"])
    with pytest.raises(ConfigError, match="trainer.trackers: items must be unique"):
        trackers(["wandb", "wandb"])
    schema = openapi_schema(TrainerConfig)["properties"]["trackers"]
    assert schema["items"]["enum"] == ["jsonl", "tensorboard", "wandb"]
    assert schema["default"] == ["jsonl"]


def test_tracker_libraries_are_imported_only_when_configured():
    """The worker's start without trackers pays for neither library (wandb alone takes about a second)."""
    code = ("import sys, simpo_worker.main, simpo_worker.observe.trackers; "
            "print(sorted(m for m in ('wandb', 'tensorboard') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
