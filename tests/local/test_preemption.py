"""Stopping and restarting a multi-host run exactly: a stop at a chosen step, and Kubernetes' termination notice
(SIGTERM) mid-train, each compared with 2 processes run straight through: every checkpointed array (params and
AdamW moments, each host's shards) is array-equal, and so is every loss."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from local_hosts import run_workers, start_workers
from simpo_worker.contract.api import ExitCode
from simpo_worker.store import outputs, storage
from simpo_worker.train.checkpoint import complete_steps
from worker_runs import (checked, checkpoint_arrays, run_worker, tiny_config, train_records, worker_command,
                         worker_env)

pytestmark = pytest.mark.multiprocess

STEPS = 12


def config(output_dir) -> dict:
    # No periodic checkpoint: a checkpoint mid-run can only come from the stop being tested. FSDP over both
    # hosts: each host writes its own shards of every array.
    return tiny_config(output_dir, **{"trainer.num_train_steps": STEPS, "trainer.checkpoint": {"every": None},
                                      "trainer.mesh": {"data": 1, "fsdp": -1}})


@cache
def straight_two_hosts() -> Path:
    out = Path(tempfile.mkdtemp(prefix="simpo-straight-2-")) / "run"
    for result in run_workers(config(out), 2, 2, timeout=900):
        checked(result)
    return out


def assert_equals_straight_run(out: Path) -> None:
    reference = straight_two_hosts()
    assert [r["loss"] for r in train_records(out)] == [r["loss"] for r in train_records(reference)]
    mine, theirs = checkpoint_arrays(out, STEPS), checkpoint_arrays(reference, STEPS)
    assert mine.keys() == theirs.keys()
    assert (out / "checkpoints" / f"step_{STEPS:08d}" / "state" / "ocdbt.process_1").is_dir()  # host 1 wrote its own
    for key in theirs:
        assert np.array_equal(mine[key], theirs[key]), key


def test_stopped_and_restarted_equals_straight(tmp_path):
    out = tmp_path / "run"
    for result in run_workers(config(out), 2, 2, "--stop-at-step", "3", timeout=900):
        checked(result)
    for result in run_workers(config(out), 2, 2, timeout=900):
        checked(result)
        assert f"training from step 3 to {STEPS}" in result.stderr
        # JAX's CPU cache keys differ per process: host 0 alone would load, far ahead of the others.
        assert "persistent compilation cache: off (CPU with 2 processes" in result.stderr
    assert not (out / "compilation_cache").exists()
    assert_equals_straight_run(out)


def test_sigterm_mid_train_checkpoints_exits_retryable_and_resumes_exactly(tmp_path):
    """SIGTERM reaches host 1 alone, after the leader logged step 2: both hosts agree on the next step boundary
    (host 0 never got the notice: the agreement is a collective every host runs after every step), checkpoint
    it, and exit PREEMPTED; the rerun resumes from that checkpoint."""
    out = tmp_path / "run"
    hosts = start_workers(config(out), 2, 2)
    leader_log: list[str] = []

    def signal_host_1_after_step_2():
        for line in hosts[0].stderr:
            leader_log.append(line)
            if " step 2: loss" in line:
                hosts[1].send_signal(signal.SIGTERM)
    watcher = threading.Thread(target=signal_host_1_after_step_2, daemon=True)
    watcher.start()
    try:
        codes = [host.wait(timeout=900) for host in hosts]
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
    watcher.join(timeout=10)
    host_1_log = hosts[1].stderr.read()
    assert codes == [ExitCode.PREEMPTED, ExitCode.PREEMPTED], "".join(leader_log)[-3000:] + host_1_log[-3000:]
    assert "SIGTERM: stopping" in host_1_log
    [stopped] = {int(line.split("after step ")[1].split(";")[0]) for line in leader_log + host_1_log.splitlines()
                 if "termination notice (SIGTERM) after step" in line}
    assert 2 <= stopped < STEPS
    assert [r["step"] for r in train_records(out)] == list(range(1, stopped + 1))
    assert complete_steps(str(out / "checkpoints"))[-1] == stopped  # committed before the exit

    for result in run_workers(config(out), 2, 2, timeout=900):
        checked(result)
        assert f"training from step {stopped} to {STEPS}" in result.stderr
    assert_equals_straight_run(out)



def test_sigterm_during_an_inference_pause_stops_decoding_and_the_rerun_redoes_the_pause(tmp_path):
    """One process, SIGTERM once decoding at the step-2 pause has reported progress: decoding stops at the next
    chunk, the exit is PREEMPTED, and the pause's own checkpoint is the resume point; the rerun redoes the pause
    whole and ends like a run that was never stopped."""
    inference = {"eval_at_steps": [2], "synthetic_prompt_count": 3, "max_new_tokens": 512, "ignore_eos": True,
                 "batch_size": 1, "max_prompt_len": 64}

    def paused_config(out):
        return tiny_config(out, **{"inference": inference, "trainer.checkpoint": {"every": None}})
    out = tmp_path / "run"
    worker = subprocess.Popen(worker_command(paused_config(out)), env=worker_env(), stderr=subprocess.PIPE, text=True)
    log = []
    try:
        for line in worker.stderr:
            log.append(line)
            if "stage='infer'" in line and worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                break
        log += worker.stderr.readlines()
        code = worker.wait(timeout=900)
    finally:
        if worker.poll() is None:
            worker.kill()
    text = "".join(log)
    assert code == ExitCode.PREEMPTED, text[-3000:]
    assert "during the inference pause at step 2; the restart resumes from step 2" in text, text[-3000:]
    assert outputs.read_manifest(str(out), 2) is None

    rerun = checked(run_worker(paused_config(out), timeout=900))
    assert "training from step 2 to 7" in rerun.stderr
    straight = tmp_path / "straight"
    checked(run_worker(paused_config(straight), timeout=900))
    assert read_completions(out) == read_completions(straight)
    assert [r["loss"] for r in train_records(out)] == [r["loss"] for r in train_records(straight)]
    for key, array in checkpoint_arrays(straight, 7).items():
        assert np.array_equal(checkpoint_arrays(out, 7)[key], array), key


def read_completions(out) -> list[dict]:
    return storage.read_jsonl(outputs.host_shard_path(str(out), 2, 0, 1))
