"""The Hugging Face export across real local host processes: params split across hosts are gathered tensor by
tensor (every host joins every gather), host 0 alone writes, and the copy is the live params exactly."""

import json

import pytest

from local_hosts import run_workers
from simpo_worker.weights.hf_load import INDEX_FILE
from simpo_worker.weights.pretrained import load_pretrained
from worker_runs import assert_same_model, checked, live_params, tiny_config


@pytest.mark.multiprocess
def test_two_processes_export_the_live_params(tmp_path):
    """2 processes x 2 CPU devices, fsdp 2 x model 2 (the fsdp axis spans the hosts): the copies at the pause
    (step 2) and the end (step 3) load through our own loader with the weights and logits of the checkpoints of
    those steps, exactly."""
    hf_dir = tmp_path / "hf"
    config = tiny_config(tmp_path / "run", **{
        "trainer.num_train_steps": 3, "trainer.mesh": {"data": 1, "fsdp": 2, "model": 2},
        "trainer.checkpoint": {"every": None, "keep": 5},
        "inference": {"eval_at_steps": [2], "synthetic_prompt_count": 2, "max_new_tokens": 2},
        "export": {"hf_dir": str(hf_dir), "at": ["pauses", "end"], "max_shard_mb": 1}})
    for result in run_workers(config, 2, 2, timeout=900):
        checked(result)
        assert "exported the policy to" in result.stderr
    for step, copy in ((2, hf_dir / "step_2"), (3, hf_dir)):
        assert len(set(json.loads((copy / INDEX_FILE).read_text())["weight_map"].values())) == 2
        assert_same_model(load_pretrained(str(copy)), live_params(config, step, tmp_path))
