"""The training step's memory options (model.MemoryOptions, trainer.remat / attention / loss_chunk_tokens):
each gives the plain path's loss and gradients within float32 rounding (every gradient within 1e-5 of its
largest magnitude), alone and combined, and each lowers the compiled step's temporary memory. And the inference
replica is made from compute-dtype params (bfloat16 bytes are gathered and copied, not float32)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simpo_worker.contract.config import (ArchitectureConfig, InferenceConfig, MeshConfig, OptimizerConfig,
                                          SimpoConfig, parse_worker_config)
from simpo_worker.contract.errors import ConfigError
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.infer import engine as engine_module
from simpo_worker.infer.decode import decode_weights
from simpo_worker.infer.engine import Engine
from simpo_worker.model.attention import blockwise_attention
from simpo_worker.model.llama import PLAIN, MemoryOptions, grouped_query_attention, init_llama
from simpo_worker.parallel.mesh import make_mesh, place
from simpo_worker.train.loss import batch_loss
from simpo_worker.train.step import CompiledStep, init_state, make_optimizer
from simpo_worker.train.trainer import Trainer
from simpo_worker.weights.pretrained import load_model
from worker_runs import checkpoint_arrays, checked, run_worker, tiny_config, train_records

RTOL = 1e-5
TINY = ArchitectureConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2)
# Sequences of 21 tokens: 20 predicted positions, so blocks of 8 and chunks of 6 leave a partial last one.
PAIRS, LENGTH = 3, 21


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the error at the scale of the values."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def preference_batch(pairs=PAIRS, length=LENGTH, vocab=TINY.vocab_size, seed=0):
    """Random pairs with prompts, responses and right padding of varying lengths."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (pairs, 2, length)).astype(np.int32)
    mask = np.zeros((pairs, 2, length), np.float32)
    lengths = np.zeros((pairs, 2), np.int32)
    for p in range(pairs):
        for j in range(2):
            prompt = rng.integers(1, 6)
            total = rng.integers(prompt + 2, length + 1)
            mask[p, j, prompt:total] = 1.0
            lengths[p, j] = total
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths)


def loss_and_grads(model, memory: MemoryOptions, batch):
    params, static = eqx.partition(model, eqx.is_array)

    def loss(params):
        return batch_loss(eqx.combine(params, static), *batch, SimpoConfig(), jnp.float32, memory)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, grads


@pytest.fixture(scope="module", params=[True, False], ids=["tied-head", "own-head"])
def model(request):
    arch = ArchitectureConfig(**{**TINY.__dict__, "tie_word_embeddings": request.param})
    # A larger init than HF's 0.02, so attention is far from uniform and the logits far from flat.
    return init_llama(arch, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def plain(model):
    return loss_and_grads(model, PLAIN, preference_batch())


@pytest.mark.parametrize("memory", [
    MemoryOptions(remat="full", attention_block=0, loss_chunk_tokens=0),
    MemoryOptions(remat="dots", attention_block=0, loss_chunk_tokens=0),
    MemoryOptions(remat="none", attention_block=0, loss_chunk_tokens=6),
    MemoryOptions(remat="none", attention_block=0, loss_chunk_tokens=4),   # divides the 20 positions
    MemoryOptions(remat="none", attention_block=8, loss_chunk_tokens=0),
    MemoryOptions(remat="none", attention_block=4, loss_chunk_tokens=0),
    MemoryOptions(remat="none", attention_block=32, loss_chunk_tokens=0),  # longer than the sequence: dense
    MemoryOptions(remat="full", attention_block=8, loss_chunk_tokens=6),
    MemoryOptions(remat="dots", attention_block=4, loss_chunk_tokens=4),
], ids=lambda m: f"{m.remat}-block{m.attention_block}-chunk{m.loss_chunk_tokens}")
def test_memory_options_give_the_plain_loss_and_gradients(model, plain, memory):
    loss, grads = loss_and_grads(model, memory, preference_batch())
    plain_loss, plain_grads = plain
    assert relative_error(loss, plain_loss) < RTOL
    leaves, plain_leaves = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(plain_grads)
    assert len(leaves) == len(plain_leaves)
    for (path, leaf), expected in zip(leaves, plain_leaves):
        assert np.abs(np.asarray(expected)).max() > 0, jax.tree_util.keystr(path)
        error = relative_error(leaf, expected)
        assert error < RTOL, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"


@pytest.mark.parametrize("length,block,heads,kv_heads", [
    (13, 4, 4, 2),    # padded last block, grouped-query attention
    (16, 4, 4, 4),    # whole blocks, multi-head
    (16, 8, 6, 2),    # three queries per key head
    (5, 2, 2, 1),
])
def test_blockwise_attention_equals_dense(length, block, heads, kv_heads):
    """Outputs and the gradients of q, k and v, with positions that start at different offsets per row."""
    keys = jax.random.split(jax.random.key(length + block), 4)
    q = jax.random.normal(keys[0], (3, length, heads, 8))
    k = jax.random.normal(keys[1], (3, length, kv_heads, 8))
    v = jax.random.normal(keys[2], (3, length, kv_heads, 8))
    cotangent = jax.random.normal(keys[3], q.shape)
    positions = jnp.arange(length)[None] + jnp.array([[0], [3], [17]])

    def dense(q, k, v):
        return grouped_query_attention(q, k, v, positions[:, None, :] <= positions[:, :, None])

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, positions, positions, block)

    results = {}
    for name, attention in (("dense", dense), ("blockwise", blockwise)):
        out, vjp = jax.vjp(jax.jit(attention), q, k, v)
        results[name] = (out, *vjp(cotangent))
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["blockwise"], results["dense"]):
        assert relative_error(a, b) < RTOL, name


def test_blockwise_attention_in_bfloat16_tracks_float32():
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (2, 24, 4, 16)) for key in keys)
    k, v = k[:, :, :2], v[:, :, :2]
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    mask = positions[:, None, :] <= positions[:, :, None]
    expected = grouped_query_attention(q, k, v, mask)
    out = blockwise_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), positions, positions, 8)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, expected) < 2e-2


def temporary_bytes(model, memory: MemoryOptions, batch) -> int:
    params, static = eqx.partition(model, eqx.is_array)

    def loss(params):
        return batch_loss(eqx.combine(params, static), *batch, SimpoConfig(), jnp.float32, memory)[0]

    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_each_option_lowers_the_temporary_memory_of_the_step():
    """XLA's own account of the compiled gradient's temporaries (CPU here; `plan` does the same for TPUs)."""
    arch = ArchitectureConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                              num_kv_heads=2)
    model = init_llama(arch, jax.random.key(0))
    batch = preference_batch(pairs=2, length=1024, vocab=arch.vocab_size)
    plain = temporary_bytes(model, PLAIN, batch)
    every = MemoryOptions(remat="full", attention_block=64, loss_chunk_tokens=64)
    assert temporary_bytes(model, MemoryOptions("none", 1024, 1024), batch) == plain  # one block, one chunk
    least = temporary_bytes(model, every, batch)
    # Together: no layer's activations, no [T, T] attention and no [sequences, T, vocab] logits are kept.
    assert least < plain / 10
    # Each option earns its place: without it the peak is higher (the logits matter only once the layers'
    # activations and the attention scores no longer dominate).
    for without in (MemoryOptions(remat="none", attention_block=64, loss_chunk_tokens=64),
                    MemoryOptions(remat="dots", attention_block=64, loss_chunk_tokens=64),
                    MemoryOptions(remat="full", attention_block=0, loss_chunk_tokens=64),
                    MemoryOptions(remat="full", attention_block=64, loss_chunk_tokens=0)):
        assert temporary_bytes(model, without, batch) > 1.2 * least, without


def test_compiled_step_with_every_option_tracks_the_plain_step():
    """Two optimizer steps of the jitted, microbatched step: the first loss within rounding, then the same
    trajectory (AdamW normalises updates, so params are compared at the microbatch test's tolerance)."""
    def run(memory):
        model = init_llama(TINY, jax.random.key(0), std=0.3)
        optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1), 2)
        state = init_state(model, optimizer)
        step = CompiledStep(state, make_mesh(MeshConfig()), optimizer, schedule, SimpoConfig(), "float32", memory)
        arrays = place(eqx.filter(state, eqx.is_array), step.state_shardings)
        history = []
        for seed in range(2):
            tokens, mask, lengths = preference_batch(pairs=4, seed=seed)
            split = lambda x: x.reshape(2, 2, *x.shape[1:])
            arrays, metrics = step(arrays, {"tokens": split(tokens), "loss_mask": split(mask),
                                            "lengths": split(lengths)})
            history.append({name: float(value) for name, value in metrics.items()})
        assert step.compilations == 1
        return history, jax.tree.leaves(arrays)

    # Without `memory`, the step takes the config's defaults for its devices: on CPU, no remat.
    model = init_llama(TINY, jax.random.key(0))
    optimizer, schedule = make_optimizer(OptimizerConfig(), 2)
    default = CompiledStep(init_state(model, optimizer), make_mesh(MeshConfig()), optimizer, schedule, SimpoConfig(),
                           "float32")
    assert default.memory == MemoryOptions("none", 512, 512)

    plain, plain_arrays = run(PLAIN)
    memory, memory_arrays = run(MemoryOptions(remat="full", attention_block=8, loss_chunk_tokens=6))
    for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        assert memory[0][name] == pytest.approx(plain[0][name], rel=RTOL), name
        assert memory[1][name] == pytest.approx(plain[1][name], rel=1e-4), name
    for a, b in zip(memory_arrays, plain_arrays):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_config_knobs_and_defaults(tmp_path):
    config = parse_worker_config(tiny_config(tmp_path, **{"trainer.remat": "dots", "trainer.attention": "blockwise",
                                                          "trainer.attention_block_size": 256,
                                                          "trainer.loss_chunk_tokens": 128}))
    assert MemoryOptions.from_config(config.trainer) == MemoryOptions("dots", 256, 128)
    # Dense attention ignores the block size.
    config = parse_worker_config(tiny_config(tmp_path, **{"trainer.attention": "dense",
                                                          "trainer.attention_block_size": 256}))
    assert MemoryOptions.from_config(config.trainer).attention_block == 0
    # The defaults: remat on accelerators only; sequences up to 512 tokens take the plain path everywhere.
    defaults = MemoryOptions.from_config(parse_worker_config(tiny_config(tmp_path)).trainer)
    assert defaults == MemoryOptions() == MemoryOptions("auto", 512, 512)
    assert defaults.resolve("cpu") == MemoryOptions("none", 512, 512)
    assert defaults.resolve("tpu") == defaults.resolve("gpu") == MemoryOptions("full", 512, 512)
    assert MemoryOptions("dots", 0, 0).resolve("tpu") == MemoryOptions("dots", 0, 0)
    with pytest.raises(ConfigError, match="trainer.remat: must be one of auto, none, full, dots"):
        parse_worker_config(tiny_config(tmp_path, **{"trainer.remat": "some"}))
    with pytest.raises(ConfigError, match="trainer.loss_chunk_tokens"):
        parse_worker_config(tiny_config(tmp_path, **{"trainer.loss_chunk_tokens": -1}))


def test_inference_replica_is_gathered_in_the_compute_dtype(monkeypatch):
    """host_data_parallel: the params reach the replica copy already in bfloat16, and the weights equal the
    float32 model's cast."""
    model = init_llama(TINY, jax.random.key(0))
    copied = []
    local_replica = engine_module.local_replica

    def recording(model, sharding):
        copied.extend(leaf.dtype for leaf in jax.tree.leaves(model))
        return local_replica(model, sharding)

    monkeypatch.setattr(engine_module, "local_replica", recording)
    engine = Engine(TINY, InferenceConfig(max_new_tokens=4, ignore_eos=True), eos_token_ids=[],
                    compute_dtype=jnp.bfloat16)
    weights = engine.placed_weights(model)
    assert copied and set(copied) == {jnp.dtype(jnp.bfloat16)}
    for got, expected in zip(jax.tree.leaves(weights), jax.tree.leaves(decode_weights(model, jnp.bfloat16))):
        assert got.dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(got), np.asarray(expected))


# Sequences of 64 tokens (tiny_config's data.max_seq_len): 63 positions, four attention blocks and four loss chunks.
EVERY_OPTION = {"trainer.remat": "full", "trainer.attention": "blockwise", "trainer.attention_block_size": 16,
                "trainer.loss_chunk_tokens": 16}


def test_trainer_builds_its_step_with_the_configured_options(tmp_path):
    config = parse_worker_config(tiny_config(tmp_path, **EVERY_OPTION))
    trainer = Trainer(config, load_model(config.model), load_tokenizer("smollm2"))
    assert trainer.memory == MemoryOptions("full", 16, 16)


def test_resume_with_every_option_is_bit_identical(tmp_path):
    """The options change how the step computes, not whether it is deterministic: a run stopped after step 3 and
    restarted from its checkpoint ends bit for bit where a straight run does."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    checked(run_worker(tiny_config(straight, **EVERY_OPTION)))
    config = tiny_config(resumed, **EVERY_OPTION)
    checked(run_worker(config, "--stop-at-step", "3"))
    checked(run_worker(config))
    expected, actual = train_records(str(straight)), train_records(str(resumed))
    assert [r["step"] for r in actual] == list(range(1, 8))
    for a, b in zip(expected, actual):
        assert {k: v for k, v in a.items() if k != "step_time"} == {k: v for k, v in b.items() if k != "step_time"}
    want, got = checkpoint_arrays(str(straight), 7), checkpoint_arrays(str(resumed), 7)
    assert want.keys() == got.keys() and len(want) > 10
    for key in want:
        assert np.array_equal(want[key], got[key]), key
