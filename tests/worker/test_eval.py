"""Held-out evaluation (data.eval_files, at each inference pause): the train step's own loss and reward metrics,
averaged over every held-out pair, against the published formula and against the train step on the same batch;
evaluating changes nothing of training, and the worker writes it to the metrics and status.progress."""

import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simpo_worker.contract.config import parse_worker_config
from simpo_worker.data.preference_data import PreferenceData
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.store import outputs
from simpo_worker.train.trainer import Trainer
from simpo_worker.weights.pretrained import load_model
from test_simpo_loss import numpy_simpo
from worker_runs import (checked, checkpoint_arrays, eval_config, eval_run, held_out_file, preference_files,
                         records, run_worker, tiny_config, train_records)

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def make_trainer(config: dict) -> Trainer:
    config = parse_worker_config(config)
    return Trainer(config, load_model(config.model), load_tokenizer("smollm2"))


def held_out(trainer: Trainer, file: str) -> PreferenceData:
    config = trainer.config
    return PreferenceData(config.data, load_tokenizer("smollm2"), [file], config.trainer.batch_size,
                          config.trainer.seed)


def test_held_out_metrics_are_the_published_formula_over_every_pair(tmp_path):
    """9 pairs in batches of 8 (2 microbatches): the last batch holds 1 pair and 7 padding rows, one microbatch of
    it padding alone. The result is the plain mean over the 9 pairs of the NumPy SimPO formula, with the train
    step's memory options on (remat, blockwise attention and chunked logits over the 63 positions)."""
    memory = {"trainer.remat": "full", "trainer.attention_block_size": 16, "trainer.loss_chunk_tokens": 16}
    trainer = make_trainer(tiny_config(tmp_path / "run", **memory))
    for _ in range(2):  # rewards that differ between pairs
        trainer.train_step()
    data = held_out(trainer, held_out_file())
    metrics = trainer.evaluate(data)

    simpo = trainer.config.simpo
    per_pair = []
    for pair in range(len(data.pairs)):
        batch = data.held_out_batch(pair, np.array([0]))
        tokens, mask = batch.tokens[0], batch.loss_mask[0]  # [2, T]: chosen, rejected
        positions = np.broadcast_to(np.arange(tokens.shape[1] - 1), (2, tokens.shape[1] - 1))
        logits = trainer.model(jnp.asarray(tokens[:, :-1]), jnp.asarray(positions))
        per_pair.append(numpy_simpo(np.asarray(logits), tokens, mask, simpo.beta, simpo.gamma_beta_ratio))
    assert metrics["pairs"] == len(data.pairs) == 9
    for name in METRICS:
        expected = np.mean([values[name] for values in per_pair])
        assert metrics[name] == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    assert 0 < metrics["rewards/accuracies"] < 1
    assert metrics["tokens"] == sum(int(data.held_out_batch(p, np.array([0])).lengths.sum()) for p in range(9))


def test_held_out_metrics_equal_the_train_steps_on_the_same_batch(tmp_path):
    """The pairs of the first training batch as the held-out set: evaluated, then trained on, at the same params
    (the train step reports its metrics from before its update)."""
    trainer = make_trainer(tiny_config(tmp_path / "run"))
    lines = [line for line in Path(preference_files()).read_text().splitlines() if line.strip()]
    first_batch = tmp_path / "first_batch.jsonl"
    first_batch.write_text("".join(lines[row] + "\n" for row in trainer.data.global_rows(0)))
    evaluation = trainer.evaluate(held_out(trainer, str(first_batch)))
    step = trainer.train_step()
    assert evaluation["pairs"] == trainer.config.trainer.batch_size
    for name in METRICS:
        assert evaluation[name] == pytest.approx(step[name], rel=1e-5, abs=1e-6), name
    assert evaluation["tokens"] == step["tokens"]


def test_evaluating_changes_nothing_of_training(tmp_path):
    """Evaluations between the steps leave the losses and params bit-identical, repeat exactly, and the eval
    program compiles once."""
    plain = make_trainer(tiny_config(tmp_path / "plain"))
    evaluated = make_trainer(tiny_config(tmp_path / "evaluated"))
    data = held_out(evaluated, held_out_file())
    plain_steps, evaluated_steps, evaluations = [], [], []
    for _ in range(3):
        plain_steps.append(plain.train_step())
        evaluations.append(evaluated.evaluate(data))
        evaluated_steps.append(evaluated.train_step())
    assert evaluated.evaluate(data) == evaluated.evaluate(data)
    drop_time = lambda record: {k: v for k, v in record.items() if k != "step_time"}
    assert list(map(drop_time, plain_steps)) == list(map(drop_time, evaluated_steps))
    for a, b in zip(jax.tree.leaves(plain.model), jax.tree.leaves(evaluated.model)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert evaluations[0]["loss"] != evaluations[-1]["loss"]  # it measures the live params
    assert evaluated.eval_compilations == 1 and evaluated.train_step_compilations == 1


def test_pauses_record_the_held_out_metrics_and_training_is_unchanged(tmp_path):
    """The worker with data.eval_files, pausing after steps 2 and 5, against the same run without: an `eval`
    record per pause in the metrics (the metrics of the live params there) and bit-identical losses and final
    state."""
    with_eval = Path(eval_run()[0])
    without = tmp_path / "without"
    checked(run_worker(eval_config(without, **{"data.eval_files": []})))

    drop_time = lambda record: {k: v for k, v in record.items() if k != "step_time"}
    assert list(map(drop_time, train_records(with_eval))) == list(map(drop_time, train_records(without)))
    want, got = checkpoint_arrays(without, 7), checkpoint_arrays(with_eval, 7)
    assert want.keys() == got.keys() and len(want) > 10
    for key in want:
        assert np.array_equal(want[key], got[key]), key
    assert not records(without, "eval")

    order = [(r["event"], r["step"]) for r in outputs.read_metrics(str(with_eval))
             if r["event"] in ("train", "eval", "inference")]
    assert order == [("train", 1), ("train", 2), ("eval", 2), ("inference", 2), ("train", 3), ("train", 4),
                     ("train", 5), ("eval", 5), ("inference", 5), ("train", 6), ("train", 7)]
    evaluations = records(with_eval, "eval")
    assert all(r["pairs"] == 9 and r["eval_compilations"] == 1 for r in evaluations)
    assert evaluations[0]["loss"] != evaluations[1]["loss"]

    # The record at step 5 is the live params' there: the same as evaluating the step-5 checkpoint afresh.
    restored_dir = tmp_path / "restored"
    shutil.copytree(with_eval / "checkpoints" / "step_00000005", restored_dir / "checkpoints" / "step_00000005")
    trainer = make_trainer(eval_config(restored_dir))
    assert trainer.restore_latest() == 5
    fresh = trainer.evaluate(held_out(trainer, held_out_file()))
    for name in (*METRICS, "tokens", "pairs"):
        assert evaluations[1][name] == pytest.approx(fresh[name], rel=1e-6, abs=1e-7), name


def test_progress_shows_the_held_out_evaluation():
    """The leader reports stage `eval` during each evaluation, and the latest result in every later report."""
    output_dir, log = eval_run()
    reports = re.findall(r"progress: Progress\((.*)\)", log)
    stages = [re.search(r"stage='(\w+)', step=(\d+)", report).groups() for report in reports]
    assert ("eval", "2") in stages and ("eval", "5") in stages
    assert "evalStep=None" in reports[0]  # nothing before the first evaluation
    last = records(output_dir, "eval")[-1]
    assert "stage='done', step=7" in reports[-1]
    assert (f"evalStep=5, evalLoss={last['loss']!r}, evalAccuracy={last['rewards/accuracies']!r}"
            in reports[-1])


def test_held_out_data_errors_fail_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n')
    output_dir = tmp_path / "run"
    result = run_worker(eval_config(output_dir, **{"data.eval_files": [str(bad)]}))
    assert result.returncode == 11, result.stderr[-2000:]
    assert f"{bad}:1: missing field `rejected`" in result.stderr
    assert outputs.read_metrics(str(output_dir)) == []
