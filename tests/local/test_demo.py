"""The README's main-job command, shortened (`--small`): the same flow end to end through the CLI."""

import subprocess
import sys

import pytest
import yaml

from simpo_interleave.demo import REFERENCE_MAX_NEW_TOKENS, REFERENCE_PROMPTS, demo_job
from simpo_operator.resource import validate_job

pytestmark = pytest.mark.multiprocess


def test_demo_small_runs_and_summarises(tmp_path):
    result = subprocess.run([sys.executable, "-m", "simpo_interleave.cli", "demo", "--small", "--hosts", "2",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "demo-small: succeeded" in out
    assert "inference after step 2: 8 prompts on 2 hosts" in out
    assert "held-out pairs at step 2: 128 pairs, loss " in out
    assert f"outputs: {tmp_path / 'run'}" in out
    for step in range(1, 8):
        assert any(line.split()[:1] == [str(step)] for line in out.splitlines()), f"no summary row for step {step}"


def test_the_full_demo_job_is_the_reference_workflow(tmp_path):
    job = validate_job(yaml.safe_load(yaml.safe_dump(demo_job(tmp_path, tmp_path / "run", small=False, hosts=4))))
    config = job.spec.config
    assert job.num_processes == 4
    assert config.model.source == "smollm2"
    assert config.trainer.num_train_steps == 7
    assert config.inference.schedule(7) == [2]
    assert config.inference.mode == "host_data_parallel"
    assert config.inference.max_new_tokens == REFERENCE_MAX_NEW_TOKENS == 2048
    assert not config.inference.ignore_eos
    assert REFERENCE_PROMPTS == 128
