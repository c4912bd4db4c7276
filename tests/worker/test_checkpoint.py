"""Checkpoints: exact resume across a process restart, half-written checkpoints ignored, keep-N, and the
non-retryable exit codes for bad data, bad config, a missing model and an unreadable checkpoint."""

import json
import re
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest

from gcs_emulator import BUCKET, fault_proxy, gcs_emulator, point_this_process_at
from simpo_worker.store import outputs
from simpo_worker.train.checkpoint import complete_steps
from worker_runs import (checked, checkpoint_arrays, preference_files, run_worker, straight_run, tiny_config,
                         train_records)


def test_resume_after_a_restart_is_bit_identical(tmp_path):
    straight = straight_run()
    resumed = tmp_path / "resumed"
    config = tiny_config(resumed)
    first = checked(run_worker(config, "--stop-at-step", "3"))
    assert complete_steps(str(resumed / "checkpoints")) == [2, 3]
    assert "stage='done'" not in first.stderr  # a drill's stop is not the end of the run
    # A crash while writing step 5 leaves Orbax's uncommitted temporary directory: it must never be restored.
    half = resumed / "checkpoints" / "step_00000005.orbax-checkpoint-tmp"
    shutil.copytree(resumed / "checkpoints" / "step_00000003" / "state", half / "state")
    for file in (half / "state").rglob("*"):
        if file.is_file():
            file.write_bytes(file.read_bytes()[:10])
    second = checked(run_worker(config))
    assert "training from step 3 to 7" in second.stderr
    # The leader's last report (the log reporter here; status.progress in a pod).
    assert "progress: Progress(stage='done', step=7, totalSteps=7," in second.stderr

    expected, actual = train_records(straight), train_records(resumed)
    assert [r["step"] for r in actual] == list(range(1, 8))
    # Losses and every metric bit-identical (JSON floats round-trip exactly).
    for a, b in zip(expected, actual):
        assert {k: v for k, v in a.items() if k != "step_time"} == {k: v for k, v in b.items() if k != "step_time"}
    assert all(r["train_step_compilations"] == 1 for r in actual)  # the resumed process compiled once too
    # Params, optimizer state and step: every stored array equal bit for bit.
    want, got = checkpoint_arrays(straight, 7), checkpoint_arrays(resumed, 7)
    assert want.keys() == got.keys() and len(want) > 10
    for key in want:
        assert np.array_equal(want[key], got[key]), key
    assert complete_steps(str(resumed / "checkpoints")) == [6, 7]  # keep: 2 (step 5 rewritten, then pruned)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000006", "step_00000007"]
    info = json.loads((resumed / "checkpoints" / "step_00000007" / "info" / "metadata").read_text())
    assert info == {"step": 7, "data_position": 7, "seed": 5}


def test_resume_on_gcs_is_bit_identical_and_ignores_an_uncommitted_checkpoint(monkeypatch):
    """gs:// through fake-gcs-server: Orbax's directories via etils.epath (gcsfs), its arrays via tensorstore's
    own GCS client. GCS cannot rename, so a checkpoint without Orbax's commit_success.txt is uncommitted."""
    straight = straight_run()
    with gcs_emulator() as env:
        point_this_process_at(env, monkeypatch)
        out = f"gs://{BUCKET}/resumed"
        config = tiny_config(out)
        checked(run_worker(config, "--stop-at-step", "3", env=env))
        assert complete_steps(f"{out}/checkpoints") == [2, 3]
        # What a crash while writing step 5 leaves on GCS: part of the step's objects, no commit marker.
        fs = fsspec.filesystem("gs")
        fs.cp(f"{BUCKET}/resumed/checkpoints/step_00000003/state/manifest.ocdbt",
              f"{BUCKET}/resumed/checkpoints/step_00000005/state/manifest.ocdbt")
        assert complete_steps(f"{out}/checkpoints") == [2, 3]
        second = checked(run_worker(config, env=env))
        assert "training from step 3 to 7" in second.stderr
        assert complete_steps(f"{out}/checkpoints") == [6, 7]  # (listed afresh: this process listed before)
        want, got = checkpoint_arrays(straight, 7), checkpoint_arrays(out, 7)
    assert want.keys() == got.keys() and len(want) > 10
    for key in want:
        assert np.array_equal(want[key], got[key]), key


def test_a_refused_checkpoint_write_on_gcs_is_exit_13(monkeypatch):
    """A 403 on the background write of the step-2 checkpoint surfaces at the next save (or at the end of the
    run), not swallowed: exit 13 naming the checkpoint directory."""
    with gcs_emulator() as env, fault_proxy(env) as (proxy, proxied):
        point_this_process_at(proxied, monkeypatch)
        out = f"gs://{BUCKET}/refused"
        proxy.fail("POST", "refused/checkpoints/step_00000002", [403] * 1000)
        result = run_worker(tiny_config(out), env=proxied)
        assert result.returncode == 13, result.stderr[-3000:]
        assert f"OutputError: {out}/checkpoints: cannot save the checkpoint: " in result.stderr
        assert "Forbidden" in result.stderr
        assert complete_steps(f"{out}/checkpoints") == []
        assert [r["step"] for r in outputs.read_metrics(out)][-1] < 7


def test_unreadable_checkpoint_is_a_clear_non_retryable_error(tmp_path):
    output_dir = tmp_path / "run"
    config = tiny_config(output_dir, **{"trainer.num_train_steps": 2, "trainer.checkpoint.every": 1})
    checked(run_worker(config))
    step = output_dir / "checkpoints" / "step_00000002"
    for data in (step / "state").glob("ocdbt.process_*/d/*"):
        data.write_bytes(data.read_bytes()[:100])
    result = run_worker(config)
    assert result.returncode == 13, result.stderr[-2000:]
    assert f"{step}: unreadable checkpoint: cannot read the checkpoint" in result.stderr


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("case,code,message", [
    ("malformed_json", 11, "{file}:2: not valid JSON"),
    ("over_the_limit", 11, "{file}:1: .* response tokens exceed data.max_seq_len = 64 \\(data.overlength: error\\)"),
    ("bad_config", 10, "trainer.microbatches: must divide batch_size \\(batch_size = 8, microbatches = 3\\)"),
    ("missing_model", 12, "{missing}"),
])
def test_bad_input_exit_codes(tmp_path, case, code, message):
    """One case per failure path through the real worker process (every bad-row message: test_preference_data)."""
    good = Path(preference_files()).read_text().splitlines()[0]
    file = tmp_path / "data.jsonl"
    missing = str(tmp_path / "absent.gguf")
    output_dir = tmp_path / "run"
    lines = {
        "malformed_json": [good, good[:-5]],
        "over_the_limit": [json.dumps({"prompt": "many words " * 100, "chosen": "a", "rejected": "b"})],
    }.get(case, [good])
    overrides = {"data.train_files": [write_lines(file, lines)]}
    if case == "bad_config":
        overrides["trainer.microbatches"] = 3
    if case == "missing_model":
        overrides["model"] = {"source": missing}
        overrides["tokenizer"] = "smollm2"
    result = run_worker(tiny_config(output_dir, **overrides))
    stderr = result.stderr
    assert result.returncode == code, stderr[-2000:]
    assert re.search(message.format(file=re.escape(str(file)), missing=re.escape(missing)), stderr), stderr[-2000:]
    # Nothing half-done looks complete: no checkpoint, no metrics.
    assert complete_steps(str(output_dir / "checkpoints")) == []
    assert outputs.read_metrics(str(output_dir)) == []
