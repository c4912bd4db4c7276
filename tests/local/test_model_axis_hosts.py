"""The model axis across real local host processes (2 hosts x 2 CPU devices): training with params split over
fsdp (across hosts) and model (within a host) runs and resumes like one device, and inference from those params
gives the single-device completions in both placements (host_data_parallel: each host all-gathers the replica
onto its own data x model mesh, tensor_parallel 2)."""

from __future__ import annotations

import io
import json
import sys
import textwrap

import pytest

from local_hosts import host_envs, run_workers
from model_goldens import TINY_LLAMA_DIR
from simpo_interleave.host_processes import run_host_processes
from simpo_worker.contract.config import InferenceConfig
from simpo_worker.infer.engine import Engine
from simpo_worker.weights.hf_load import load_hf_model
from worker_runs import assert_steps_match_straight_run, checked, tiny_config

MESH = {"data": 1, "fsdp": 2, "model": 2}
SAMPLED = {"temperature": 0.9, "top_k": 50, "top_p": 0.95}

HOST_SCRIPT = textwrap.dedent("""
    import json, sys
    from simpo_worker.parallel.distributed import initialize_from_env
    initialize_from_env(60)
    import jax
    from simpo_worker.contract.config import InferenceConfig, MeshConfig
    from simpo_worker.infer.engine import Engine
    from simpo_worker.parallel.mesh import make_mesh
    from simpo_worker.weights.pretrained import load_pretrained
    from simpo_worker.data.prompts import host_shard

    out_dir, model_dir, mesh, settings, prompts = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
    mesh = make_mesh(MeshConfig(**mesh))
    model = load_pretrained(model_dir, mesh)  # loaded sharded, as the worker does
    assert not model.layers.wq.is_fully_addressable  # split across the hosts
    engine = Engine(model.config, InferenceConfig(**settings), eos_token_ids=[2], mesh=mesh)
    if settings.get("mode") == "global_mesh":
        indices = list(range(len(prompts)))
    else:
        indices = list(host_shard(len(prompts), jax.process_index(), jax.process_count()))
    completions = engine.generate(model, [prompts[i] for i in indices], indices, step=4, seed=11)
    with open(f"{out_dir}/host_{jax.process_index()}.json", "w") as f:
        json.dump({c.global_prompt_index: c.token_ids for c in completions}, f)
""")


def generate_on_hosts(tmp_path, name: str, settings: dict, prompts) -> dict[int, list[int]]:
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    log = io.StringIO()
    code = run_host_processes([sys.executable, str(script), str(out), str(TINY_LLAMA_DIR), json.dumps(MESH),
                               json.dumps(settings), json.dumps(prompts)], host_envs(2, 2), timeout_s=300, out=log)
    assert code == 0, log.getvalue()[-6000:]
    merged = {}
    for host in range(2):
        for index, tokens in json.loads((out / f"host_{host}.json").read_text()).items():
            if settings.get("mode") == "global_mesh":
                assert merged.setdefault(int(index), tokens) == tokens  # every host holds every completion
            else:
                assert int(index) not in merged
                merged[int(index)] = tokens
    return merged


@pytest.mark.multiprocess
def test_model_axis_inference_on_hosts_matches_one_device(tmp_path):
    prompts = [[(7 * i + 13 * j) % 253 + 3 for j in range(n)] for i, n in enumerate([4, 9, 30, 12, 7, 19, 3, 25])]
    settings = {"max_new_tokens": 20, "max_prompt_len": 32, "batch_size": 4, **SAMPLED}
    model = load_hf_model(str(TINY_LLAMA_DIR))
    one = Engine(model.config, InferenceConfig(**settings), eos_token_ids=[2]).generate(
        model, prompts, list(range(len(prompts))), step=4, seed=11)
    expected = {c.global_prompt_index: c.token_ids for c in one}
    assert generate_on_hosts(tmp_path, "host_tp2", {**settings, "tensor_parallel": 2}, prompts) == expected
    assert generate_on_hosts(tmp_path, "global", {**settings, "mode": "global_mesh"}, prompts) == expected


@pytest.mark.multiprocess
def test_model_axis_training_on_hosts_resumes_like_one_device(tmp_path):
    """fsdp 2 (across the hosts) x model 2 (within each): stopped at step 3 and restarted, it matches the
    1-device run."""
    out = tmp_path / "tp"
    config = tiny_config(out, **{"trainer.mesh": MESH})
    for result in run_workers(config, 2, 2, "--stop-at-step", "3"):
        checked(result)
    for result in run_workers(config, 2, 2):
        checked(result)
        assert "training from step 3 to 7" in result.stderr
    assert_steps_match_straight_run(out, rel=1e-5, abs_tol=1e-6)
