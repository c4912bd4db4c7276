"""Sharded loading across real local host processes: each host holds, and reads, only its share of a model.

An HF checkpoint of ~320M params (1.28 GB of float32 safetensors, random weights, written here) is loaded by the
worker's own code (pretrained.load_model onto the training mesh, then the Trainer, which makes the Adam state under
jit with its shardings) in 2 processes of 1 CPU device each. On CPU a device's buffers are host memory, so each
process's resident set holds exactly its devices' shards. Measured per process from /proc/self/status: VmRSS after
jax.distributed init, the tokenizer and one compiled program (the baseline: what any worker holds before a model),
then VmHWM (the peak resident set since the process started) after loading and after the Trainer; the figures
compared are the peaks minus the baseline. They must stay near the process's share (half) of the params, and of
params + 2 Adam moments, plus a constant, far below the whole model.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import textwrap

import numpy as np
import pytest

from local_hosts import host_envs
from simpo_interleave.host_processes import run_host_processes
from simpo_worker.contract.config import ArchitectureConfig
from simpo_worker.weights.hf_config import config_to_hf
from simpo_worker.weights.hf_load import CONFIG_FILE, WEIGHTS_FILE
from simpo_worker.weights.hf_tensors import hf_tensor_shapes
from worker_runs import preference_files

# 49152 tokens (the smollm2 tokenizer the trainer's data uses), d 1024, 14 layers of 16 heads / 8 KV heads, MLP 4096.
BIG = ArchitectureConfig(vocab_size=49152, hidden_size=1024, intermediate_size=4096, num_layers=14, num_heads=16,
                         num_kv_heads=8, tie_word_embeddings=False, max_position_embeddings=2048)
MB = 1 << 20
# What a process may hold beyond its share: a read chunk and a block of a region in host memory with its device copy
# (32 MiB each: hf_weights.READ_CHUNK_BYTES, mesh.REGION_PIECE_BYTES), the small compiled programs that write the
# blocks in place, and what the C allocator keeps of freed read buffers (about 150 MiB of the ~200 measured).
CONSTANT = 256 * MB


def write_checkpoint(directory, config: ArchitectureConfig, seed: int = 0) -> int:
    """config.json + model.safetensors (float32, random), written a tensor at a time; returns the weight bytes."""
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config_to_hf(config)))
    shapes = hf_tensor_shapes(config)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(directory / WEIGHTS_FILE, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            if len(shape) == 1:
                f.write((1 + 0.1 * rng.standard_normal(shape, np.float32)).tobytes())
            else:
                f.write((0.02 * rng.standard_normal(shape, np.float32)).tobytes())
    return offset


HOST_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from simpo_worker.parallel.distributed import initialize_from_env
    initialize_from_env(120)
    import jax
    import numpy as np
    from simpo_worker.contract.config import parse_worker_config
    from simpo_worker.parallel.mesh import make_mesh
    from simpo_worker.weights.pretrained import load_model
    from simpo_worker.data.tokenizer import load_tokenizer
    from simpo_worker.train.trainer import Trainer

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def held(tree):
        # The bytes of this process's distinct shards (a replica held twice counts twice: it is held twice).
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards)

    out, config = sys.argv[1], parse_worker_config(json.loads(sys.argv[2]))
    tokenizer = load_tokenizer(config.tokenizer)
    mesh = make_mesh(config.trainer.mesh)
    jax.block_until_ready(jax.jit(lambda x: x + 1)(np.ones(8, np.float32)))
    baseline = status("VmRSS")
    model = load_model(config.model, mesh)
    jax.block_until_ready(model)
    loaded = {"peak": status("VmHWM"), "held": held(model)}
    trainer = Trainer(config, model, tokenizer, mesh)
    del model
    jax.block_until_ready(trainer.state)
    state = {"peak": status("VmHWM"), "held": held(trainer.state)}
    with open(f"{out}/host_{jax.process_index()}.json", "w") as f:
        json.dump({"baseline": baseline, "loaded": loaded, "state": state,
                   "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)
""")


@pytest.mark.multiprocess
@pytest.mark.parametrize("mesh", [{"data": 1, "fsdp": 2, "model": 1}, {"data": 1, "fsdp": 1, "model": 2}],
                         ids=["fsdp2", "model2"])
def test_each_host_holds_only_its_share_while_loading(tmp_path_factory, tmp_path, mesh):
    checkpoint = tmp_path_factory.getbasetemp() / "big_llama"
    if not checkpoint.exists():
        write_checkpoint(checkpoint, BIG)
    model_bytes = sum(int(np.prod(shape)) * 4 for shape in hf_tensor_shapes(BIG).values())
    assert model_bytes > 300e6 * 4
    config = {"model": {"source": str(checkpoint)}, "tokenizer": "smollm2",
              "data": {"train_files": [preference_files()], "max_seq_len": 64},
              "trainer": {"num_train_steps": 2, "batch_size": 2, "mesh": mesh},
              "output_dir": str(tmp_path / "run")}
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    log = io.StringIO()
    code = run_host_processes([sys.executable, str(script), str(tmp_path), json.dumps(config)], host_envs(2, 1),
                              timeout_s=600, out=log)
    assert code == 0, log.getvalue()[-6000:]
    share = model_bytes / 2
    report = []
    for host in range(2):
        figures = json.loads((tmp_path / f"host_{host}.json").read_text())
        loaded = figures["loaded"]["peak"] - figures["baseline"]
        state = figures["state"]["peak"] - figures["baseline"]
        report.append(f"host {host}: baseline {figures['baseline'] / MB:.0f} MiB, load +{loaded / MB:.0f} MiB "
                      f"(holds {figures['loaded']['held'] / MB:.0f}), params + Adam +{state / MB:.0f} MiB "
                      f"(holds {figures['state']['held'] / MB:.0f}); whole model {model_bytes / MB:.0f} MiB")
        # Each process holds half of every split weight; only the norms (a few KiB) are whole on both.
        assert share <= figures["loaded"]["held"] < share * 1.01
        assert 3 * share <= figures["state"]["held"] < 3 * share * 1.01
        assert loaded < share + CONSTANT, report[-1]
        assert state < 3 * share + CONSTANT, report[-1]
        # A loader that reads the whole model on each host peaks at model_bytes or more. (share + CONSTANT is
        # 0.71 of this model: a tighter bound here would contradict the constant above.)
        assert loaded < 0.75 * model_bytes, report[-1]
    print("\n".join(report))
