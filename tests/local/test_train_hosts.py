"""Training across real local host processes (the local runner's pods): 2 processes x 2 CPU devices resume
like one process, and evaluate the held-out pairs like one process."""

import pytest

from local_hosts import run_workers
from simpo_worker.contract.config import parse_worker_config
from simpo_worker.data.preference_data import PreferenceData
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.train.trainer import Trainer
from simpo_worker.weights.pretrained import load_model
from worker_runs import assert_steps_match_straight_run, checked, eval_config, held_out_file, records, tiny_config


@pytest.mark.multiprocess
def test_two_processes_train_and_resume_like_one(tmp_path):
    """2 processes x 2 CPU devices under jax.distributed (data 2 x fsdp 2): each host feeds its own rows and
    writes its own checkpoint shards; stopped at step 3 and restarted, the run matches the 1-process run."""
    out = tmp_path / "two"
    config = tiny_config(out, **{"trainer.mesh": {"data": -1, "fsdp": 2}})
    for result in run_workers(config, 2, 2, "--stop-at-step", "3"):
        checked(result)
    # Each process wrote its own shards (Orbax's per-process OCDBT databases).
    state = out / "checkpoints" / "step_00000003" / "state"
    assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    for result in run_workers(config, 2, 2):
        checked(result)
        assert "training from step 3 to 7" in result.stderr
    assert_steps_match_straight_run(out, rel=1e-4, abs_tol=1e-5)


@pytest.mark.multiprocess
def test_two_processes_evaluate_the_held_out_pairs_like_one(tmp_path):
    """2 processes x 2 CPU devices (data 2 x fsdp 2), a pause after step 2: each host feeds its own rows of each
    eval batch (host 1's rows of the last batch are padding alone, yet it runs it: the collectives match). The
    eval record equals one process evaluating the step-2 checkpoint on its one device."""
    out = tmp_path / "two"
    config = eval_config(out, **{"trainer.mesh": {"data": -1, "fsdp": 2}, "trainer.num_train_steps": 2,
                                 "inference.eval_at_steps": [2]})
    for result in run_workers(config, 2, 2):
        checked(result)
    (evaluation,) = records(out, "eval")

    parsed = parse_worker_config(eval_config(out))
    tokenizer = load_tokenizer("smollm2")
    trainer = Trainer(parsed, load_model(parsed.model), tokenizer)
    assert trainer.restore_latest() == 2
    one = trainer.evaluate(PreferenceData(parsed.data, tokenizer, [held_out_file()], 8, 0))
    assert evaluation["pairs"] == one["pairs"] == 9 and evaluation["tokens"] == one["tokens"]
    for name in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert evaluation[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
