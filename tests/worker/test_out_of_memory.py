"""Out of device memory is not retryable: the worker exits with its own code, which the pod failure policy fails
the job on at once (a restart would run out the same way)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from simpo_worker.contract.api import EXIT_CODE_MEANINGS, NON_RETRYABLE_EXIT_CODES, ExitCode
from simpo_worker.contract.errors import is_out_of_memory
from worker_runs import run_worker, tiny_config

REPO = Path(__file__).resolve().parents[2]
# 2^20 x 2^18 float32 embedding: 1 TiB, more than any machine running the tests can allocate.
UNALLOCATABLE = {"vocab_size": 2**20, "hidden_size": 2**18, "intermediate_size": 64, "num_layers": 1,
                 "num_heads": 4, "num_kv_heads": 2}


def test_the_code_is_in_the_contract_and_non_retryable():
    assert ExitCode.OUT_OF_MEMORY == 14
    assert ExitCode.OUT_OF_MEMORY in NON_RETRYABLE_EXIT_CODES
    assert "out of device memory" in EXIT_CODE_MEANINGS[ExitCode.OUT_OF_MEMORY]


def test_xla_allocation_failures_are_recognised_and_other_errors_are_not():
    with pytest.raises(Exception) as raised:
        jnp.zeros((2**38,), jnp.float32).block_until_ready()  # XLA's own RESOURCE_EXHAUSTED
    assert is_out_of_memory(raised.value), raised.value
    try:
        try:
            jnp.zeros((2**38,), jnp.float32).block_until_ready()
        except jax.errors.JaxRuntimeError as error:
            raise RuntimeError("the train step failed") from error
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped), "the cause counts"
    assert not is_out_of_memory(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: too many concurrent RPCs"))
    assert not is_out_of_memory(RuntimeError("out of memory, says some other library"))
    assert not is_out_of_memory(ValueError("shapes do not match"))


def test_a_model_that_cannot_be_allocated_exits_with_the_out_of_memory_code(tmp_path):
    config = tiny_config(tmp_path / "run", **{"model": {"architecture": UNALLOCATABLE, "init_seed": 0}})
    result = run_worker(config)
    assert result.returncode == ExitCode.OUT_OF_MEMORY, result.stderr[-3000:]
    assert "Out of memory allocating" in result.stderr
    assert "simpo-interleave plan" in result.stderr, "the log says what to do next"


def test_the_readme_and_the_operator_guide_list_every_non_retryable_code():
    readme = (REPO / "README.md").read_text()
    guide = (REPO / "docs" / "operator.md").read_text()
    for code in NON_RETRYABLE_EXIT_CODES:
        assert f"| {code} |" in readme, f"exit code {code} missing from the README's table"
        assert f" {code} " in guide, f"exit code {code} missing from docs/operator.md"
