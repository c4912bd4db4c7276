"""Helpers for tests that run the real worker entry point (`simpo-interleave worker`) in subprocesses."""

import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from etils import epath

from session_cache import COMPILATION_CACHE_ENV
from simpo_worker.contract.config import parse_worker_config
from simpo_worker.data.make_preference_data import generate, main as make_preference_data, write_jsonl
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.model.llama import Llama
from simpo_worker.store import outputs
from simpo_worker.train.checkpoint import step_dir
from simpo_worker.train.trainer import Trainer
from simpo_worker.weights.hf_tensors import llama_to_hf_tensors
from simpo_worker.weights.pretrained import load_model

TINY_MODEL = {"vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2}


@cache
def preference_files() -> str:
    """A small generated preference set (train split), made once per test session."""
    out = Path(tempfile.mkdtemp(prefix="simpo-prefs-"))
    make_preference_data([str(out), "--train", "96", "--eval", "8", "--seed", "1"])
    return str(out / "train.jsonl")


@cache
def held_out_file() -> str:
    """9 held-out pairs: not a multiple of the tiny runs' batch of 8, so the last eval batch is mostly padding (on
    2 hosts, one host's rows of it are padding alone)."""
    path = Path(tempfile.mkdtemp(prefix="simpo-held-out-")) / "eval.jsonl"
    write_jsonl(path, generate(train=0, held_out=9, seed=11)[1])
    return str(path)


def tiny_config(output_dir, **overrides) -> dict:
    config = {
        "model": {"architecture": TINY_MODEL, "init_seed": 3},
        "tokenizer": "smollm2",
        "data": {"train_files": [preference_files()], "max_seq_len": 64},
        "trainer": {"num_train_steps": 7, "batch_size": 8, "microbatches": 2, "seed": 5,
                    "checkpoint": {"every": 2, "keep": 2}},
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 2, "weight_decay": 0.1},
        # The test session's cache (tests/conftest.py): runs of the same programs compile them once.
        "compilation_cache": {"dir": os.environ[COMPILATION_CACHE_ENV], "min_compile_time_s": 0.2},
        "output_dir": str(output_dir),
    }
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[last] = value
    return config


def write_config(config: dict) -> Path:
    """Next to a local output dir; a URL's (gs://...) in a local temporary folder."""
    output_dir = config["output_dir"]
    path = (Path(tempfile.mkdtemp(prefix="simpo-config-")) / "config.yaml" if "://" in output_dir
            else Path(output_dir + ".yaml"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def worker_command(config: dict, *args: str) -> list[str]:
    return [sys.executable, "-m", "simpo_interleave.cli", "worker", "--config", str(write_config(config)), *args]


def worker_env(devices: int = 1, env: dict[str, str] | None = None) -> dict[str, str]:
    # The device count is fixed when jax starts, hence a process per mesh size.
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
    env.pop("JAX_NUM_PROCESSES", None)
    return env


def run_worker(config: dict, *args: str, devices: int = 1, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(worker_command(config, *args), env=worker_env(devices, env), capture_output=True,
                          text=True, timeout=timeout)


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"worker exit {result.returncode}\n{result.stderr[-4000:]}"
    return result


def eval_config(output_dir, **overrides) -> dict:
    """tiny_config with inference pauses after steps 2 and 5, the held-out pairs evaluated at each; every
    checkpoint kept."""
    return tiny_config(output_dir, **{"inference": {"eval_at_steps": [2, 5], "synthetic_prompt_count": 2,
                                                    "max_new_tokens": 4},
                                      "data.eval_files": [held_out_file()], "trainer.checkpoint.keep": 10,
                                      **overrides})


def records(output_dir, event: str) -> list[dict]:
    return [row for row in outputs.read_metrics(str(output_dir)) if row["event"] == event]


def train_records(output_dir) -> list[dict]:
    return records(output_dir, "train")


def checkpoint_arrays(output_dir, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint, whole, by name (read back with Orbax as numpy arrays on this host)."""
    path = epath.Path(str(output_dir)) / "checkpoints" / f"step_{step:08d}" / "state"  # local or gs://
    with ocp.PyTreeCheckpointer() as checkpointer:
        names = checkpointer.metadata(path).item_metadata.tree
        as_numpy = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in names}
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def checkpoint_specs(output_dir, step: int) -> dict[str, tuple]:
    """Each array's partition spec when it was saved (Orbax records the sharding), by name."""
    path = epath.Path(str(output_dir)) / "checkpoints" / f"step_{step:08d}" / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        return {name: tuple(meta.sharding.partition_spec)
                for name, meta in checkpointer.metadata(path).item_metadata.tree.items()}


@cache
def straight_run() -> str:
    """7 steps in one process (shared by the tests that compare against it)."""
    output_dir = Path(tempfile.mkdtemp(prefix="simpo-straight-")) / "run"
    checked(run_worker(tiny_config(output_dir)))
    return str(output_dir)


@cache
def eval_run() -> tuple[str, str]:
    """eval_config's run in one process, and its log (shared by the tests that read it)."""
    output_dir = Path(tempfile.mkdtemp(prefix="simpo-eval-")) / "run"
    return str(output_dir), checked(run_worker(eval_config(output_dir))).stderr


def assert_steps_match_straight_run(output_dir, rel: float, abs_tol: float) -> None:
    """A run's per-step metrics against the 1-process, 1-device run of the same config (`straight_run`)."""
    one, other = train_records(straight_run()), train_records(output_dir)
    assert [r["step"] for r in other] == list(range(1, 8))
    for a, b in zip(one, other):
        for name in ("loss", "rewards/margins", "grad_norm", "tokens"):
            assert b[name] == pytest.approx(a[name], rel=rel, abs=abs_tol), (a["step"], name)


def live_params(config: dict, step: int, workdir: Path) -> Llama:
    """The params a run held after `step`: its checkpoint of that step (bit-identical to the live state),
    restored in this process on one device."""
    output_dir = workdir / f"restore-{step}"
    checkpoints = str(Path(config["output_dir"]) / "checkpoints")
    shutil.copytree(step_dir(checkpoints, step), step_dir(str(output_dir / "checkpoints"), step))
    worker_config = parse_worker_config({**config, "output_dir": str(output_dir), "inference": {}, "export": {},
                                         "trainer": {**config["trainer"], "mesh": {}}})
    trainer = Trainer(worker_config, load_model(worker_config.model), load_tokenizer(worker_config.tokenizer))
    assert trainer.restore_latest() == step
    return trainer.model


def logits(model: Llama, seed: int = 0) -> np.ndarray:
    tokens = jax.random.randint(jax.random.key(seed), (2, 19), 0, model.config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(19), (2, 19))
    return np.asarray(eqx.filter_jit(lambda m, t, p: m(t, p))(model, tokens, positions))  # weights as arguments


def assert_same_model(copy: Llama, live: Llama) -> None:
    """Every weight bit for bit, and so the logits exactly (float32, the same program on the same device)."""
    assert copy.config == live.config
    ours, theirs = llama_to_hf_tensors(copy), llama_to_hf_tensors(live)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    np.testing.assert_array_equal(logits(copy), logits(live))
