"""trainer.trackers on 2 hosts with the pod environment the local runner gives a job: only the leader tracks, each
pause's sample holds both hosts' completions, and the W&B run takes the job's identity."""

import glob
import os
import tempfile
import time
from pathlib import Path

from local_hosts import run_workers
from simpo_worker.observe.trackers import SAMPLE_COLUMNS
from simpo_worker.observe.trackers.wandb_run import run_identity
from tracker_files import shard_rows, tensorboard_series, text_tables, wandb_history
from worker_runs import eval_config

OFFLINE = {"WANDB_API_KEY": "", "WANDB_MODE": "offline"}


def test_only_the_leader_tracks_and_samples_every_host(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    output_dir = str(Path(tempfile.mkdtemp(prefix="simpo-trackers-hosts-")) / "run")
    config = eval_config(output_dir, **{"trainer.trackers": ["tensorboard", "wandb"]})
    started = time.perf_counter()
    for result in run_workers(config, 2, 1):
        assert result.returncode == 0, result.stderr[-4000:]
    print(f"2 hosts with every tracker: {time.perf_counter() - started:.1f}s")
    [_] = glob.glob(os.path.join(output_dir, "tensorboard", "events.out.tfevents.*"))
    [run_dir] = glob.glob(os.path.join(output_dir, "wandb", "offline-run-*"))
    run_id, name = run_identity(output_dir, {"SIMPO_JOB_NAMESPACE": "default", "SIMPO_JOB_NAME": "local-test"})
    assert run_dir.endswith(f"-{run_id}") and name == "local-test"

    samples = text_tables(tensorboard_series(os.path.join(output_dir, "tensorboard")), "inference/samples")
    assert sorted(samples) == [2, 5]
    for step, (_, *rows) in samples.items():
        expected = shard_rows(output_dir, step, hosts=2)
        assert {row["process_index"] for row in expected} == {0, 1}
        assert rows == [[str(row[column]) for column in SAMPLE_COLUMNS] for row in expected]
    history = wandb_history(os.path.join(run_dir, f"run-{run_id}.wandb"))
    assert sorted(step for step, values in history.items() if "train/loss" in values) == list(range(1, 8))
    assert sorted(step for step, values in history.items() if "inference/samples" in values) == [2, 5]
