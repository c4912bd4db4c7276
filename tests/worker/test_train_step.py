"""The train step: microbatch accumulation and the device mesh do not change the result (within float
tolerance); the step compiles once; FSDP really shards params and optimizer state."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from simpo_worker.config import ArchitectureConfig, MeshConfig, OptimizerConfig, SimpoConfig, parse_worker_config
from simpo_worker.errors import ConfigError
from simpo_worker.mesh import fsdp_spec, make_mesh, place
from simpo_worker.model import init_llama
from simpo_worker.pretrained import load_model
from simpo_worker.tokenizer import load_tokenizer
from simpo_worker.train_step import CompiledStep, init_state, make_optimizer
from simpo_worker.trainer import Trainer
from worker_runs import checked, checkpoint_arrays, run_worker, straight_run, tiny_config, train_records

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


def test_fsdp_spec_shards_the_largest_divisible_dim():
    assert fsdp_spec((30, 576, 1536), 4) == P(None, None, "fsdp")
    assert fsdp_spec((49152, 576), 4) == P("fsdp", None)
    assert fsdp_spec((30, 9, 7), 4) == P()  # nothing divisible: replicated
    assert fsdp_spec((), 4) == P()
    assert fsdp_spec((49152, 576), 1) == P()
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
    # FSDP: the stored shards are halves of the arrays (embedding [49152, 32] split on its first dim).
    shards = checkpoint_arrays(four, 7)
    assert "process_0000_of_0001.npz/0.0-24576.0-32" in shards
    assert "process_0000_of_0001.npz/0.24576-49152.0-32" in shards
    assembled = np.concatenate([shards["process_0000_of_0001.npz/0.0-24576.0-32"],
                                shards["process_0000_of_0001.npz/0.24576-49152.0-32"]])
    reference = checkpoint_arrays(one, 7)["process_0000_of_0001.npz/0.0-49152.0-32"]
    np.testing.assert_allclose(assembled, reference, rtol=1e-4, atol=1e-6)
    # The 4-device checkpoint restores onto this process's 1-device mesh, bit for bit.
    config = parse_worker_config(tiny_config(four))
    trainer = Trainer(config, load_model(config.model), load_tokenizer("smollm2"))
    assert trainer.restore_latest() == 7 and trainer.step == 7 and trainer.data_position == 7
    assert np.array_equal(np.asarray(trainer.model.embed), assembled)
