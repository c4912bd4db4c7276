"""trainer.profile_steps / inference.profile write jax.profiler traces of exactly those steps, readable by the
profiler's own reader; SIMPO_LOG_FORMAT=json makes every log line one Cloud Logging entry."""

from __future__ import annotations

import glob
import json
import os

import pytest
from jax.profiler import ProfileData

from simpo_worker.contract import api
from simpo_worker.contract.config import parse_worker_config
from simpo_worker.contract.errors import ConfigError
from simpo_worker.observe.profiling import PROFILES, profile_dir
from worker_runs import checked, run_worker, tiny_config


def _events(xplane: str) -> set[str]:
    return {event.name for plane in ProfileData.from_file(xplane).planes for line in plane.lines
            for event in line.events}


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("profiled") / "run"
    config = tiny_config(output_dir, **{"trainer.num_train_steps": 4, "trainer.profile_steps": [3],
                                        "inference": {"eval_at_steps": [2], "synthetic_prompt_count": 2,
                                                      "max_new_tokens": 4, "profile": True}})
    result = checked(run_worker(config, env={api.ENV_LOG_FORMAT: "json"}))
    return str(output_dir), result.stderr


def test_only_the_chosen_steps_are_traced(profiled_run):
    output_dir, _ = profiled_run
    assert sorted(os.listdir(os.path.join(output_dir, PROFILES))) == ["inference_step_2", "train_step_3"]
    [train_trace] = glob.glob(f"{profile_dir(output_dir, 'train', 3, 0)}/plugins/profile/*/*.xplane.pb")
    assert "PjitFunction(train_step)" in _events(train_trace)
    assert glob.glob(f"{profile_dir(output_dir, 'train', 3, 0)}/plugins/profile/*/*.trace.json.gz")
    [pause_trace] = glob.glob(f"{profile_dir(output_dir, 'inference', 2, 0)}/plugins/profile/*/*.xplane.pb")
    pause_events = _events(pause_trace)
    assert {"PjitFunction(prefill)", "PjitFunction(decode_chunk)"} <= pause_events
    assert "PjitFunction(train_step)" not in pause_events


def test_json_logs_carry_severity_host_and_step(profiled_run):
    _, stderr = profiled_run
    entries = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    ours = [e for e in entries if e["logger"].startswith("simpo_worker")]
    assert ours, stderr[-3000:]
    assert all(e["severity"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"} and e["host"] == 0 for e in ours)
    [step_3] = [e for e in ours if e["message"].startswith("step 3: loss")]
    assert step_3["step"] == 3 and step_3["logging.googleapis.com/sourceLocation"]["file"].endswith("interleave.py")
    assert any(e["message"].startswith("inference at step 2:") and e["step"] == 2 for e in ours)
    assert " INFO simpo_worker" not in stderr  # no text-format line slipped through


def test_a_failure_is_one_json_entry_naming_it(tmp_path):
    config = tiny_config(tmp_path / "run", **{"data.train_files": [str(tmp_path / "missing-*.jsonl")]})
    result = run_worker(config, env={api.ENV_LOG_FORMAT: "json"})
    assert result.returncode != 0
    errors = [json.loads(line) for line in result.stderr.splitlines()
              if line.startswith("{") and json.loads(line)["severity"] == "ERROR"]
    assert errors and "missing-" in errors[-1]["message"], result.stderr[-3000:]


def test_an_unknown_log_format_is_a_config_error(tmp_path):
    result = run_worker(tiny_config(tmp_path / "run"), env={api.ENV_LOG_FORMAT: "xml"})
    assert result.returncode == api.ExitCode.BAD_CONFIG
    assert "SIMPO_LOG_FORMAT: must be one of text, json, got 'xml'" in result.stderr


@pytest.mark.parametrize("change, message", [
    ({"trainer.profile_steps": [9]}, "trainer.profile_steps: a step is beyond the run"),
    ({"trainer.profile_steps": [0]}, "steps must be positive"),
    ({"inference": {"profile": True}}, "inference.profile: traces the inference pauses"),
])
def test_profile_settings_are_checked(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        parse_worker_config(tiny_config(str(tmp_path / "run"), **change))
