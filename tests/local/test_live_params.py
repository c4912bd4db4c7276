"""What a pause samples, and what it leaves behind, with the params FSDP-sharded across 2 local hosts, in both
inference placements: the completions of a pause at step s are what the engine generates offline from the step-s
checkpoint (and not from step s-1's), and the losses and final state are array-equal to a run without pauses."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from local_hosts import run_workers
from simpo_worker.contract.config import parse_worker_config
from simpo_worker.interleave import build_run
from simpo_worker.store import outputs, storage
from simpo_worker.train.checkpoint import step_dir
from worker_runs import checked, checkpoint_arrays, tiny_config, train_records

pytestmark = pytest.mark.multiprocess

HOSTS = 2
STEPS = 4
PAUSES = [2, 3]
MODES = ("host_data_parallel", "global_mesh")
SEED = 9


def run_config(output_dir: Path, mode: str, pauses: list[int]) -> dict:
    return tiny_config(output_dir, **{
        "trainer.num_train_steps": STEPS,
        # Params and AdamW moments sharded over both hosts; every checkpoint kept (the pauses save theirs).
        "trainer.mesh": {"data": 1, "fsdp": -1},
        "trainer.checkpoint": {"keep": STEPS},
        "inference": {"eval_at_steps": pauses, "mode": mode, "synthetic_prompt_count": 7, "max_new_tokens": 16,
                      "max_prompt_len": 64, "batch_size": 4, "temperature": 0.8, "top_p": 0.95, "seed": SEED},
        "distributed": {"barrier_timeout_s": 120, "init_timeout_s": 120},
    })


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run once per module: `runs(mode, pauses)` -> its config."""
    root = tmp_path_factory.mktemp("live")
    done: dict[tuple, dict] = {}

    def get(mode: str, pauses: list[int]) -> dict:
        key = (mode, tuple(pauses))
        if key not in done:
            config = run_config(root / f"{mode}-{'-'.join(map(str, pauses)) or 'none'}", mode, pauses)
            for result in run_workers(config, HOSTS, 1, timeout=600):
                checked(result)
            done[key] = config
        return done[key]

    return get


def paused_completions(output_dir: str, step: int) -> dict[int, tuple]:
    manifest = outputs.read_manifest(output_dir, step)
    rows = []
    for host in range(manifest["hosts"]):
        rows += storage.read_jsonl(outputs.host_shard_path(output_dir, step, host, manifest["hosts"]))
    return {row["global_prompt_index"]: (row["completion"], row["completion_tokens"], row["finish_reason"])
            for row in rows}


def offline_completions(config: dict, workdir: Path) -> dict[tuple[int, int], dict[int, tuple]]:
    """(checkpoint c, pause step s) -> what the run's engine generates in this process (one host) for the pause
    at s from the params of the run's checkpoint at c, with the pause's prompts, seed and settings."""
    output_dir = workdir / "offline"
    run, generated = None, {}
    for checkpoint in PAUSES:  # ascending: each one copied in is the latest, which the trainer's restore reads
        shutil.copytree(step_dir(storage.join(config["output_dir"], "checkpoints"), checkpoint),
                        step_dir(str(output_dir / "checkpoints"), checkpoint))
        run = run or build_run(parse_worker_config({**config, "output_dir": str(output_dir)}))
        assert run.trainer.restore_latest() == checkpoint
        prompts = run.prompts.token_ids
        for step in PAUSES:
            completions = run.engine.generate(run.trainer.model, prompts, list(range(len(prompts))), step=step,
                                              seed=SEED)
            generated[checkpoint, step] = {
                c.global_prompt_index: (c.text, len(c.token_ids), c.finish_reason) for c in completions}
    return generated


@pytest.mark.parametrize("mode", MODES)
def test_a_pause_samples_the_live_params_of_its_step(runs, mode, tmp_path):
    config = runs(mode, PAUSES)
    offline = offline_completions(config, tmp_path)
    for step in PAUSES:
        live = paused_completions(config["output_dir"], step)
        # The pause after step 3 too: the params trained since the first pause, not a stale copy.
        assert live == offline[step, step], step
        # Another step's params sample other completions with the same keys.
        for other in set(PAUSES) - {step}:
            assert live != offline[other, step], (step, other)


@pytest.mark.parametrize("mode", MODES)
def test_pauses_leave_fsdp_training_bit_identical(runs, mode):
    plain, paused = runs(MODES[0], [])["output_dir"], runs(mode, PAUSES)["output_dir"]
    untimed = lambda records: [{k: v for k, v in r.items() if k != "step_time"} for r in records]  # noqa: E731
    assert [r["step"] for r in train_records(paused)] == list(range(1, STEPS + 1))
    assert all(outputs.read_manifest(paused, step) for step in PAUSES)
    assert untimed(train_records(paused)) == untimed(train_records(plain))
    reference, other = checkpoint_arrays(plain, STEPS), checkpoint_arrays(paused, STEPS)
    # Each host wrote its own shards: the state was sharded across hosts, not replicated.
    assert reference.keys() == other.keys()
    assert (Path(paused) / "checkpoints" / f"step_{STEPS:08d}" / "state" / "ocdbt.process_1").is_dir()
    for key in reference:
        assert np.array_equal(reference[key], other[key]), key
