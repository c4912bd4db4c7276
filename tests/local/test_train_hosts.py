"""Training across real local host processes (the local runner's pods): 2 processes x 2 CPU devices resume
like one process."""

import pytest

from local_hosts import run_workers
from worker_runs import assert_steps_match_straight_run, checked, tiny_config


@pytest.mark.multiprocess
def test_two_processes_train_and_resume_like_one(tmp_path):
    """2 processes x 2 CPU devices under jax.distributed (data 2 x fsdp 2): each host feeds its own rows and
    writes its own checkpoint shards; stopped at step 3 and restarted, the run matches the 1-process run."""
    out = tmp_path / "two"
    config = tiny_config(out, **{"trainer.mesh": {"data": -1, "fsdp": 2}})
    for result in run_workers(config, 2, 2, "--stop-at-step", "3"):
        checked(result)
    manifest = (out / "checkpoints" / "step_00000003" / "manifest.json").read_text()
    assert '"process_0001_of_0002.npz"' in manifest
    for result in run_workers(config, 2, 2):
        checked(result)
        assert "training from step 3 to 7" in result.stderr
    assert_steps_match_straight_run(out, rel=1e-4, abs_tol=1e-5)
