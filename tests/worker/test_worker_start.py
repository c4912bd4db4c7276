"""What only the worker can know is checked at its start, before the first train step."""

from __future__ import annotations

from model_goldens import TINY_LLAMA_DIR
from simpo_worker.contract import api
from simpo_worker.contract.api import ExitCode
from simpo_worker.store import outputs
from worker_runs import run_worker, tiny_config


def test_a_request_past_a_checkpoints_context_fails_before_training(tmp_path):
    # The HF checkpoint's config.json says max_position_embeddings 512: unknown to the config rules.
    config = tiny_config(tmp_path / "run", **{"model": {"source": str(TINY_LLAMA_DIR)},
                                              "inference": {"eval_at_steps": [2], "synthetic_prompt_count": 2,
                                                            "max_prompt_len": 64, "max_new_tokens": 600}})
    result = run_worker(config)
    assert result.returncode == ExitCode.BAD_CONFIG, result.stderr[-3000:]
    assert "max_prompt_len 64 + max_new_tokens 600 exceeds the context of" in result.stderr
    assert "(max_position_embeddings 512)" in result.stderr
    assert outputs.read_metrics(str(tmp_path / "run")) == []  # no train step ran


def test_a_pod_without_its_tpu_environment_fails_at_once_naming_the_counts(tmp_path):
    """A job of 4 hosts whose pod has no way to find the others (no TPU_WORKER_HOSTNAMES, no coordinator) would
    train alone: it exits non-retryable before any step."""
    config = tiny_config(tmp_path / "run")
    result = run_worker(config, env={api.ENV_NUM_SLICES: "1", api.ENV_HOSTS_PER_SLICE: "4", api.ENV_HOST_INDEX: "2"})
    assert result.returncode == ExitCode.BAD_CONFIG, result.stderr[-3000:]
    assert "jax.distributed has 1 process(es), the job has 4 hosts" in result.stderr
    assert outputs.read_metrics(str(tmp_path / "run")) == []
