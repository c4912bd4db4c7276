"""The whole interleaved run across real local host processes (jax.distributed on CPU with gloo), launched from
a SimpoInterleaveJob YAML by the local runner: train 2 -> infer on every host -> train 5.

Runs are cached per configuration for the module, since several checks read the same run.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gcs_emulator import BUCKET, gcs_emulator, point_this_process_at
from local_hosts import run_workers, start_workers
from simpo_interleave.local_runner import run_job_file
from simpo_worker.contract.api import ExitCode
from simpo_worker.data.make_preference_data import generate, write_jsonl
from simpo_worker.store import outputs, storage
from worker_runs import checked, checkpoint_arrays

pytestmark = pytest.mark.multiprocess

NUM_PROMPTS = 10  # not a multiple of 4: uneven host shards
STEPS = 7
BARRIER_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interleave")
    train, held_out = generate(train=64, held_out=NUM_PROMPTS, seed=0)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "prompts.jsonl", [{"messages": row["chosen"][:-1]} for row in held_out])
    return root


def job_config(workdir: Path, output_dir: str, **inference) -> dict:
    return {
        "model": {"architecture": {"vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64,
                                   "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                   "max_position_embeddings": 512}},
        "tokenizer": "smollm2",
        "data": {"train_files": [str(workdir / "train.jsonl")], "max_seq_len": 96},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 1},
        "trainer": {"num_train_steps": STEPS, "batch_size": 8, "seed": 3},
        "inference": {"eval_at_steps": [2], "mode": "host_data_parallel",
                      "prompts_file": str(workdir / "prompts.jsonl"), "max_new_tokens": 12, "max_prompt_len": 256,
                      "batch_size": 4, "temperature": 0.8, "top_p": 0.95, **inference},
        "distributed": {"barrier_timeout_s": 60, "init_timeout_s": 60},
        "output_dir": output_dir,
    }


def write_job(workdir: Path, name: str, config: dict, hosts: int) -> Path:
    job = {"apiVersion": "simpo.dev/v1alpha1", "kind": "SimpoInterleaveJob",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"image": "worker:test", "hosts": hosts, "config": config}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


class Runs:
    """Each distinct run once per module."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.done: dict[str, str] = {}

    def get(self, name: str, hosts: int, **inference) -> str:
        if name not in self.done:
            out = str(self.workdir / name)
            code = run_job_file(str(write_job(self.workdir, name, job_config(self.workdir, out, **inference),
                                              hosts)), timeout_s=900)
            assert code == 0, f"run {name} failed with exit code {code}"
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="module")
def runs(workdir) -> Runs:
    return Runs(workdir)


def train_losses(output_dir: str) -> list[float]:
    records = outputs.read_metrics(output_dir)
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    return [r["loss"] for r in train]


def final_params(output_dir: str) -> dict[str, np.ndarray]:
    arrays = checkpoint_arrays(output_dir, STEPS)
    assert arrays
    return arrays


def completions(output_dir: str, step: int = 2) -> dict[int, str]:
    manifest = outputs.read_manifest(output_dir, step)
    rows = []
    for host in range(manifest["hosts"]):
        rows += storage.read_jsonl(outputs.host_shard_path(output_dir, step, host, manifest["hosts"]))
    return {row["global_prompt_index"]: row["completion"] for row in rows}


@pytest.mark.parametrize("hosts,mode", [(2, "host_data_parallel"), (4, "host_data_parallel"),
                                        (2, "global_mesh"), (4, "global_mesh")])
def test_flow_covers_every_prompt_once(runs, hosts, mode):
    out = runs.get(f"flow-{hosts}-{mode}", hosts, mode=mode)
    manifest = outputs.read_manifest(out, 2)
    assert manifest["prompts"] == NUM_PROMPTS and manifest["hosts"] == hosts
    rows = []
    for host in range(hosts):
        shard = storage.read_jsonl(outputs.host_shard_path(out, 2, host, hosts))
        assert all(row["process_index"] == host and row["process_count"] == hosts and row["step"] == 2
                   for row in shard)
        rows += shard
    assert sorted(row["global_prompt_index"] for row in rows) == list(range(NUM_PROMPTS))
    assert all(row["finish_reason"] in ("stop", "length") and 0 < row["completion_tokens"] <= 12 for row in rows)
    assert all(row["finish_reason"] == "stop" or row["completion_tokens"] == 12 for row in rows)
    assert all(isinstance(row["completion"], str) for row in rows)  # the engine's text
    assert manifest["completion_tokens"] == sum(row["completion_tokens"] for row in rows)
    assert sum(manifest["finish_reasons"].values()) == NUM_PROMPTS
    assert sum(host["prompts"] for host in manifest["per_host"]) == NUM_PROMPTS
    train = [r for r in outputs.read_metrics(out) if r["event"] == "train"]
    # Resuming reuses the compiled train step: compiled once in the whole run.
    assert {r["train_step_compilations"] for r in train} == {1}


def test_completions_do_not_depend_on_the_host_count(runs):
    two = completions(runs.get("flow-2-host_data_parallel", 2))
    four = completions(runs.get("flow-4-host_data_parallel", 4))
    mesh_two = completions(runs.get("flow-2-global_mesh", 2, mode="global_mesh"))
    mesh_four = completions(runs.get("flow-4-global_mesh", 4, mode="global_mesh"))
    assert two == four == mesh_two == mesh_four
    assert len(set(two.values())) > 1  # sampled, not degenerate


def test_resume_is_exact(runs):
    """Losses of steps 1-7 and the final params are bit-identical with and without the pauses."""
    plain = runs.get("no-inference", 2, eval_at_steps=[])
    paused = runs.get("flow-2-host_data_parallel", 2)
    twice = runs.get("pauses-2-5", 2, eval_at_steps=[2, 5])
    assert train_losses(plain) == train_losses(paused) == train_losses(twice)
    reference = final_params(plain)
    for other in (final_params(paused), final_params(twice)):
        assert reference.keys() == other.keys()
        for key in reference:
            assert np.array_equal(reference[key], other[key]), key
    assert outputs.read_manifest(twice, 5) is not None


@pytest.mark.parametrize("mode", ["host_data_parallel", "global_mesh"])
def test_two_slices_train_and_infer_like_one_slice(runs, workdir, mode):
    """4 hosts as 2 slices of 2 (SIMPO_NUM_SLICES=2; on CPU a slice is a run of consecutive processes), data 2
    over the slices x fsdp 2 within each (global_mesh decodes on that mesh): the losses and completions of the
    one-slice run on data 4."""
    out = workdir / f"slices-{mode}"
    config = job_config(workdir, str(out), mode=mode)
    config["trainer"]["mesh"] = {"data": 2, "fsdp": -1}
    results = [checked(result) for result in run_workers(config, 4, 1, slices=2, timeout=900)]
    assert "mesh data 2 x fsdp 2 x model 1 over 2 slice(s)" in results[0].stderr
    reference = runs.get(f"flow-4-{mode}", 4, mode=mode)
    assert completions(str(out)) == completions(reference)
    assert train_losses(str(out)) == pytest.approx(train_losses(reference), rel=1e-4, abs=1e-5)


def test_a_multislice_mesh_with_fsdp_across_the_slices_is_refused(workdir):
    config = job_config(workdir, str(workdir / "fsdp-across-slices"), eval_at_steps=[])
    config["trainer"]["mesh"] = {"data": 1, "fsdp": -1}
    leader, other = run_workers(config, 2, 1, slices=2)
    assert leader.returncode == ExitCode.BAD_CONFIG, leader.stderr[-3000:]
    assert ("trainer.mesh: a job of 2 slices x 1 devices splits only `data` over the slices, so data must be "
            "a multiple of 2; data x fsdp x model = [1, 2, 1] would put fsdp x model = 2 devices across "
            "slices") in leader.stderr
    # The other host refuses it too, unless the leader's exit (its coordination service) aborted it first.
    assert other.returncode in (ExitCode.BAD_CONFIG, -signal.SIGABRT), other.stderr[-3000:]


def test_host_killed_while_decoding_is_detected_by_the_others_and_the_rerun_resumes_from_the_pause(runs, workdir):
    """The kill drill. 4 hosts, 7 prompts decoded one at a time (shards of 2, 2, 2 and 1), 200 tokens each. Host 1
    is SIGKILLed while decoding: after it reported a decode chunk, once host 3 (one prompt) has written its shard.
    Nothing else is stopped: hosts 0, 2 and 3 must find out by themselves (the pause's barrier names the absent host)
    and exit retryable in bounded time. The rerun resumes from the pause's checkpoint at step 2 (its logs say so;
    steps 1-2 are not trained again) and ends with the outputs and params of an uninterrupted run."""
    prompts = workdir / "five_prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in (workdir / "prompts.jsonl").read_text().splitlines()[:7]))
    inference = {"prompts_file": str(prompts), "max_new_tokens": 200, "batch_size": 1, "ignore_eos": True}
    out = workdir / "kill-drill"
    config = job_config(workdir, str(out), **inference)
    config["distributed"]["barrier_timeout_s"] = BARRIER_TIMEOUT_S
    hosts = start_workers(config, 4, 1)
    logs: list[list[str]] = [[] for _ in hosts]
    decoded_a_chunk = threading.Event()

    def read(host: int) -> None:
        for line in hosts[host].stderr:
            logs[host].append(line)
            if host == 1 and re.search(r"inference at step 2: \d+/2 prompts done, [1-9]\d* tokens", line):
                decoded_a_chunk.set()
    readers = [threading.Thread(target=read, args=(host,), daemon=True) for host in range(4)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 600
        while not (decoded_a_chunk.is_set() and storage.exists(outputs.host_shard_path(str(out), 2, 3, 4))):
            assert time.monotonic() < deadline and hosts[1].poll() is None, "host 1 never decoded past host 3's shard"
            time.sleep(0.05)
        assert not storage.exists(outputs.host_shard_path(str(out), 2, 1, 4)), "host 1 finished before the kill"
        hosts[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        codes = {host: hosts[host].wait(timeout=BARRIER_TIMEOUT_S + 120) for host in (0, 2, 3)}
        detected_s = time.monotonic() - killed_at
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
    for reader in readers:
        reader.join(timeout=10)
    survivors = {host: "".join(logs[host]) for host in (0, 2, 3)}
    # The first to time out at the pause's barrier exits RETRYABLE naming the absent; when that is the leader, the
    # coordination service it hosts goes with it and JAX aborts the rest (SIGABRT: 134 in a pod, also retryable).
    for host, code in codes.items():
        assert code in (ExitCode.RETRYABLE, -signal.SIGABRT), f"host {host} exit {code}\n{survivors[host][-3000:]}"
    named = [host for host in codes if re.search(r"host\(s\) \[[0-9, ]*\b1\b[0-9, ]*\] did not arrive",
                                                    survivors[host])]
    assert named and all(codes[host] == ExitCode.RETRYABLE for host in named), survivors
    assert detected_s < BARRIER_TIMEOUT_S + 60
    print(f"kill drill: the surviving hosts exited {detected_s:.1f}s after the kill (barrier timeout "
          f"{BARRIER_TIMEOUT_S}s), codes {codes}, host(s) {named} named host 1")
    assert outputs.read_manifest(str(out), 2) is None, "an interrupted inference step must not look complete"

    rerun = [checked(result) for result in run_workers(config, 4, 1, timeout=900)]
    for result in rerun:
        assert "training from step 2 to 7" in result.stderr, result.stderr[-3000:]
    reference = runs.get("kill-drill-reference", 4, **inference)
    assert completions(str(out)) == completions(reference)
    assert train_losses(str(out)) == train_losses(reference)  # each step trained once, the same
    mine, theirs = final_params(str(out)), final_params(reference)
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert np.array_equal(mine[key], theirs[key]), key


def test_outputs_to_gcs(workdir, monkeypatch):
    with gcs_emulator() as env:
        point_this_process_at(env, monkeypatch)
        out = f"gs://{BUCKET}/runs/gcs"
        job = write_job(workdir, "gcs", job_config(workdir, out), 2)
        assert run_job_file(str(job), timeout_s=900, extra_env=env) == 0
        manifest = outputs.read_manifest(out, 2)
        assert manifest["prompts"] == NUM_PROMPTS
        assert len(completions(out)) == NUM_PROMPTS
        assert len(train_losses(out)) == STEPS


@pytest.mark.parametrize("change,code,message", [
    ({"eval_at_steps": [9]}, 10, "inference.eval_at_steps: a step is beyond the run"),
    ({"eval_at_steps": [-1]}, 10, "inference.eval_at_steps: steps must be positive"),
    ({"prompts_file": "/nonexistent/prompts.jsonl"}, 11, "/nonexistent/prompts.jsonl"),
])
def test_bad_input_fails_before_training(workdir, capfd, change, code, message):
    out = workdir / f"bad-{abs(hash(str(change)))}"
    job = write_job(workdir, "bad", job_config(workdir, str(out), **change), 2)
    assert _run_cli_local(job) == code
    captured = capfd.readouterr()
    assert message in captured.out + captured.err
    assert outputs.read_metrics(str(out)) == []


def test_unwritable_output_dir(workdir, capfd):
    blocker = workdir / "not-a-dir"
    blocker.write_text("")
    job = write_job(workdir, "unwritable", job_config(workdir, str(blocker / "run")), 2)
    assert _run_cli_local(job) == 13
    captured = capfd.readouterr()
    assert "cannot write" in captured.out + captured.err


def _run_cli_local(job: Path) -> int:
    from simpo_interleave.cli import main

    return main(["local", str(job), "--timeout-s", "300"])
