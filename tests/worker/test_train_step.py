"""The train step: microbatch accumulation and the device mesh do not change the result (within float
tolerance); the step compiles once; FSDP and the model axis really shard params and optimizer state, each weight
as mesh.PARAM_AXES declares."""


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from simpo_worker.contract.config import (ArchitectureConfig, MeshConfig, OptimizerConfig, SimpoConfig,
                                          parse_worker_config)
from simpo_worker.contract.errors import ConfigError
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.model.layout import param_spec
from simpo_worker.model.llama import init_llama
from simpo_worker.parallel.mesh import make_mesh, place
from simpo_worker.train.step import CompiledStep, init_state, make_optimizer
from simpo_worker.train.trainer import Trainer
from simpo_worker.weights.pretrained import load_model
from worker_runs import (checked, checkpoint_arrays, checkpoint_specs, run_worker, straight_run, tiny_config,
                         train_records)

TINY = ArchitectureConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2)


def random_batch(pairs, length, microbatches, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (pairs, 2, length)).astype(np.int32)
    mask = np.zeros((pairs, 2, length), np.float32)
    lengths = rng.integers(length // 2, length + 1, (pairs, 2)).astype(np.int32)
    for p in range(pairs):
        for j in range(2):
            mask[p, j, 3:lengths[p, j]] = 1.0
    split = lambda x: jnp.asarray(x.reshape(microbatches, pairs // microbatches, *x.shape[1:]))
    return {"tokens": split(tokens), "loss_mask": split(mask), "lengths": split(lengths)}


def train(microbatches, steps=3, compute_dtype="float32"):
    model = init_llama(TINY, jax.random.key(0))
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, weight_decay=0.1),
                                         steps)
    state = init_state(model, optimizer)
    step = CompiledStep(state, make_mesh(MeshConfig()), optimizer, schedule, SimpoConfig(), compute_dtype)
    arrays = place(eqx.filter(state, eqx.is_array), step.state_shardings)
    history = []
    for i in range(steps):
        arrays, metrics = step(arrays, random_batch(8, 16, microbatches, seed=i))
        history.append({name: float(value) for name, value in metrics.items()})
    return history, jax.tree.leaves(arrays), step.compilations


def test_one_or_four_microbatches_give_the_same_step():
    one, params_one, compilations = train(microbatches=1)
    four, params_four, _ = train(microbatches=4)
    assert compilations == 1
    for a, b in zip(one, four):
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), name
    assert one[-1]["loss"] < one[0]["loss"]  # it learns (the same batches, lr 1e-2)
    for a, b in zip(params_one, params_four):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    history32, _, _ = train(microbatches=2, steps=1)
    history16, params16, _ = train(microbatches=2, steps=1, compute_dtype="bfloat16")
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in params16)
    assert history16[0]["loss"] == pytest.approx(history32[0]["loss"], rel=2e-2)


LLAMA3_8B = ArchitectureConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                               num_heads=32, num_kv_heads=8, tie_word_embeddings=False)


def test_each_weight_is_laid_out_as_the_table_declares():
    """Megatron over `model` (heads, MLP units, vocab), FSDP over `fsdp` (the width d), layers and norms whole."""
    c, L, d, f, V = LLAMA3_8B, 32, 4096, 14336, 128256
    mesh = {"data": 1, "fsdp": 4, "model": 4}
    expected = {
        "embed": ((V, d), P("model", "fsdp")),
        "wq": ((L, d, 32 * 128), P(None, "fsdp", "model")),
        "wk": ((L, d, 8 * 128), P(None, "fsdp", "model")),
        "wo": ((L, 32 * 128, d), P(None, "model", "fsdp")),
        "w_gate": ((L, d, f), P(None, "fsdp", "model")),
        "w_down": ((L, f, d), P(None, "model", "fsdp")),
        "attn_norm": ((L, d), P(None, None)),
        "final_norm": ((d,), P(None)),
        "lm_head": ((d, V), P("fsdp", "model")),
    }
    for name, (shape, spec) in expected.items():
        assert param_spec(name, shape, c, mesh) == spec, name
    # Per layer (the decode programs' layout): the same, without the layer axis.
    assert param_spec("wq", (d, 32 * 128), c, mesh) == P("fsdp", "model")
    # Pure FSDP (a v5p-32 as 16 x fsdp): d split 16 ways everywhere, nothing on `model`.
    assert param_spec("w_up", (L, d, f), c, {"data": 1, "fsdp": 16, "model": 1}) == P(None, "fsdp", None)
    # 16-way model axis: 32 query heads split, 8 KV heads cannot be (whole heads only): k/v stay whole on `model`.
    assert param_spec("wk", (L, d, 8 * 128), c, {"model": 16}) == P(None, None, None)
    assert param_spec("wq", (L, d, 32 * 128), c, {"model": 16}) == P(None, None, "model")
    # SmolLM2's 9 heads on a 2-way model axis: whole; its 1536 MLP units and 49152-token vocab split.
    smol = ArchitectureConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                              num_heads=9, num_kv_heads=3)
    assert param_spec("wq", (30, 576, 576), smol, {"model": 2}) == P(None, None, None)
    assert param_spec("w_gate", (30, 576, 1536), smol, {"model": 2}) == P(None, None, "model")
    assert param_spec("embed", (49152, 576), smol, {"model": 2}) == P("model", None)
    # An axis the mesh lacks (a host's local data x model mesh has no fsdp) splits nothing.
    assert param_spec("wo", (L, 32 * 128, d), c, {"data": 2, "model": 2}) == P(None, "model", None)
    assert MeshConfig(data=-1, fsdp=2).resolve(8) == (4, 2, 1)
    with pytest.raises(ConfigError, match="trainer.mesh: data x fsdp x model = \\[2, 2, 1\\] needs 4 devices"):
        MeshConfig(data=2, fsdp=2).resolve(8)


def test_four_devices_fsdp_matches_one_device(tmp_path):
    """The same run on a 2 x 2 (data x fsdp) mesh of 4 CPU devices as on 1 device: same losses and params."""
    one = straight_run()
    four = tmp_path / "four"
    checked(run_worker(tiny_config(four, **{"trainer.mesh": {"data": -1, "fsdp": 2}}), devices=4))
    for a, b in zip(train_records(one), train_records(four)):
        for name in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "tokens"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), (a["step"], name)
    assert train_records(four)[-1]["train_step_compilations"] == 1
    # FSDP: the embedding [49152, 32] was saved from halves split on the width d.
    assert checkpoint_specs(four, 7)["model_embed"] == (None, "fsdp")
    assembled = checkpoint_arrays(four, 7)["model_embed"]
    reference = checkpoint_arrays(one, 7)["model_embed"]
    np.testing.assert_allclose(assembled, reference, rtol=1e-4, atol=1e-6)
    # The 4-device checkpoint restores onto this process's 1-device mesh, bit for bit.
    config = parse_worker_config(tiny_config(four))
    trainer = Trainer(config, load_model(config.model), load_tokenizer("smollm2"))
    assert trainer.restore_latest() == 7 and trainer.step == 7 and trainer.data_position == 7
    assert np.array_equal(np.asarray(trainer.model.embed), assembled)


@pytest.mark.parametrize("mesh", [{"data": 1, "fsdp": 2, "model": 2}, {"data": 1, "fsdp": 1, "model": 4}],
                         ids=["fsdp2-model2", "model4"])
def test_model_axis_matches_one_device(tmp_path, mesh):
    """Tensor parallelism on 4 CPU devices trains as one device does: the same metrics at every step (gradient
    norm included), and the same params and Adam moments after 7 steps, within float reassociation."""
    one = straight_run()
    run = tmp_path / "tp"
    checked(run_worker(tiny_config(run, **{"trainer.mesh": mesh}), devices=4))
    for a, b in zip(train_records(one), train_records(run), strict=True):
        for name in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "tokens"):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (a["step"], name)
    assert train_records(run)[-1]["train_step_compilations"] == 1
    reference, ours = checkpoint_arrays(one, 7), checkpoint_arrays(run, 7)
    assert reference.keys() == ours.keys() and len(reference) > 20  # params, both Adam moments, counts, step
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], rtol=2e-5, atol=1e-7, err_msg=name)
    # Really split: wq ([L, d, heads * head_dim]) was saved split on the model axis (whole heads), d on fsdp.
    assert checkpoint_specs(run, 7)["model_layers_wq"] == (None, "fsdp" if mesh["fsdp"] > 1 else None, "model")
