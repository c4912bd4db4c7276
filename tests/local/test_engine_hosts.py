"""The inference engine across real local host processes: the same completions on 1, 2 or 4 hosts, with one or two
devices per host, in both placements, from params FSDP-sharded the way training holds them, with stop strings,
and for long generations whose batches compact and whose attention windows grow."""

from __future__ import annotations

import io
import json
import sys
import textwrap

import pytest

from local_hosts import host_envs
from model_goldens import TINY_LLAMA_DIR
from simpo_interleave.host_processes import run_host_processes
from simpo_worker.contract.config import InferenceConfig
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.infer.engine import Engine
from simpo_worker.weights.hf_load import load_hf_model

SAMPLED = {"temperature": 0.9, "top_k": 50, "top_p": 0.95}


def prompts_of(lengths: list[int], vocab: int, salt: int = 0) -> list[list[int]]:
    return [[(7 * i + 13 * j + salt) % (vocab - 3) + 3 for j in range(n)] for i, n in enumerate(lengths)]


HOST_SCRIPT = textwrap.dedent("""
    import json, sys
    from simpo_worker.parallel.distributed import initialize_from_env
    initialize_from_env(60)
    import jax
    from simpo_worker.contract.config import InferenceConfig, MeshConfig
    from simpo_worker.infer.engine import Engine
    from simpo_worker.weights.hf_load import load_hf_model
    from simpo_worker.parallel.mesh import make_mesh, place, state_shardings
    from simpo_worker.data.prompts import host_shard
    from simpo_worker.data.tokenizer import load_tokenizer

    mode, out_dir, model_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    settings = json.loads(sys.argv[4])
    prompts = json.loads(sys.argv[5])
    eos = json.loads(sys.argv[6])
    model = load_hf_model(model_dir)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    # The params as training holds them: FSDP-sharded over every device of every host.
    model = place(model, state_shardings(model, mesh))
    tokenizer = load_tokenizer("smollm2") if settings.get("stop_tokens") else None
    engine = Engine(model.config, InferenceConfig(mode=mode, **settings), eos_token_ids=eos, mesh=mesh,
                    tokenizer=tokenizer)
    if mode == "global_mesh":
        indices = list(range(len(prompts)))
    else:
        indices = list(host_shard(len(prompts), jax.process_index(), jax.process_count()))
    done = []
    completions = engine.generate(model, [prompts[i] for i in indices], indices, step=4, seed=11,
                                  progress=lambda prompts_done, tokens: done.append(prompts_done))
    assert done[-1:] == ([len(indices)] if indices else []), done
    with open(f"{out_dir}/host_{jax.process_index()}.json", "w") as f:
        json.dump({c.global_prompt_index: [c.token_ids, c.finish_reason, c.text] for c in completions}, f)
    with open(f"{out_dir}/engine_{jax.process_index()}.json", "w") as f:
        json.dump({"compactions": engine.compactions, "window_growths": engine.window_growths}, f)
""")


def host_dir(tmp_path, mode: str, hosts: int, devices_per_host: int):
    return tmp_path / f"{mode}_{hosts}x{devices_per_host}"


def run_hosts(tmp_path, mode: str, hosts: int, devices_per_host: int, settings: dict, prompts,
              eos: tuple[int, ...] = (2,)) -> dict:
    out = host_dir(tmp_path, mode, hosts, devices_per_host)
    out.mkdir()
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    envs = host_envs(hosts, devices_per_host)
    log = io.StringIO()
    code = run_host_processes([sys.executable, str(script), mode, str(out), str(TINY_LLAMA_DIR),
                               json.dumps(settings), json.dumps(prompts), json.dumps(list(eos))], envs,
                              timeout_s=300, out=log)
    assert code == 0, log.getvalue()[-6000:]
    per_host = [json.loads((out / f"host_{i}.json").read_text()) for i in range(hosts)]
    if mode == "global_mesh":
        assert all(result == per_host[0] for result in per_host)  # every host holds every completion
        return per_host[0]
    merged = {}
    for result in per_host:
        assert not set(result) & set(merged)
        merged.update(result)
    return merged


@pytest.mark.multiprocess
def test_fewer_prompts_than_hosts_with_sharded_params(tmp_path):
    """A host with no prompts still joins the params gather (it used to return first and hang the others)."""
    # One prompt on two hosts: the params are FSDP-sharded over both (each dim divisible by 2), host 1 has none.
    prompts = prompts_of([6], 256)
    settings = {"max_new_tokens": 8, "max_prompt_len": 16, "batch_size": 2, **SAMPLED}
    one = run_hosts(tmp_path, "host_data_parallel", 1, 1, settings, prompts)
    assert run_hosts(tmp_path, "host_data_parallel", 2, 1, settings, prompts) == one


@pytest.mark.multiprocess
def test_same_completions_on_1_2_4_hosts_and_both_placements(tmp_path):
    prompts = prompts_of([4, 9, 30, 12, 7, 19, 3, 25, 14], 256)
    settings = {"max_new_tokens": 20, "max_prompt_len": 32, "batch_size": 2, **SAMPLED}
    one = run_hosts(tmp_path, "host_data_parallel", 1, 1, settings, prompts)
    assert sorted(map(int, one)) == list(range(len(prompts)))
    assert run_hosts(tmp_path, "host_data_parallel", 2, 1, settings, prompts) == one
    assert run_hosts(tmp_path, "host_data_parallel", 4, 1, settings, prompts) == one
    # Two local devices per host: the replica's batch is split over them.
    assert run_hosts(tmp_path, "host_data_parallel", 2, 2, settings, prompts) == one
    assert run_hosts(tmp_path, "global_mesh", 2, 1, settings, prompts) == one


@pytest.mark.multiprocess
def test_stop_strings_end_the_same_rows_on_every_host(tmp_path):
    """Stop strings are matched on the host, between chunks: in global_mesh mode every host must end the same rows
    at the same token (or their programs part ways). 2 hosts against one process, the tiny model's sampled tokens
    read as SmolLM2 text."""
    model, tokenizer = load_hf_model(str(TINY_LLAMA_DIR)), load_tokenizer("smollm2")
    prompts = prompts_of([4, 9, 30, 12, 7, 19], 256)
    settings = {"max_new_tokens": 20, "max_prompt_len": 32, "batch_size": 4, **SAMPLED}

    def one_process(stop_tokens: list[str]) -> dict:
        engine = Engine(model.config, InferenceConfig(**settings, stop_tokens=stop_tokens), eos_token_ids=[2],
                        tokenizer=tokenizer)
        completions = engine.generate(model, prompts, list(range(len(prompts))), step=4, seed=11)
        return {str(c.global_prompt_index): [c.token_ids, c.finish_reason, c.text] for c in completions}

    plain = one_process([])
    # Two printable ASCII characters from the second half of two completions' texts.
    stops = [next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1)
                  if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
             for text in (plain["0"][2], plain["1"][2])]
    stopped = one_process(stops)
    for row, (token_ids, reason, text) in stopped.items():
        assert plain[row][0][:len(token_ids)] == token_ids
        assert (reason, text) == (plain[row][1], plain[row][2]) or (reason == "stop" and text.endswith(tuple(stops)))
    assert stopped["0"][2] != plain["0"][2] and stopped["1"][2] != plain["1"][2]
    assert run_hosts(tmp_path, "global_mesh", 2, 1, {**settings, "stop_tokens": stops}, prompts) == stopped


def engine_counts(tmp_path, mode: str, hosts: int, devices_per_host: int) -> list[dict]:
    """Each host's engine counters (compactions, window growths) of a `run_hosts` run."""
    out = host_dir(tmp_path, mode, hosts, devices_per_host)
    return [json.loads((out / f"engine_{i}.json").read_text()) for i in range(hosts)]


@pytest.mark.multiprocess
def test_long_generation_compacts_and_grows_the_window_on_every_host(tmp_path):
    """Rows stop at different times (frequent stop ids, as tests/worker/test_engine.py forces compaction), the
    survivors decode on past the first window: every host compacts its batch and grows its cache mid-wave, and
    the completions are still one host's."""
    eos = tuple(range(3, 9))
    prompts = prompts_of([5, 8, 13, 21, 6, 9, 17, 11, 4, 30, 12, 7, 19, 3, 25, 14], 256)
    settings = {"max_new_tokens": 300, "max_prompt_len": 32, "batch_size": 8, "temperature": 1.0}
    one = run_hosts(tmp_path, "host_data_parallel", 1, 1, settings, prompts, eos)
    lengths = sorted(len(tokens) for tokens, *_ in one.values())
    assert lengths[0] < 64 < lengths[-1]  # some rows end in the first chunk, some decode on past it
    for mode in ("host_data_parallel", "global_mesh"):
        assert run_hosts(tmp_path, mode, 2, 1, settings, prompts, eos) == one, mode
        for counts in engine_counts(tmp_path, mode, 2, 1):
            assert counts["compactions"] > 0 and counts["window_growths"] > 0, (mode, counts)
