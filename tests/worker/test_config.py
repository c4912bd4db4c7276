"""The worker config parser: key paths in every error, the schedule, and no JAX import."""

import subprocess
import sys

import pytest
import yaml

from simpo_worker.contract.config import ConfigError, dump_worker_config, parse_worker_config
from simpo_worker.contract.schema import replace
from simpo_worker.main import load_worker_config


def base() -> dict:
    return {
        "model": {"source": "smollm2"},
        "data": {"train_files": ["data/train.jsonl"]},
        "trainer": {"num_train_steps": 7, "batch_size": 8},
        "inference": {"eval_at_steps": [2], "synthetic_prompt_count": 128, "max_new_tokens": 2048},
        "output_dir": "gs://bucket/run",
    }


def with_key(data: dict, path: str, value) -> dict:
    node = data
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


def test_reference_config_parses_with_published_simpo_defaults():
    config = parse_worker_config(base())
    assert config.simpo.beta == 2.5 and config.simpo.gamma_beta_ratio == 0.55
    assert config.simpo.gamma == pytest.approx(1.375)
    assert config.inference.schedule(config.trainer.num_train_steps) == [2]


@pytest.mark.parametrize("path,value,message", [
    ("model.bogus", 1, "model.bogus: unknown key"),
    ("bogus", 1, "bogus: unknown key"),
    ("trainer.batch_size", "8", "trainer.batch_size: expected an integer"),
    ("trainer.batch_size", True, "trainer.batch_size: expected an integer"),
    ("trainer.num_train_steps", 0, "trainer.num_train_steps: must be > 0"),
    ("trainer.microbatches", 3, "trainer.microbatches: must divide batch_size (batch_size = 8, microbatches = 3)"),
    ("trainer.mesh.fsdp", 0, "trainer.mesh.fsdp: must be >= 1 or -1"),
    ("trainer.compute_dtype", "float16", "trainer.compute_dtype: must be one of float32, bfloat16"),
    ("inference.eval_at_steps", [8], "inference.eval_at_steps: a step is beyond the run (trainer.num_train_steps = 7)"),
    ("inference.eval_at_steps", [0], "inference.eval_at_steps: steps must be positive"),
    ("inference.eval_at_steps", [2, 2], "inference.eval_at_steps: steps must be unique"),
    ("inference.mode", "tensor_parallel", "inference.mode: must be one of host_data_parallel, global_mesh"),
    ("inference.top_p", 0.0, "inference.top_p: must be in (0, 1]"),
    ("inference.prompts_file", "p.jsonl", "inference: set exactly one of `prompts_file` or `synthetic_prompt_count`"),
    ("simpo.beta", -1, "simpo.beta: must be > 0"),
    ("optimizer.b2", 1.0, "optimizer.b2: must be in [0, 1)"),
    ("output_dir", None, "output_dir: must not be null"),
    ("data.overlength", "drop", "data.overlength: must be one of error, truncate_prompt"),
    ("compilation_cache.dir", "cache", "compilation_cache.dir: must be an absolute path or a URL"),
    ("compilation_cache.min_compile_time_s", -1, "compilation_cache.min_compile_time_s: must be >= 0"),
])
def test_bad_values_name_the_key_path(path, value, message):
    with pytest.raises(ConfigError) as error:
        parse_worker_config(with_key(base(), path, value))
    assert message in str(error.value)


def test_held_out_pairs_need_inference_pauses():
    """data.eval_files are evaluated at the inference pauses: without any, they would be silently unused."""
    held_out = with_key(base(), "data.eval_files", ["data/eval.jsonl"])
    assert parse_worker_config(held_out).data.eval_files == ["data/eval.jsonl"]
    held_out["inference"] = {"eval_at_steps": []}
    with pytest.raises(ConfigError, match="data.eval_files: held-out pairs are evaluated at the inference pauses: "
                                          "set inference.eval_at_steps or inference.eval_every"):
        parse_worker_config(held_out)


@pytest.mark.parametrize("arch,message", [
    ({"num_heads": 5}, "model.architecture.num_heads: must divide hidden_size (hidden_size = 64, num_heads = 5)"),
    ({"num_kv_heads": 3}, "model.architecture.num_kv_heads: must divide num_heads (num_heads = 4, num_kv_heads = 3)"),
    ({"head_dim": 7}, "model.architecture.head_dim: rotary embeddings need an even head dim"),
    ({"rope_scaling": {"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     "model.architecture.rope_scaling.high_freq_factor: must be > low_freq_factor"),
])
def test_impossible_architectures(arch, message):
    data = base()
    data["model"] = {"architecture": {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
                                      "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, **arch}}
    data["tokenizer"] = "smollm2"
    with pytest.raises(ConfigError) as error:
        parse_worker_config(data)
    assert message in str(error.value)


def test_exactly_one_model_source():
    data = base()
    data["model"] = {}
    with pytest.raises(ConfigError, match="model: set exactly one of `source`"):
        parse_worker_config(data)


def test_missing_required_key():
    data = base()
    del data["trainer"]["batch_size"]
    with pytest.raises(ConfigError, match="trainer.batch_size: required key is missing"):
        parse_worker_config(data)


def test_eval_every_fallback_schedule():
    data = base()
    data["inference"] = {"eval_every": 3, "synthetic_prompt_count": 4}
    assert parse_worker_config(data).inference.schedule(7) == [3, 6]


def test_dump_then_load_round_trips(tmp_path):
    config = parse_worker_config(base())
    path = tmp_path / "config.yaml"
    path.write_text(dump_worker_config(config))
    assert load_worker_config(str(path)) == config


def test_load_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_key(base(), "trainer.seed", "x")))
    with pytest.raises(ConfigError, match=r"bad.yaml: trainer.seed: expected an integer"):
        load_worker_config(str(path))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_worker_config(str(tmp_path / "missing.yaml"))


def test_nested_replace():
    config = replace(parse_worker_config(base()), **{"trainer.num_train_steps": 3, "output_dir": "x"})
    assert config.trainer.num_train_steps == 3 and config.output_dir == "x"


def test_config_module_imports_without_jax():
    code = "import sys, simpo_worker.contract.config; assert 'jax' not in sys.modules, 'config imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)
