"""Weight files: HF safetensors save/load (single, sharded, bfloat16, fsspec URL), GGUF load (llama.cpp's q/k
permutation, tied head), the model source dispatch, and one clear ModelError (exit code 12) per kind of bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape

from model_goldens import TINY_LLAMA_DIR
from simpo_worker.contract.config import ArchitectureConfig, ModelConfig, RopeScaling
from simpo_worker.contract.errors import ModelError
from simpo_worker.model.llama import Llama, init_llama
from simpo_worker.weights.gguf_reader import gguf_tensor_names, load_gguf_model
from simpo_worker.weights.hf_load import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, load_hf_model
from simpo_worker.weights.hf_save import save_hf_model
from simpo_worker.weights.hf_tensors import llama_to_hf_tensors
from simpo_worker.weights.pretrained import load_model, load_pretrained

TINY = ArchitectureConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=12, rope_theta=5000.0, rms_norm_eps=1e-5,
                          rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32),
                          tie_word_embeddings=False, max_position_embeddings=128, bos_token_id=1,
                          eos_token_ids=[2, 3])
TINY_TIED = ArchitectureConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                               num_kv_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=[2])


def tiny_model(config: ArchitectureConfig = TINY, seed: int = 0) -> Llama:
    return init_llama(config, jax.random.key(seed))


def assert_models_identical(a: Llama, b: Llama) -> None:
    assert a.config == b.config
    assert_weights_identical(a, b)


def assert_weights_identical(a: Llama, b: Llama) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def expect_model_error(load, *fragments: str) -> str:
    """`load()` must raise ModelError (exit code 12) whose message holds every fragment (file name, problem)."""
    with pytest.raises(ModelError) as caught:
        load()
    message = str(caught.value)
    assert caught.value.exit_code == 12
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error: {message}"
    return message


# ---- HF safetensors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, TINY_TIED], ids=["untied", "tied"])
def test_save_then_load_is_bit_identical(tmp_path, config):
    model = tiny_model(config)
    save_hf_model(model, str(tmp_path / "ckpt"))
    assert_models_identical(load_hf_model(str(tmp_path / "ckpt")), model)
    has_head = "lm_head.weight" in safetensors.numpy.load_file(str(tmp_path / "ckpt" / WEIGHTS_FILE))
    assert has_head == (not config.tie_word_embeddings)


def test_save_and_load_through_an_fsspec_url():
    model = tiny_model()
    save_hf_model(model, "memory://weights-test/ckpt")
    assert_models_identical(load_pretrained("memory://weights-test/ckpt"), model)


def test_saver_writes_the_tensors_transformers_writes(tmp_path):
    """tests/goldens/tiny_llama was written by transformers' save_pretrained: ours must match it tensor for tensor."""
    model = load_hf_model(str(TINY_LLAMA_DIR))
    save_hf_model(model, str(tmp_path))
    theirs = safetensors.numpy.load_file(str(TINY_LLAMA_DIR / WEIGHTS_FILE))
    ours = safetensors.numpy.load_file(str(tmp_path / WEIGHTS_FILE))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_sharded_checkpoint_with_index(tmp_path):
    model = tiny_model()
    save_hf_model(model, str(tmp_path / "single"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(tmp_path / "single" / CONFIG_FILE, sharded / CONFIG_FILE)
    tensors = llama_to_hf_tensors(model)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        safetensors.numpy.save_file({n: tensors[n] for n in shard_names}, str(sharded / file))
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (sharded / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_models_identical(load_hf_model(str(sharded)), model)


def test_bfloat16_weights_load_as_float32(tmp_path):
    model = tiny_model()
    save_hf_model(model, str(tmp_path))
    # Rewrite the weights in bfloat16 with the safetensors package's own (flax) writer.
    bf16 = {n: jnp.asarray(t, jnp.bfloat16) for n, t in llama_to_hf_tensors(model).items()}
    safetensors.flax.save_file(bf16, str(tmp_path / WEIGHTS_FILE))
    loaded = load_hf_model(str(tmp_path))
    expected = {n: np.asarray(t.astype(jnp.float32)) for n, t in bf16.items()}
    got = llama_to_hf_tensors(loaded)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(got[name], tensor, err_msg=name)
    assert not np.array_equal(got["model.embed_tokens.weight"], np.asarray(model.embed)), "bf16 must round"


# ---- GGUF ------------------------------------------------------------------------------------------------------


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF rotate-half -> interleaved pairs)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path: Path, model: Llama, *, architecture: str = "llama", drop: str | None = None,
               raw_type: tuple[str, GGMLQuantizationType] | None = None, feed_forward_length: int | None = None,
               ) -> Path:
    """A GGUF as llama.cpp's converter writes it (f32 tensors), with optional defects for the error tests."""
    c = model.config
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(feed_forward_length or c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.resolved_head_dim)
    writer.add_rope_dimension_count(c.resolved_head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_ids[0])
    names = gguf_tensor_names(c.num_layers)
    for hf_name, tensor in llama_to_hf_tensors(model).items():
        name = names[hf_name]
        if name == drop:
            continue
        if name.endswith("attn_q.weight"):
            tensor = llama_cpp_permute(tensor, c.num_heads)
        elif name.endswith("attn_k.weight"):
            tensor = llama_cpp_permute(tensor, c.num_kv_heads)
        if raw_type is not None and raw_type[0] == name:
            qtype = raw_type[1]
            raw = np.zeros(quant_shape_to_byte_shape(tensor.shape, qtype), np.uint8)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY_GGUF = ArchitectureConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=12, rope_theta=5000.0, rms_norm_eps=1e-5,
                               tie_word_embeddings=False, max_position_embeddings=128, bos_token_id=1,
                               eos_token_ids=[2])


@pytest.mark.parametrize("config", [TINY_GGUF, TINY_TIED], ids=["untied", "tied"])
def test_gguf_load_undoes_the_llama_cpp_permutation(tmp_path, config):
    model = tiny_model(config)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    loaded = load_pretrained(str(path))
    assert_weights_identical(loaded, model)
    # GGUF stores the epsilon as float32.
    assert loaded.config == dataclasses.replace(config, rms_norm_eps=float(np.float32(config.rms_norm_eps)))


def test_gguf_through_an_fsspec_url(tmp_path):
    import fsspec

    model = tiny_model(TINY_GGUF)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    with fsspec.open("memory://weights-test/tiny.gguf", "wb") as remote:
        remote.write(path.read_bytes())
    assert_weights_identical(load_gguf_model("memory://weights-test/tiny.gguf"), model)


# ---- model sources ---------------------------------------------------------------------------------------------


def test_load_model_random_init_is_seeded():
    model = load_model(ModelConfig(architecture=TINY, init_seed=3))
    assert_models_identical(model, tiny_model(TINY, seed=3))
    assert not np.array_equal(np.asarray(model.embed), np.asarray(tiny_model(TINY, seed=4).embed))


def test_load_model_from_a_source(tmp_path):
    model = tiny_model()
    save_hf_model(model, str(tmp_path))
    assert_models_identical(load_model(ModelConfig(source=str(tmp_path))), model)


# ---- bad input: one clear ModelError each ----------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    save_hf_model(tiny_model(), str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


def test_missing_source(tmp_path):
    expect_model_error(lambda: load_pretrained(str(tmp_path / "nothing")), "nothing", "not a model source")
    expect_model_error(lambda: load_pretrained(str(tmp_path / "nothing.gguf")), "nothing.gguf", "missing weight file")


def test_missing_weight_file(saved):
    (saved / WEIGHTS_FILE).unlink()
    expect_model_error(lambda: load_pretrained(str(saved)), str(saved), "missing weight file")


def test_missing_shard_listed_in_the_index(saved):
    names = llama_to_hf_tensors(tiny_model()).keys()
    (saved / INDEX_FILE).write_text(json.dumps({"weight_map": {n: "model-00002-of-00002.safetensors"
                                                                for n in names}}))
    expect_model_error(lambda: load_pretrained(str(saved)), "model-00002-of-00002.safetensors",
                       "missing weight file")


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999], ids=["half", "last-bytes"])
def test_truncated_safetensors(saved, keep_fraction):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[:int(len(data) * keep_fraction)])
    expect_model_error(lambda: load_pretrained(str(saved)), WEIGHTS_FILE, "truncated")


def test_truncated_safetensors_header(saved):
    (saved / WEIGHTS_FILE).write_bytes((saved / WEIGHTS_FILE).read_bytes()[:100])
    expect_model_error(lambda: load_pretrained(str(saved)), WEIGHTS_FILE, "truncated", "header")


def test_shape_mismatch_with_config(saved):
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["intermediate_size"] = 40
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    expect_model_error(lambda: load_pretrained(str(saved)), WEIGHTS_FILE, "model.layers.0.mlp.gate_proj.weight",
                       "has shape [48, 32]", "implies [40, 32]")


def test_missing_tensor(saved):
    tensors = safetensors.numpy.load_file(str(saved / WEIGHTS_FILE))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, str(saved / WEIGHTS_FILE))
    expect_model_error(lambda: load_pretrained(str(saved)), "model.layers.1.mlp.up_proj.weight", "missing")


@pytest.mark.parametrize("change, problem", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture: model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "num_kv_heads: must divide num_heads"),
])
def test_unsupported_or_invalid_hf_config(saved, change, problem):
    config = json.loads((saved / CONFIG_FILE).read_text())
    config.update(change)
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    expect_model_error(lambda: load_pretrained(str(saved)), CONFIG_FILE, problem)


@pytest.mark.parametrize("cut", [0.5, 0.02], ids=["in-tensor-data", "in-metadata"])
def test_truncated_gguf(tmp_path, cut):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(TINY_GGUF))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * cut)])
    expect_model_error(lambda: load_pretrained(str(path)), "tiny.gguf", "truncated or corrupt")


def test_unsupported_gguf_quantization(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(TINY_GGUF),
                      raw_type=("blk.1.ffn_up.weight", GGMLQuantizationType.Q8_1))
    expect_model_error(lambda: load_pretrained(str(path)), "tiny.gguf", "blk.1.ffn_up.weight", "Q8_1",
                       "not supported")


def test_unknown_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(TINY_GGUF), architecture="gpt2")
    expect_model_error(lambda: load_pretrained(str(path)), "tiny.gguf",
                       "unsupported architecture: general.architecture is 'gpt2'")


def test_gguf_missing_tensor(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(TINY_GGUF), drop="blk.0.attn_v.weight")
    expect_model_error(lambda: load_pretrained(str(path)), "tiny.gguf", "blk.0.attn_v.weight", "missing")


def test_gguf_shape_mismatch_with_metadata(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(TINY_GGUF), feed_forward_length=40)
    expect_model_error(lambda: load_pretrained(str(path)), "tiny.gguf", "blk.0.ffn_gate.weight",
                       "has shape [32, 48]", "implies [32, 40]")


# ---- sharded loading -------------------------------------------------------------------------------------------

SHARDED_LOAD_SCRIPT = """
import json, sys
import jax, numpy as np
from simpo_worker.contract.config import ArchitectureConfig, MeshConfig, ModelConfig
from simpo_worker.model.layout import param_spec
from simpo_worker.model.llama import init_llama
from simpo_worker.parallel.mesh import make_mesh
from simpo_worker.weights.hf_load import load_hf_model
from simpo_worker.weights.pretrained import load_model, load_pretrained

mesh = make_mesh(MeshConfig(data=1, fsdp=2, model=2))
arch = json.loads(sys.argv[2])
checked = []

def compare(name, sharded, whole):
    assert jax.tree.structure(sharded) == jax.tree.structure(whole), name
    paths = jax.tree_util.tree_leaves_with_path(sharded)
    for (path, got), want in zip(paths, jax.tree.leaves(whole)):
        spec = param_spec(path[-1].name, got.shape, sharded.config, mesh.shape)
        assert got.sharding.spec == spec, (name, path, got.sharding.spec, spec)
        for shard in got.addressable_shards:  # each device holds exactly its region of the whole
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index], err_msg=str(path))
    checked.append(name)

for source in json.loads(sys.argv[1]):
    compare(source, load_pretrained(source, mesh), load_hf_model(source))
compare("smollm2 (GGUF, placed)", load_pretrained("smollm2", mesh), load_pretrained("smollm2"))
# Random init under jit with the params' shardings: the values of the same init jitted on one device (eager
# init_llama may differ in the last bit: XLA fuses the normal sampling differently).
config = ModelConfig(architecture=ArchitectureConfig(**arch), init_seed=3)
one_device = jax.jit(lambda key: init_llama(config.architecture, key))(jax.random.key(3))
compare("random init", load_model(config, mesh), one_device)
print("CHECKED " + json.dumps(checked))
"""


def test_sharded_load_gives_each_device_its_region(tmp_path):
    """On a 4-device mesh (fsdp 2 x model 2) every param is made on its PARAM_AXES sharding, and each device's
    shard is exactly its region of the whole model: HF safetensors from a local directory, from gs:// (the GCS
    emulator, through gcsfs), as bfloat16 split over two files with an index; SmolLM2's GGUF placed; random init
    under jit."""
    import os
    import subprocess
    import sys

    from gcs_emulator import BUCKET, gcs_emulator

    model = tiny_model(dataclasses.replace(TINY, num_layers=3))
    local = tmp_path / "float32"
    save_hf_model(model, str(local))
    bf16 = tmp_path / "bfloat16"
    bf16.mkdir()
    shutil.copy(local / CONFIG_FILE, bf16 / CONFIG_FILE)
    tensors = {n: jnp.asarray(t, jnp.bfloat16) for n, t in llama_to_hf_tensors(model).items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        safetensors.flax.save_file({n: tensors[n] for n in shard_names}, str(bf16 / file))
    (bf16 / INDEX_FILE).write_text(json.dumps({"weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    arch = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 2, "tie_word_embeddings": False}
    with gcs_emulator() as gcs_env:
        env = {**os.environ, **gcs_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        remote = f"gs://{BUCKET}/models/float32"
        upload = f"import fsspec; fsspec.filesystem('gs').put({str(local)!r}, {remote!r}, recursive=True)"
        subprocess.run([sys.executable, "-c", upload], env=env, check=True, timeout=120)
        sources = [str(local), remote, str(bf16)]
        result = subprocess.run([sys.executable, "-c", SHARDED_LOAD_SCRIPT, json.dumps(sources), json.dumps(arch)],
                                env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("CHECKED "))
    assert json.loads(line.removeprefix("CHECKED ")) == [*sources, "smollm2 (GGUF, placed)", "random init"]
