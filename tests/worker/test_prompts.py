"""Prompt sets: the file formats (local, gzip, UltraFeedback's Parquet, gs:// through the GCS emulator), chat
rendering with the real SmolLM2 tokenizer, errors naming the file / prompt and limit, synthetic prompts and host
shards."""

from __future__ import annotations

import gzip
import json
import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcs_emulator import BUCKET, gcs_emulator, point_this_process_at
from simpo_worker.contract.config import InferenceConfig
from simpo_worker.contract.errors import DataError
from simpo_worker.data.prompts import host_shard, load_prompts, read_prompt_file, render_prompts, synthetic_prompts
from simpo_worker.data.tokenizer import load_tokenizer
from ultrafeedback import ultrafeedback_row, write_parquet

ROWS = [
    [{"role": "user", "content": "Hi there"}],
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]},
    {"prompt": "Name a prime number."},
    {"prompt": [{"role": "user", "content": "Count to three."}], "chosen": "ignored"},
]
EXPECTED = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Count to three."}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    return str(path)


def test_jsonl_forms(tmp_path):
    assert read_prompt_file(write_jsonl(tmp_path / "p.jsonl", ROWS)) == EXPECTED


def test_gzip_and_plain_text(tmp_path):
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps(ROWS[2]) + "\n").encode()))
    assert read_prompt_file(str(gz)) == [EXPECTED[2]]
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second {\"not json\"}\n")
    assert read_prompt_file(str(text)) == [[{"role": "user", "content": "first prompt"}],
                                           [{"role": "user", "content": "  second {\"not json\"}"}]]


def test_gcs_url_through_the_emulator(monkeypatch):
    with gcs_emulator() as env:
        point_this_process_at(env, monkeypatch)
        url = f"gs://{BUCKET}/prompts/p.jsonl"
        with fsspec.open(url, "w") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in ROWS))
        assert read_prompt_file(url) == EXPECTED


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "ok"}\nnot json\n', r"p.jsonl:2: not valid JSON"),
    ('{"question": "x"}\n', r"p.jsonl:1: expected `messages` or `prompt`, got keys \['question'\]"),
    ('{"prompt": "  "}\n', r"p.jsonl:1: empty prompt"),
    ('[{"role": "user"}]\n', r"p.jsonl:1\[0\]: a message needs string `role` and `content`"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}\n',
     r"p.jsonl:1: the conversation has only assistant turns, no prompt to answer"),
    ('\n\n', r"p.jsonl: the prompt file holds no prompts"),
])
def test_bad_rows_name_the_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompt_file(str(path))


def test_an_ultrafeedback_row_is_answered_at_its_prompt_not_after_its_answer(tmp_path):
    """UltraFeedback-binarized rows carry `prompt` and `messages`; `messages` ends with the chosen answer."""
    row = {"prompt": "Name a prime.", "prompt_id": "x",
           "messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
           "chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert read_prompt_file(str(path)) == [[{"role": "user", "content": "Name a prime."}]]


def ultrafeedback_prompt_rows(count: int) -> list[dict]:
    return [ultrafeedback_row({"prompt": f"Name {i} primes.",
                               "chosen": [{"role": "user", "content": f"Name {i} primes."},
                                          {"role": "assistant", "content": "2"}],
                               "rejected": [{"role": "user", "content": f"Name {i} primes."},
                                            {"role": "assistant", "content": "4"}]}) for i in range(count)]


def test_ultrafeedback_parquet_is_answered_at_its_prompts(tmp_path):
    rows = ultrafeedback_prompt_rows(3)
    expected = [[{"role": "user", "content": f"Name {i} primes."}] for i in range(3)]
    assert read_prompt_file(write_parquet(str(tmp_path / "test_gen.parquet"), rows, row_group_size=2)) == expected
    # A file with a `prompt` column alone (no `messages`) gives the same prompts.
    pq.write_table(pa.Table.from_pylist([{"prompt": row["prompt"]} for row in rows]), tmp_path / "prompts.parquet")
    assert read_prompt_file(str(tmp_path / "prompts.parquet")) == expected


def test_a_bad_parquet_prompt_names_the_file_and_row(tmp_path):
    rows = ultrafeedback_prompt_rows(4)
    rows[3]["messages"] = [{"role": "assistant", "content": "hi"}]
    file = write_parquet(str(tmp_path / "p.parquet"), rows, row_group_size=2)
    with pytest.raises(DataError, match=re.escape(f"{file}: row 3: the conversation has only assistant turns")):
        read_prompt_file(file)


def test_parquet_prompts_through_the_emulator(monkeypatch):
    with gcs_emulator() as env:
        point_this_process_at(env, monkeypatch)
        url = write_parquet(f"gs://{BUCKET}/prompts/test_gen.parquet", ultrafeedback_prompt_rows(2))
        assert read_prompt_file(url) == [[{"role": "user", "content": f"Name {i} primes."}] for i in range(2)]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: prompt file not found"):
        read_prompt_file(str(tmp_path / "nope.jsonl"))


def test_rendered_with_the_chat_template_and_generation_prompt(tmp_path, tokenizer):
    inference = InferenceConfig(prompts_file=write_jsonl(tmp_path / "p.jsonl", ROWS), max_prompt_len=128)
    prompts = load_prompts(inference, tokenizer)
    assert len(prompts) == 4
    for messages, text, ids in zip(EXPECTED, prompts.texts, prompts.token_ids):
        assert text == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n") and messages[-1]["content"] in text
        assert ids == tokenizer.encode(text) and tokenizer.decode(ids) == text


def test_over_long_prompt_names_its_index_and_the_limit(tokenizer):
    conversations = [[{"role": "user", "content": "short"}], [{"role": "user", "content": "word " * 200}]]
    with pytest.raises(DataError, match=r"prompt 1: \d+ tokens after the chat template exceed "
                                        r"inference.max_prompt_len = 64"):
        render_prompts(conversations, tokenizer, 64)


def test_synthetic_prompts_are_deterministic_and_distinct(tokenizer):
    prompts = load_prompts(InferenceConfig(synthetic_prompt_count=30), tokenizer)
    assert len(prompts) == 30 and len(set(prompts.texts)) == 30
    assert synthetic_prompts(30) == synthetic_prompts(30)
    assert synthetic_prompts(30)[:5] == synthetic_prompts(5)


@pytest.mark.parametrize("prompts,hosts", [(128, 4), (10, 4), (3, 4), (0, 2), (7, 1)])
def test_host_shards_are_contiguous_and_cover_every_prompt_once(prompts, hosts):
    shards = [host_shard(prompts, host, hosts) for host in range(hosts)]
    assert [i for shard in shards for i in shard] == list(range(prompts))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="process index 4 is outside"):
        host_shard(prompts, 4, 4)
