"""Hugging Face export (export.hf_dir): transformers' file layout (sharded safetensors + index, config.json last,
the tokenizer's files), the gather in pieces, the config's checks, and a real worker run on a sharded mesh whose
copies load back through our own loader with logits exactly those of the live params. (transformers itself loads
the copies in tests/goldens/check_hf_export.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from simpo_worker.contract.config import ArchitectureConfig, ExportConfig, RopeScaling, parse_worker_config
from simpo_worker.contract.errors import ConfigError
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.model.llama import init_llama
from simpo_worker.weights import export
from simpo_worker.weights.export import export_hf, tokenizer_files
from simpo_worker.weights.hf_load import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
from simpo_worker.weights.hf_save import save_hf_model
from simpo_worker.weights.hf_tensors import hf_tensor_shapes
from simpo_worker.weights.pretrained import load_pretrained
from ultrafeedback import ultrafeedback_row, write_parquet
from worker_runs import assert_same_model, checked, live_params, run_worker, tiny_config

TOKENIZER_HF_DIR = Path(__file__).parents[1] / "goldens" / "tokenizer_smollm2_hf"
TINY = ArchitectureConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                          num_kv_heads=2, head_dim=12, rope_theta=5000.0,
                          rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32),
                          tie_word_embeddings=False, max_position_embeddings=128, bos_token_id=1,
                          eos_token_ids=[2, 3])


def test_shards_index_and_config_as_transformers_writes_them(tmp_path):
    model = init_llama(TINY, jax.random.key(0))
    shapes = hf_tensor_shapes(TINY)
    # The embedding (96 x 32 float32 = 12288 bytes) and the head are larger than a shard: a file each.
    save_hf_model(model, str(tmp_path), max_shard_bytes=10_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted({*index["weight_map"].values()})
    count = len(files)
    assert count >= 4 and files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(index["weight_map"]) == sorted(shapes)
    assert index["metadata"]["total_size"] == sum(4 * int(np.prod(shape)) for shape in shapes.values())
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
    assert index["weight_map"]["lm_head.weight"] == files[-1]
    assert not (tmp_path / WEIGHTS_FILE).exists()
    hf_config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["torch_dtype"] == "float32"
    assert hf_config["rope_scaling"]["rope_type"] == "llama3" and hf_config["eos_token_id"] == [2, 3]
    assert_same_model(load_pretrained(str(tmp_path)), model)
    # A later copy with one file replaces the sharded one whole: no stale shards or index left to confuse a loader.
    save_hf_model(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_the_gather_in_pieces_gives_the_whole_tensors(tmp_path, monkeypatch):
    # Pieces of 5 rows of the embedding and head, 2 of the layers' matrices: every piece boundary exercised.
    monkeypatch.setattr(export, "GATHER_PIECE_BYTES", 5 * 32 * 4)
    model = init_llama(TINY, jax.random.key(1))
    files = tokenizer_files(str(TOKENIZER_HF_DIR), None)
    export_hf(model, str(tmp_path), ExportConfig(hf_dir=str(tmp_path), max_shard_mb=1), files, 60)
    assert_same_model(load_pretrained(str(tmp_path)), model)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data


def test_tokenizer_files_of_an_hf_directory_are_copied_and_a_gguf_s_are_written(tmp_path):
    copied = tokenizer_files(str(TOKENIZER_HF_DIR), None)
    assert copied["tokenizer.json"] == (TOKENIZER_HF_DIR / "tokenizer.json").read_bytes()
    assert copied["tokenizer_config.json"] == (TOKENIZER_HF_DIR / "tokenizer_config.json").read_bytes()
    # SmolLM2's GGUF: the tokenizer built from its metadata, and its chat template and special tokens.
    gguf = load_tokenizer("smollm2")
    files = tokenizer_files("smollm2", gguf)
    written = json.loads(files["tokenizer_config.json"])
    assert written["eos_token"] == "<|im_end|>" and "<|im_start|>" in written["chat_template"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in files.items():
        (copy / name).write_bytes(data)
    reloaded = load_tokenizer(str(copy))
    text = gguf.apply_chat_template([{"role": "user", "content": "Wie viel ist 7 × 8? 🎉  tabs\tand  spaces"}],
                                    add_generation_prompt=True)
    assert reloaded.encode(text) == gguf.encode(text) and reloaded.decode(gguf.encode(text)) == text
    assert (reloaded.eos_token_ids, reloaded.bos_token_id, reloaded.pad_token_id) == \
        (gguf.eos_token_ids, gguf.bos_token_id, gguf.pad_token_id)


@pytest.mark.parametrize("export_config,problem", [
    ({"hf_dir": "/x", "at": ["begin"]}, "export.at[0]: must be one of pauses, end; got 'begin'"),
    ({"hf_dir": "/x", "at": ["end", "end"]}, "export.at: items must be unique"),
    ({"hf_dir": "/x", "at": []}, "export.at: needs at least 1 item(s)"),
    ({"hf_dir": "/x", "at": ["pauses"]}, "export.at: `pauses` exports at the inference pauses"),
    ({"hf_dir": "relative/dir"}, "export.hf_dir: must be an absolute path or a URL"),
    ({"hf_dir": "/x", "max_shard_mb": 0}, "export.max_shard_mb: must be > 0"),
])
def test_bad_export_settings_are_config_errors(tmp_path, export_config, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse_worker_config(tiny_config(tmp_path, export=export_config))


def test_a_run_exports_its_live_params_at_pauses_and_end(tmp_path):
    """A real worker run, params split over fsdp 2 x model 2, prompts from UltraFeedback Parquet: the copies at
    the pause (step 3) and the end (step 5) load through our own loader with the live params' weights and logits,
    exactly."""
    prompts = write_parquet(str(tmp_path / "test_prefs.parquet"), [ultrafeedback_row(
        {"prompt": f"Name {i} colors.", "chosen": [{"role": "user", "content": f"Name {i} colors."},
                                                   {"role": "assistant", "content": "Red."}],
         "rejected": [{"role": "user", "content": f"Name {i} colors."}, {"role": "assistant", "content": "No."}]})
        for i in range(3)])
    hf_dir = tmp_path / "hf"
    config = tiny_config(tmp_path / "run", **{
        "trainer.num_train_steps": 5, "trainer.mesh": {"data": 1, "fsdp": 2, "model": 2},
        "trainer.checkpoint": {"every": None, "keep": 5},
        "inference": {"eval_at_steps": [3], "prompts_file": prompts, "max_new_tokens": 2},
        "export": {"hf_dir": str(hf_dir), "at": ["pauses", "end"], "max_shard_mb": 1}})
    checked(run_worker(config, devices=4))
    for step, copy in ((3, hf_dir / "step_3"), (5, hf_dir)):
        # The embedding (49152 x 32 float32, 6.3 MB) in a file of its own, the rest in another.
        assert json.loads((copy / INDEX_FILE).read_text())["weight_map"]["model.embed_tokens.weight"] == \
            "model-00001-of-00002.safetensors"
        assert json.loads((copy / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
        assert_same_model(load_pretrained(str(copy)), live_params(config, step, tmp_path))
    completions = (tmp_path / "run" / "inference" / "step_000003" / "host_0000_of_0001.jsonl").read_text()
    assert "Name 2 colors." in completions
