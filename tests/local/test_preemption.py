"""Stopping and restarting a multi-host run exactly: a stop at a chosen step, and Kubernetes' termination notice
(SIGTERM) mid-train, each compared with 2 processes run straight through: every checkpointed array (params and
AdamW moments, each host's shards) is array-equal, and so is every loss."""

from __future__ import annotations

import signal
import tempfile
import threading
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from local_hosts import run_workers, start_workers
from simpo_worker.api import ExitCode
from worker_runs import checked, checkpoint_arrays, tiny_config, train_records

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
    for result in run_workers(config(out), 2, 2):
        checked(result)
    return out


def assert_equals_straight_run(out: Path) -> None:
    reference = straight_two_hosts()
    assert [r["loss"] for r in train_records(out)] == [r["loss"] for r in train_records(reference)]
    mine, theirs = checkpoint_arrays(out, STEPS), checkpoint_arrays(reference, STEPS)
    assert mine.keys() == theirs.keys() and any("process_0001" in key for key in mine)
    for key in theirs:
        assert np.array_equal(mine[key], theirs[key]), key


def test_stopped_and_restarted_equals_straight(tmp_path):
    out = tmp_path / "run"
    for result in run_workers(config(out), 2, 2, "--stop-at-step", "3"):
        checked(result)
    for result in run_workers(config(out), 2, 2):
        checked(result)
        assert f"training from step 3 to {STEPS}" in result.stderr
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
        codes = [host.wait(timeout=300) for host in hosts]
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
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").exists()

    for result in run_workers(config(out), 2, 2):
        checked(result)
        assert f"training from step {stopped} to {STEPS}" in result.stderr
    assert_equals_straight_run(out)

