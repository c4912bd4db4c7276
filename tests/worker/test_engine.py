"""The inference engine: greedy parity with HF transformers `generate` (goldens from
tests/goldens/make_generate_goldens.py), stop/length accounting, up-front limits, compile reuse, and the same
completions whatever the batch size or the prompt order (the number of hosts: tests/local/test_engine_hosts.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from model_goldens import GOLDENS, TINY_LLAMA_DIR
from simpo_worker.contract.config import InferenceConfig
from simpo_worker.contract.errors import DataError
from simpo_worker.infer.engine import Completion, Engine
from simpo_worker.weights.hf_load import load_hf_model
from simpo_worker.weights.pretrained import load_pretrained

# A divergence from HF is accepted only where HF's top two logits are this close (a float tie).
TIE_MARGIN = 1e-4
SAMPLED = {"temperature": 0.9, "top_k": 50, "top_p": 0.95}


def generate_golden(case: str) -> dict:
    path = GOLDENS / "generate_goldens.json"
    if not path.is_file():
        pytest.fail(f"missing golden {path}: regenerate with `.venv/bin/python tests/goldens/make_generate_goldens.py`")
    return json.loads(path.read_text())[case]


@pytest.fixture(scope="module")
def tiny():
    return load_hf_model(str(TINY_LLAMA_DIR))


def engine_for(model, eos=(2,), **inference) -> Engine:
    settings = {"max_new_tokens": 24, "max_prompt_len": 64, "batch_size": 4, **inference}
    return Engine(model.config, InferenceConfig(**settings), eos_token_ids=list(eos))


def prompts_of(lengths: list[int], vocab: int, salt: int = 0) -> list[list[int]]:
    return [[(7 * i + 13 * j + salt) % (vocab - 3) + 3 for j in range(n)] for i, n in enumerate(lengths)]


def assert_matches_hf(completions, golden: dict) -> None:
    """Token for token, except after a step where HF itself was at a near-tie between its top two tokens."""
    assert [c.global_prompt_index for c in completions] == list(range(len(golden["prompts"])))
    for completion, expected, margins in zip(completions, golden["completions"], golden["margins"]):
        ours = completion.token_ids
        diverged = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
        if diverged is None:
            assert ours == expected, f"prompt {completion.global_prompt_index}: lengths {len(ours)} vs HF {len(expected)}"
        else:
            assert margins[diverged] < TIE_MARGIN, (
                f"prompt {completion.global_prompt_index} diverges from HF at token {diverged} where HF's top-2 "
                f"margin is {margins[diverged]:.3e} (not a tie)")


def check_finish(completions, eos: list[int], max_new: int) -> None:
    for c in completions:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in eos and not set(c.token_ids[:-1]) & set(eos)
            assert len(c.token_ids) <= max_new
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == max_new
            assert not set(c.token_ids) & set(eos)


def test_missing_golden_is_a_failure_not_a_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "GOLDENS", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="missing golden"):
        generate_golden("tiny")


@pytest.mark.parametrize("case", ["tiny", "smollm2"])
def test_greedy_batch_equals_hf_generate(case, tiny):
    golden = generate_golden(case)
    model = tiny if case == "tiny" else load_pretrained("smollm2")
    max_new = golden["max_new_tokens"]
    engine = engine_for(model, eos=golden["eos_token_ids"], max_new_tokens=max_new, batch_size=4)
    prompts = golden["prompts"]
    assert len({len(p) for p in prompts}) == len(prompts)  # one batch of different lengths
    completions = engine.generate(model, prompts, list(range(len(prompts))), step=0, seed=0)
    assert_matches_hf(completions, golden)
    # The golden holds an early stop while the others run to the limit; our accounting must say so.
    reasons = [c.finish_reason for c in completions]
    assert "stop" in reasons and "length" in reasons and max_new >= 64
    check_finish(completions, golden["eos_token_ids"], max_new)
    assert engine.compilations == 2  # one prefill and one decode program; the window bucket covers 72 tokens


def test_bfloat16_decode_agrees_with_the_models_own_forward():
    """In bfloat16 (trainer.compute_dtype on TPU) there is no HF golden; the anchor is the model's full-sequence
    forward in bfloat16, teacher-forced on the engine's own output: each greedy token must be that forward's
    argmax, or within bfloat16 rounding of it (0.125 is one bfloat16 step at SmolLM2's logit scale, 16-32)."""
    model = load_pretrained("smollm2")
    golden = generate_golden("smollm2")
    prompts, max_new = golden["prompts"], 48
    engine = Engine(model.config, InferenceConfig(max_new_tokens=max_new, max_prompt_len=64, batch_size=4,
                                                  ignore_eos=True), eos_token_ids=[], compute_dtype=jnp.bfloat16)
    completions = engine.generate(model, prompts, list(range(len(prompts))), step=0, seed=0)
    exact = checked = 0
    for prompt, completion in zip(prompts, completions):
        tokens = np.array([prompt + completion.token_ids[:-1]])
        logits = np.asarray(model(tokens, np.arange(tokens.shape[1])[None], jnp.bfloat16))[0, len(prompt) - 1:]
        chosen = logits[np.arange(max_new), completion.token_ids]
        gap = logits.max(axis=-1) - chosen
        assert gap.max() <= 0.25, f"prompt {completion.global_prompt_index}: token off the argmax by {gap.max()}"
        exact += int((gap == 0).sum())
        checked += max_new
    assert exact >= 0.9 * checked, f"only {exact} of {checked} tokens are the forward's exact argmax"


def test_ignore_eos_generates_exactly_max_new_tokens(tiny):
    golden = generate_golden("tiny")
    prompts = golden["prompts"]
    engine = engine_for(tiny, eos=golden["eos_token_ids"], max_new_tokens=golden["max_new_tokens"],
                        ignore_eos=True)
    completions = engine.generate(tiny, prompts, list(range(len(prompts))), step=0, seed=0)
    assert [c.finish_reason for c in completions] == ["length"] * len(prompts)
    assert all(len(c.token_ids) == golden["max_new_tokens"] for c in completions)
    slots = 1 << (len(prompts) - 1).bit_length()  # the batch bucket: empty slots are run too
    assert engine.row_steps == slots * golden["max_new_tokens"]
    stopped = golden["completions"][0]
    # The prompt that stopped early runs on through its EOS token, and agrees with HF up to there.
    assert completions[0].token_ids[:len(stopped)] == stopped and len(stopped) < golden["max_new_tokens"]


def test_request_too_large_for_the_cache_fails_before_any_work(tiny):
    engine = engine_for(tiny, max_prompt_len=16, max_new_tokens=24)
    prompts = prompts_of([5, 17], tiny.config.vocab_size)
    with pytest.raises(DataError, match=r"prompt 41: 17 tokens \+ max_new_tokens 24 = 41 does not fit the KV cache "
                                        r"of 40 tokens \(inference.max_prompt_len 16 \+ inference.max_new_tokens 24\)"):
        engine.generate(tiny, prompts, [40, 41], step=0, seed=0)
    long = engine_for(tiny, max_prompt_len=500, max_new_tokens=100)
    with pytest.raises(DataError, match="exceeds the model's max_position_embeddings 512"):
        long.generate(tiny, prompts_of([450], tiny.config.vocab_size), [0], step=0, seed=0)
    with pytest.raises(DataError, match="prompt 3: empty"):
        engine.generate(tiny, [[]], [3], step=0, seed=0)
    assert engine.compilations == 0 and long.compilations == 0


def test_second_call_with_the_same_shapes_compiles_nothing(tiny):
    engine = engine_for(tiny, max_new_tokens=40, **SAMPLED)
    prompts = prompts_of([4, 9, 30, 12, 7], tiny.config.vocab_size)
    first = engine.generate(tiny, prompts, list(range(5)), step=3, seed=1)
    compiled = engine.compilations
    # Waves of 4 and 1 slots: a prefill and a decode program each.
    assert compiled == 4
    # Different prompts of lengths in the same buckets: no new program.
    again = engine.generate(tiny, prompts_of([6, 9, 25, 3, 12], tiny.config.vocab_size, salt=5), list(range(5)),
                            step=3, seed=1)
    assert engine.compilations == compiled
    assert len(again) == len(first) == 5


def test_completions_do_not_depend_on_batch_size_or_slot(tiny):
    prompts = prompts_of([4, 9, 30, 12, 7, 19], tiny.config.vocab_size)
    indices = [10, 11, 12, 13, 14, 15]
    for sampling in ({}, SAMPLED):
        results = []
        for batch_size in (1, 2, 8):
            engine = engine_for(tiny, batch_size=batch_size, **sampling)
            results.append({c.global_prompt_index: c.token_ids for c in
                            engine.generate(tiny, prompts, indices, step=2, seed=7)})
        # Reversed order puts every prompt in another slot.
        reversed_run = engine_for(tiny, batch_size=4, **sampling).generate(tiny, prompts[::-1], indices[::-1],
                                                                            step=2, seed=7)
        results.append({c.global_prompt_index: c.token_ids for c in reversed_run})
        assert all(result == results[0] for result in results[1:]), sampling


def test_finished_rows_are_compacted_away_without_changing_results(tiny):
    """Rows that stop early leave the batch mid-wave; every completion is what batch size 1 gives."""
    eos = list(range(3, 9))  # frequent enough that most rows stop within the first chunks
    prompts = prompts_of([5, 8, 13, 21, 6, 9, 17, 11], tiny.config.vocab_size)
    indices = list(range(8))
    settings = {"max_new_tokens": 300, "temperature": 1.0, "max_prompt_len": 32}
    wide = engine_for(tiny, eos=eos, batch_size=8, **settings)
    compacted = wide.generate(tiny, prompts, indices, step=1, seed=5)
    assert wide.compactions >= 1
    check_finish(compacted, eos, 300)
    lengths = sorted(len(c.token_ids) for c in compacted)
    assert lengths[0] < 64 < lengths[-1]  # some rows ended in the first chunk, one decoded on after compaction
    # Compaction is what keeps the work below a full batch for the whole wave.
    assert sum(lengths) <= wide.row_steps < 8 * lengths[-1]
    one_by_one = engine_for(tiny, eos=eos, batch_size=1, **settings).generate(tiny, prompts, indices, step=1, seed=5)
    assert [(c.global_prompt_index, c.token_ids, c.finish_reason) for c in compacted] == \
        [(c.global_prompt_index, c.token_ids, c.finish_reason) for c in one_by_one]


def test_sampling_keys_follow_seed_step_and_global_index(tiny):
    engine = engine_for(tiny, max_new_tokens=16, **SAMPLED)
    prompt = prompts_of([9], tiny.config.vocab_size)
    run = lambda index, step, seed: engine.generate(tiny, prompt, [index], step=step, seed=seed)[0].token_ids
    base = run(0, 0, 0)
    assert run(0, 0, 0) == base
    # Same prompt, another global index / step / seed: another draw.
    assert run(1, 0, 0) != base and run(0, 1, 0) != base and run(0, 0, 1) != base
    greedy = engine_for(tiny, max_new_tokens=16)
    assert greedy.generate(tiny, prompt, [0], step=0, seed=0)[0].token_ids != base


def test_top_k_one_is_greedy(tiny):
    prompts = prompts_of([5, 11], tiny.config.vocab_size)
    greedy = engine_for(tiny).generate(tiny, prompts, [0, 1], step=0, seed=0)
    top1 = engine_for(tiny, temperature=1.5, top_k=1).generate(tiny, prompts, [0, 1], step=0, seed=0)
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]


# ---- the model axis -----------------------------------------------------------------------------------------

MODEL_AXIS_SCRIPT = """
import json, sys
from simpo_worker.contract.config import InferenceConfig, MeshConfig
from simpo_worker.infer.engine import Engine
from simpo_worker.parallel.mesh import make_mesh
from simpo_worker.weights.pretrained import load_pretrained

source, mesh, cases = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
mesh = make_mesh(MeshConfig(**mesh))
model = load_pretrained(source, mesh)  # the params as training holds them: fsdp x model over every device
results = {}
for name, case in cases.items():
    engine = Engine(model.config, InferenceConfig(**case["settings"]), eos_token_ids=case["eos"], mesh=mesh)
    completions = engine.generate(model, case["prompts"], list(range(len(case["prompts"]))), step=3, seed=1)
    wq = engine.placed_weights(model).layers[0].wq
    results[name] = {"tokens": [c.token_ids for c in completions],
                     "reasons": [c.finish_reason for c in completions],
                     "wq_shards": sorted({tuple(s.data.shape) for s in wq.addressable_shards}),
                     "engine_mesh": dict(engine.mesh.shape)}
print("RESULTS " + json.dumps(results))
"""


def run_model_axis(source: str, devices: int, mesh: dict, cases: dict) -> dict:
    """The cases on `devices` CPU devices (a fresh process: the device count is fixed when jax starts)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    result = subprocess.run([sys.executable, "-c", MODEL_AXIS_SCRIPT, source, json.dumps(mesh), json.dumps(cases)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def test_model_axis_generates_as_one_device_and_as_hf(tiny):
    """4 CPU devices, the params on a training mesh of fsdp 2 x model 2 (loaded sharded): greedy decoding in both
    placements matches HF's goldens and, like sampled decoding, gives the tokens of the replicated 1-device run.
    host_data_parallel runs on a local data x model mesh of tensor_parallel 2 (heads split) and 4 (the 2 KV heads
    cannot split 4 ways: k/v stay whole, the rest splits)."""
    golden = generate_golden("tiny")
    greedy = {"max_new_tokens": golden["max_new_tokens"], "max_prompt_len": 64, "batch_size": 4}
    sampled_prompts = prompts_of([4, 9, 30, 12, 7, 19, 3, 25], tiny.config.vocab_size)
    sampled = {"max_new_tokens": 20, "max_prompt_len": 32, "batch_size": 4, **SAMPLED}
    cases = {}
    for placement, extra in {"host_tp2": {"tensor_parallel": 2}, "host_tp4": {"tensor_parallel": 4},
                             "global": {"mode": "global_mesh"}}.items():
        cases[f"greedy_{placement}"] = {"settings": {**greedy, **extra}, "eos": golden["eos_token_ids"],
                                        "prompts": golden["prompts"]}
        cases[f"sampled_{placement}"] = {"settings": {**sampled, **extra}, "eos": [2], "prompts": sampled_prompts}
    results = run_model_axis(str(TINY_LLAMA_DIR), 4, {"data": 1, "fsdp": 2, "model": 2}, cases)

    one_device = {
        "greedy": engine_for(tiny, eos=golden["eos_token_ids"], **greedy).generate(
            tiny, golden["prompts"], list(range(len(golden["prompts"]))), step=3, seed=1),
        "sampled": engine_for(tiny, **sampled).generate(
            tiny, sampled_prompts, list(range(len(sampled_prompts))), step=3, seed=1)}
    for name, result in results.items():
        expected = one_device[name.split("_")[0]]
        assert result["tokens"] == [c.token_ids for c in expected], name
        assert result["reasons"] == [c.finish_reason for c in expected], name
        if name.startswith("greedy"):
            completions = [Completion(i, tokens, reason)
                           for i, (tokens, reason) in enumerate(zip(result["tokens"], result["reasons"]))]
            assert_matches_hf(completions, golden)
    # wq [d 64, 4 heads x 24]: split by whole heads over `model`, and over `fsdp` (d) on the global mesh.
    assert results["greedy_host_tp2"]["engine_mesh"] == {"data": 2, "model": 2}
    assert results["greedy_host_tp2"]["wq_shards"] == [[64, 48]]
    assert results["greedy_host_tp4"]["engine_mesh"] == {"data": 1, "model": 4}
    assert results["greedy_host_tp4"]["wq_shards"] == [[64, 24]]
    assert results["greedy_global"]["wq_shards"] == [[32, 48]]


def test_model_axis_smollm2_greedy_equals_hf():
    """SmolLM2 (9 heads, 3 KV heads, 1536 MLP units, vocab 49152) on a 3-way model axis, every one of them split:
    greedy decoding still matches HF's goldens in both placements."""
    golden = generate_golden("smollm2")
    greedy = {"max_new_tokens": golden["max_new_tokens"], "max_prompt_len": 64, "batch_size": 4}
    cases = {placement: {"settings": {**greedy, **extra}, "eos": golden["eos_token_ids"],
                         "prompts": golden["prompts"]}
             for placement, extra in {"host": {"tensor_parallel": 3}, "global": {"mode": "global_mesh"}}.items()}
    results = run_model_axis("smollm2", 3, {"data": 1, "fsdp": 1, "model": 3}, cases)
    for name, result in results.items():
        completions = [Completion(i, tokens, reason)
                       for i, (tokens, reason) in enumerate(zip(result["tokens"], result["reasons"]))]
        assert_matches_hf(completions, golden)
        check_finish(completions, golden["eos_token_ids"], golden["max_new_tokens"])
        assert result["wq_shards"] == [[576, 192]], name  # 3 of the 9 heads (64 each) per device
