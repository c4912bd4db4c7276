"""`simpo-interleave plan`: the worker's own programs compiled for a TPU slice this machine does not have (libtpu's
compile-only topologies, the `tpu` extra), their memory per chip against the chip's, FLOPs and the roofline."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simpo_operator import tpu
from simpo_operator.resource import validate_job
from simpo_worker.contract.api import ExitCode
from simpo_worker.contract.config import MeshConfig, WorkerConfig
from simpo_worker.contract.errors import ConfigError
from simpo_worker.model.layout import AXES
from simpo_worker.parallel.mesh import make_mesh
from simpo_worker.plan import memory, programs, targets  # targets sets ALLOW_MULTIPLE_LIBTPU_LOAD before libtpu loads
from simpo_worker.plan.hlo import collectives
from simpo_worker.weights.pretrained import load_architecture

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_8B = REPO / "manifests" / "examples" / "llama3-8b-m11-v5p-32.yaml"
LLAMA3_8B_CONFIG = json.loads((REPO / "bench" / "llama3-8b-config.json").read_text())
GIB = 2**30


def run_plan(job: dict, tmp_path: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "simpo_interleave.cli", "plan", str(path), *args],
                          capture_output=True, text=True, timeout=timeout)


def tiny_job(**tpu_or_hosts) -> dict:
    job = yaml.safe_load(EXAMPLE_8B.read_text())
    spec = job["spec"]
    spec.pop("tpu")
    spec.update(tpu_or_hosts)
    spec["config"]["model"] = {"architecture": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                                "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}}
    spec["config"]["tokenizer"] = "smollm2"
    spec["config"]["data"]["max_seq_len"] = 128
    spec["config"]["trainer"]["batch_size"] = 8
    spec["config"]["inference"].update(synthetic_prompt_count=8, max_new_tokens=64, max_prompt_len=64, batch_size=8)
    return job


# ---- the 8B example at full width, fewer layers: what CI can afford to compile ------------------------------

LAYERS = 2


@pytest.fixture(scope="module")
def plan_8b_narrow(tmp_path_factory) -> tuple[dict, int]:
    folder = tmp_path_factory.mktemp("llama3-8b")
    (folder / "config.json").write_text(json.dumps({**LLAMA3_8B_CONFIG, "num_hidden_layers": LAYERS}))
    job = yaml.safe_load(EXAMPLE_8B.read_text())
    job["spec"]["config"]["model"]["source"] = str(folder)
    result = run_plan(job, folder, "--json")
    assert result.returncode in (0, ExitCode.BAD_CONFIG), result.stderr[-4000:]
    return json.loads(result.stdout), result.returncode


@pytest.mark.slow
def test_plan_json_has_every_program_and_the_keys_users_script_against(plan_8b_narrow):
    plan, code = plan_8b_narrow
    assert isinstance(plan["fits"], bool)
    assert code == (0 if plan["fits"] else ExitCode.BAD_CONFIG)
    names = [p["name"] for p in plan["programs"]]
    for kind in ("train", "prefill", "decode"):
        assert any(kind in name for name in names), f"no {kind} program in {names}"
    for program in plan["programs"]:
        assert program["peak_bytes_per_chip"] > 0 and program["capacity_bytes_per_chip"] > 0
        assert program["flops"] >= 0
    assert plan["estimates"]["seconds"]["workflow"] > 0
    assert plan["estimates"]["seconds"]["train_step"] > 0


@pytest.mark.slow
def test_plan_per_chip_memory_agrees_with_a_hand_computation(plan_8b_narrow):
    plan, _ = plan_8b_narrow
    c = {**LLAMA3_8B_CONFIG, "num_hidden_layers": LAYERS}
    d, f, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv_width = c["num_key_value_heads"] * d // c["num_attention_heads"]
    params = layers * (2 * d * d + 2 * d * kv_width + 3 * d * f + 2 * d) + 2 * v * d + d
    chips = 16  # v5p-32: 16 chips, FSDP over all of them (the example's trainer.mesh)
    by_name = {p["name"]: p for p in plan["programs"]}
    train = by_name["train_step"]
    # float32 params and two float32 AdamW moments, each split 16 ways.
    assert train["params_bytes_per_chip"] == pytest.approx(4 * params / chips, rel=0.1)
    assert train["optimizer_bytes_per_chip"] == pytest.approx(8 * params / chips, rel=0.1)
    assert plan["capacity_bytes_per_chip"] == tpu.generation(tpu.shape_for_type("v5p-32")).chip.compiler_hbm_bytes
    # Inference: the training state stays resident; the host's bfloat16 copy of the weights is on top.
    decode = by_name["decode"]
    assert decode["optimizer_bytes_per_chip"] == pytest.approx(8 * params / chips, rel=0.1)
    assert decode["params_bytes_per_chip"] == pytest.approx(4 * params / chips + 2 * params, rel=0.1)
    # The KV cache at the full window: 32 rows over a host's 4 chips, 512 + 2048 - 1 tokens rounded up to 128 slots.
    window = math.ceil((512 + 2048 - 1) / 128) * 128
    assert plan["inference"]["full_window"] == window
    cache = 2 * layers * (32 / 4) * window * kv_width * 2
    assert decode["kv_cache_bytes_per_chip"] == pytest.approx(cache, rel=0.1)
    for program in plan["programs"]:
        parts = sum(program[f"{kind}_bytes_per_chip"] for kind in ("params", "optimizer", "input", "kv_cache",
                                                                    "output", "temp", "code"))
        assert program["peak_bytes_per_chip"] == parts


@pytest.mark.slow
def test_plan_flops_and_roofline_follow_the_shapes(plan_8b_narrow):
    plan, _ = plan_8b_narrow
    train = next(p for p in plan["programs"] if p["name"] == "train_step")
    c = {**LLAMA3_8B_CONFIG, "num_hidden_layers": LAYERS}
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv_width = c["num_key_value_heads"] * d // c["num_attention_heads"]
    matmul_params = LAYERS * (2 * d * d + 2 * d * kv_width + 3 * d * f) + d * v
    tokens = 32 * 2 * (2048 - 1)
    assert train["flops"] == pytest.approx(6 * matmul_params * tokens, rel=0.15)  # plus attention
    peak = plan["estimates"]["hardware"]["peak_bf16_flops_per_chip"]
    assert plan["estimates"]["seconds"]["train_step"] >= train["flops"] / 16 / peak * 0.999


# ---- jobs that cannot fit ------------------------------------------------------------------------------------

def test_a_job_that_cannot_fit_its_slice_fails_at_plan_naming_need_and_capacity(tmp_path):
    job = tiny_job(tpu={"type": "v5litepod-1"})
    # 1.07 B params, nearly all in an untied 524288 x 1024 embedding and head: float32 params, gradients and two
    # AdamW moments are 16 GiB, past the one v5e chip's 15.75 GiB whatever the activations. No inference pause:
    # only the train step compiles.
    job["spec"]["config"]["model"]["architecture"].update(vocab_size=524288, hidden_size=1024, num_heads=8,
                                                          num_kv_heads=2, tie_word_embeddings=False)
    job["spec"]["config"]["inference"]["eval_at_steps"] = []
    result = run_plan(job, tmp_path)
    assert result.returncode == ExitCode.BAD_CONFIG, result.stderr[-4000:]
    capacity = tpu.generation(tpu.shape_for_type("v5litepod-1")).chip.compiler_hbm_bytes / GIB
    assert "train_step does not fit: needs " in result.stderr
    assert f"GiB per chip against {capacity:.2f} GiB" in result.stderr
    assert "spec.tpu: a larger slice than v5litepod-1" in result.stderr, "names a knob that would help"
    assert "NO" in result.stdout, "the table marks it"


def test_a_cpu_pool_is_held_to_its_memory_limit(tmp_path):
    job = tiny_job(hosts=2, resources={"limits": {"memory": "1Mi"}})
    result = run_plan(job, tmp_path, "--json")
    assert result.returncode == ExitCode.BAD_CONFIG, result.stderr[-4000:]
    plan = json.loads(result.stdout)
    assert plan["target"]["platform"] == "cpu" and plan["target"]["chips"] == 2
    assert plan["capacity_bytes_per_chip"] == 2**20
    assert "does not fit: needs" in result.stderr and "against 0.00 GiB" in result.stderr
    roomy = tiny_job(hosts=2, resources={"limits": {"memory": "8Gi"}})
    assert run_plan(roomy, tmp_path).returncode == 0


def test_a_job_that_fits_prints_the_table_and_exits_0(tmp_path):
    job = tiny_job(tpu={"type": "v5p-8"})
    job["spec"]["config"]["inference"]["stop_tokens"] = ["\n\n"]  # matched on the host: no tokenizer needed here
    result = run_plan(job, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for words in ("memory per chip, GiB", "train_step", "prefill", "decode", "roofline estimate on v5p",
                  "https://cloud.google.com/tpu/docs/v5p", "221.8 s", "compile time"):
        assert words in result.stdout, words


# ---- the slice table against libtpu --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", tpu.SHAPES, ids=lambda s: s.accelerator_type)
def test_every_slice_in_the_table_is_a_topology_libtpu_describes(shape):
    slices = 2 if shape.chips <= 256 else 1  # multislice too, where the device count stays small
    target = targets.tpu_target(tpu.libtpu_topology(shape, slices), tpu.libtpu_topology(tpu.host_block(shape)))
    assert len(target.devices) == shape.chips * slices
    assert target.process_count == shape.hosts * slices
    assert len(target.host_devices) == shape.chips_per_host
    assert len([d for d in target.devices if d.process_index == target.devices[0].process_index]) == \
        shape.chips_per_host


@pytest.mark.parametrize("accelerator", ["v5p-32", "v6e-16", "v5litepod-16"])
def test_one_hosts_chips_compile_a_collective_as_the_engine_does(accelerator):
    shape = tpu.shape_for_type(accelerator)
    target = targets.tpu_target(tpu.libtpu_topology(shape), tpu.libtpu_topology(tpu.host_block(shape)))
    mesh = Mesh(np.array(target.host_devices), ("data",))
    # The decode loop's condition: every row done? An all-reduce over the host's chips.
    all_done = jax.jit(lambda done: jnp.all(done), in_shardings=NamedSharding(mesh, P("data")))
    all_done.lower(jax.ShapeDtypeStruct((32,), jnp.bool_)).compile()


@pytest.mark.parametrize("generation", tpu.GENERATIONS, ids=lambda g: g.name)
def test_the_compiler_hbm_in_the_table_is_what_libtpu_allows(generation):
    shape = next(s for s in tpu.SHAPES if s.generation == generation.name and s.hosts == 1)
    target = targets.tpu_target(tpu.libtpu_topology(shape))
    one_chip = NamedSharding(Mesh(np.array(target.devices[:1]), ("x",)), P())
    # A program needing 1 TiB on one chip: XLA refuses it and says what the chip has.
    too_big = jax.jit(lambda x: jnp.concatenate([x, x + 1]), in_shardings=one_chip, out_shardings=one_chip)
    with pytest.raises(Exception) as refused:
        too_big.lower(jax.ShapeDtypeStruct((2**37,), jnp.float32)).compile()
    need, available = memory.out_of_memory_need(str(refused.value))
    assert need > available
    assert available == pytest.approx(generation.chip.compiler_hbm_bytes, rel=0.001)


# ---- multislice: slices on `data` over DCN, fsdp and model inside a slice over ICI ----------------------------

def two_slices(accelerator: str) -> targets.Target:
    return targets.tpu_target(tpu.libtpu_topology(tpu.shape_for_type(accelerator), slices=2))


def test_a_multislice_mesh_splits_data_over_the_slices_and_refuses_fsdp_or_model_across_them():
    target = two_slices("v5p-16")
    devices = list(target.devices)
    assert target.slices == 2
    by_data = make_mesh(MeshConfig(data=2, fsdp=-1), devices)
    for replica in by_data.devices:  # [data, fsdp, model]: each data-parallel replica is one whole slice
        assert len({device.slice_index for device in replica.flat}) == 1
    mixed = make_mesh(MeshConfig(data=4, fsdp=2, model=-1), devices)  # 2 data replicas in each slice
    assert [{device.slice_index for device in replica.flat} for replica in mixed.devices] == [{0}, {0}, {1}, {1}]
    for fsdp_across in (MeshConfig(data=1, fsdp=-1), MeshConfig(data=-1, fsdp=4, model=4)):
        with pytest.raises(ConfigError, match=r"a job of 2 slices x 8 devices splits only `data` over the slices, "
                                              r"so data must be a multiple of 2"):
            make_mesh(fsdp_across, devices)
    with pytest.raises(ConfigError, match="the job has 1 slice\\(s\\) but the devices are in 2"):
        make_mesh(MeshConfig(), devices, slices=1)


@pytest.fixture(scope="module")
def two_slice_step() -> tuple[WorkerConfig, targets.Target, Any]:
    """The tiny model's train step for 2 x v5p-8 (data 2 over the slices x fsdp 4 within each)."""
    job = tiny_job(tpu={"type": "v5p-8", "slices": 2})
    job["spec"]["config"]["trainer"]["mesh"] = {"data": 2, "fsdp": -1}
    config = validate_job(job).spec.config
    target = two_slices("v5p-8")
    mesh = make_mesh(config.trainer.mesh, list(target.devices), target.slices)
    _, arrays, lowered = programs.lower_train_step(config, load_architecture(config.model), mesh)
    return config, arrays, lowered.compile().as_text()


def test_over_dcn_a_multislice_train_step_sends_its_gradients_once_and_nothing_else(two_slice_step):
    """libtpu compiles one program per slice; what crosses slices are its multislice transfers. Each is a sum
    over the slices of this chip's gradient shard (the within-slice reduce-scatter's output), plus the step's
    token and metric sums: no params, no activations."""
    config, arrays, hlo = two_slice_step
    found = collectives(hlo)
    dcn = [c for c in found if c.network == "dcn"]
    assert dcn and {c.kind for c in dcn} == {"ALL_REDUCE"}, [(c.kind, c.shape) for c in dcn]
    assert all(c.count == 1 for c in dcn), "once per step, not per layer or microbatch"
    compute_bytes = jnp.dtype(config.trainer.compute_dtype).itemsize
    gradient_bytes = memory.per_chip_bytes(arrays.model) // 4 * compute_bytes  # float32 param shards, 1 per chip
    compute_dtype = {"bfloat16": "bf16", "float32": "f32"}[config.trainer.compute_dtype]
    sent = sum(c.bytes for c in dcn if c.dtype == compute_dtype)
    # At least the chip's gradient shard; above it only the (8, 128) tiles the transfers are padded to.
    assert gradient_bytes <= sent <= 2 * gradient_bytes, (sent, gradient_bytes)
    assert sum(c.bytes for c in dcn) - sent <= 2 * 512, "beyond the gradients: the step's scalar sums"


def test_within_a_slice_the_fsdp_all_gathers_run_on_its_own_chips(two_slice_step):
    _, _, hlo = two_slice_step
    assert re.search(r"\bnum_partitions=4\b", hlo), "one program per slice of 4 chips"
    ici = [c for c in collectives(hlo) if c.network == "ici"]
    gathers = [c for c in ici if c.kind == "all-gather"]
    assert sum(c.count for c in gathers) >= 2 * 7, "each layer's params gathered (forward and backward)"
    assert all(c.replica_groups == "{{0,1,2,3}}" for c in ici), {c.replica_groups for c in ici}


def test_fsdp_across_slices_would_gather_params_over_dcn(two_slice_step):
    """What the refusal prevents: the same step with fsdp over both slices (a mesh made by hand; make_mesh
    refuses it) sends params over DCN in every layer."""
    config, _, _ = two_slice_step
    target = two_slices("v5p-8")
    mesh = Mesh(np.array(target.devices).reshape(1, 8, 1), AXES)
    _, _, lowered = programs.lower_train_step(config, load_architecture(config.model), mesh)
    dcn = [c for c in collectives(lowered.compile().as_text()) if c.network == "dcn"]
    assert sum(c.count for c in dcn if c.kind == "ALL_GATHER") >= 2 * 7, [(c.kind, c.count) for c in dcn]


def test_plan_of_a_multislice_job_reports_the_train_steps_bytes_over_dcn_and_refuses_fsdp_across(tmp_path):
    across = tiny_job(tpu={"type": "v5p-8", "slices": 2})  # the example's mesh: fsdp over every chip
    refused = run_plan(across, tmp_path)
    assert refused.returncode == ExitCode.BAD_CONFIG
    assert ("spec.config.trainer.mesh: a job of 2 slices x 4 devices splits only `data` over the slices"
            in refused.stderr), refused.stderr[-3000:]
    job = tiny_job(tpu={"type": "v5p-8", "slices": 2})
    job["spec"]["config"]["trainer"]["mesh"] = {"data": 2, "fsdp": -1}
    result = run_plan(job, tmp_path, "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    plan = json.loads(result.stdout)
    assert plan["target"]["slices"] == 2 and plan["target"]["mesh"] == {"data": 2, "fsdp": 4, "model": 1}
    train = next(p for p in plan["programs"] if p["name"] == "train_step")
    assert 0 < train["dcn_bytes_per_chip"] < train["ici_bytes_per_chip"]
    # Inference runs within each slice (host data parallel): nothing crosses slices.
    assert all(p["dcn_bytes_per_chip"] == 0 for p in plan["programs"] if p["name"] != "train_step")
