"""Preference data: formats (JSONL, gzip, UltraFeedback's Parquet; local, fsspec, gs://), rendering with SmolLM2's
chat template, response-only loss mask, overlength policy, deterministic order and host sharding, bad input (naming
the file and line or row); training from Parquet; and the project's generated preference set."""

import dataclasses
import gzip
import json
import re

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcs_emulator import BUCKET, gcs_emulator, point_this_process_at
from simpo_worker.contract.config import DataConfig
from simpo_worker.contract.errors import DataError
from simpo_worker.data import records
from simpo_worker.data.make_preference_data import generate, main as make_data
from simpo_worker.data.preference_data import PreferenceData, read_pairs
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.store import storage
from ultrafeedback import ultrafeedback_row, write_parquet
from worker_runs import checked, preference_files, run_worker, straight_run, tiny_config, train_records


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def message_row(question, good, bad):
    context = [{"role": "user", "content": question}]
    return {"prompt": question, "chosen": context + [{"role": "assistant", "content": good}],
            "rejected": context + [{"role": "assistant", "content": bad}]}


def write_jsonl(path, rows, compress=False):
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return str(path)


def open_data(tokenizer, patterns, batch_size=2, seed=0, **config):
    return PreferenceData(DataConfig(train_files=patterns, **config), tokenizer, patterns, batch_size, seed)


def test_message_lists_and_plain_strings_render_the_same(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [message_row("What is 2 + 2?", "4.", "5.")])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}],
                compress=True)
    data = open_data(tokenizer, [str(tmp_path / "*.jsonl*")])
    assert len(data.pairs) == 2
    first, second = (data.encode(pair, pair.chosen) for pair in data.pairs)
    assert first == second


def test_loss_mask_covers_exactly_the_response(tmp_path, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", [message_row("Convert 3 m to cm.", "3 m is 300 cm.", "3 m is 30 cm.")])
    data = open_data(tokenizer, [str(tmp_path / "d.jsonl")], batch_size=1)
    batch = data.batch(0, np.array([0]))
    for j, answer in enumerate(["3 m is 300 cm.", "3 m is 30 cm."]):
        length = batch.lengths[0, j]
        ids, mask = batch.tokens[0, j], batch.loss_mask[0, j]
        # The response is the answer and the end of the assistant turn (the model learns to stop).
        assert tokenizer.decode(ids[mask == 1]) == answer + "<|im_end|>\n"
        assert tokenizer.decode(ids[:length][mask[:length] == 0]).endswith("<|im_start|>assistant\n")
        assert not mask[length:].any() and (ids[length:] == tokenizer.pad_token_id).all()
    # The rendered whole is the chat template of the full conversation.
    conversation = message_row("Convert 3 m to cm.", "3 m is 300 cm.", "")["chosen"]
    assert tokenizer.decode(batch.tokens[0, 0, :batch.lengths[0, 0]]) == tokenizer.apply_chat_template(conversation)


def test_overlength_error_names_file_and_line(tmp_path, tokenizer):
    file = write_jsonl(tmp_path / "long.jsonl", [message_row("hi", "ok", "no"),
                                                  message_row("word " * 200, "ok", "no")])
    data = open_data(tokenizer, [file], batch_size=2, max_seq_len=64)
    with pytest.raises(DataError, match=re.escape(f"{file}:2") + r": \d+ prompt \+ \d+ response tokens exceed "
                                        r"data.max_seq_len = 64 \(data.overlength: error\)"):
        data.batch(0, np.arange(2))


def test_truncate_prompt_keeps_the_response(tmp_path, tokenizer):
    file = write_jsonl(tmp_path / "long.jsonl", [message_row("word " * 200, "the answer is 7.", "it is 8.")])
    data = open_data(tokenizer, [file], batch_size=1, max_seq_len=64, overlength="truncate_prompt")
    batch = data.batch(0, np.array([0]))
    assert batch.lengths[0].tolist() == [64, 64]
    assert tokenizer.decode(batch.tokens[0, 0][batch.loss_mask[0, 0] == 1]) == "the answer is 7.<|im_end|>\n"
    assert batch.loss_mask[0, 0, 0] == 0  # a prompt token stays to condition the response on


def test_order_is_a_seeded_permutation_per_epoch(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    file = write_jsonl(tmp_path / "d.jsonl", rows)
    data = open_data(tokenizer, [file], batch_size=4, seed=7)
    order = np.concatenate([data.global_rows(k) for k in range(5)])  # 20 rows: two epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert not (order[:10] == order[10:]).all()  # each epoch its own shuffle
    again = open_data(tokenizer, [file], batch_size=4, seed=7)
    assert (again.global_rows(3) == data.global_rows(3)).all()  # position alone decides the batch
    other = open_data(tokenizer, [file], batch_size=4, seed=8)
    assert not (np.concatenate([other.global_rows(k) for k in range(3)]) == order[:12]).all()


def test_a_host_reads_only_its_rows(tmp_path, tokenizer):
    rows = [{"prompt": f"question number {i}", "chosen": f"yes {i}", "rejected": "no"} for i in range(8)]
    file = write_jsonl(tmp_path / "d.jsonl", rows)
    data = open_data(tokenizer, [file], batch_size=4)
    full = data.batch(1, np.arange(4))
    part = data.batch(1, np.array([2, 3]))
    assert (part.tokens == full.tokens[2:]).all() and (part.loss_mask == full.loss_mask[2:]).all()


def test_reads_through_fsspec_urls(tokenizer):
    fs = fsspec.filesystem("memory")
    fs.pipe("/prefs/part-0.jsonl.gz", gzip.compress(json.dumps(message_row("a?", "b.", "c.")).encode()))
    fs.pipe("/prefs/part-1.jsonl.gz", gzip.compress(json.dumps(message_row("d?", "e.", "f.")).encode()))
    pairs = read_pairs(["memory://prefs/part-*.jsonl.gz"])
    assert [pair.source for pair in pairs] == ["memory:///prefs/part-0.jsonl.gz:1", "memory:///prefs/part-1.jsonl.gz:1"]


@pytest.mark.parametrize("line,problem", [
    ('{"prompt": "q", "chosen": "a", "rejected": "b"', "not valid JSON"),
    ('{"prompt": "q", "chosen": "a"}', "missing field `rejected`"),
    ('{"prompt": "q", "chosen": "  ", "rejected": "b"}', "`chosen`: empty response"),
    ('{"chosen": "a", "rejected": "b"}', "missing field `prompt`"),
    ('{"prompt": "q", "chosen": [{"role": "user", "content": "q"}], "rejected": "b"}',
     "the last message must be the assistant's answer"),
    ('["q", "a", "b"]', "expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, problem):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(f"{file}:3: ") + ".*" + re.escape(problem)):
        read_pairs([str(file)])


def test_empty_glob_and_empty_files_are_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/none-*.jsonl: no preference data files match")):
        read_pairs([f"{tmp_path}/none-*.jsonl"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_pairs([str(tmp_path / "empty.jsonl")])


REAL_WORLD_FACTORS = {("meters", "centimeters"): 100, ("kilometers", "meters"): 1000, ("kilograms", "grams"): 1000,
                      ("liters", "milliliters"): 1000, ("hours", "minutes"): 60, ("minutes", "seconds"): 60,
                      ("days", "hours"): 24, ("feet", "inches"): 12, ("weeks", "days"): 7, ("yards", "feet"): 3}


def test_generated_set_is_correct_and_splits_are_disjoint(tmp_path):
    assert make_data([str(tmp_path), "--train", "200", "--eval", "40", "--seed", "3"]) == 0
    train, held_out = (read_pairs([str(tmp_path / f"{split}.jsonl")]) for split in ("train", "eval"))
    assert len(train) == 200 and len(held_out) == 40
    assert not {p.context[-1]["content"] for p in train} & {p.context[-1]["content"] for p in held_out}
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert {row["task"] for row in rows} == {"addition", "subtraction", "multiplication", "conversion"}
    for row in rows:
        question, chosen, rejected = row["prompt"], row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        if question.startswith("What is"):
            expression = question[len("What is "):-1].replace("×", "*")
            assert eval(expression) == row["answer"] == int(chosen.split("= ")[1].rstrip("."))
            assert int(rejected.split("= ")[1].rstrip(".")) != row["answer"]
        else:
            small, n, big = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question).groups()
            assert int(n) * REAL_WORLD_FACTORS[big, small] == row["answer"]
            assert int(chosen.split(" is ")[1].split()[0]) == row["answer"]
            assert int(rejected.split(" is ")[1].split()[0]) != row["answer"]
    assert generate(50, 10, 3) == generate(50, 10, 3)


# ---- Parquet, as UltraFeedback-binarized is published -----------------------------------------------------------


def ultrafeedback_rows(count: int) -> list[dict]:
    return [ultrafeedback_row(message_row(f"What is {i} + {i}?", f"{2 * i}.", f"{2 * i + 1}.")) for i in range(count)]


def without_sources(pairs):
    return [dataclasses.replace(pair, source="") for pair in pairs]


def test_parquet_reads_as_the_same_rows_in_jsonl(tmp_path, tokenizer):
    rows = ultrafeedback_rows(5)
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    parquet = write_parquet(str(tmp_path / "d.parquet"), rows, row_group_size=2)
    from_jsonl, from_parquet = open_data(tokenizer, [jsonl], batch_size=4), open_data(tokenizer, [parquet], 4)
    assert [pair.source for pair in from_parquet.pairs] == [f"{parquet}: row {i}" for i in range(5)]
    assert without_sources(from_parquet.pairs) == without_sources(from_jsonl.pairs)
    for position in range(3):
        a, b = from_jsonl.batch(position, np.arange(4)), from_parquet.batch(position, np.arange(4))
        for field in dataclasses.fields(a):
            np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name))


@pytest.mark.parametrize("change,problem", [
    (lambda row: {**row, "rejected": row["rejected"][:1]}, "`rejected`: the last message must be the assistant's"),
    (lambda row: {**row, "chosen": None}, "`chosen`: expected a non-empty message list or a string, got None"),
    (lambda row: {**row, "chosen": [{"content": "", "role": "assistant"}]}, "`chosen`: empty response"),
])
def test_a_bad_parquet_row_names_the_file_and_its_row(tmp_path, monkeypatch, change, problem):
    # Streamed in batches of 2 rows: the row number counts across the whole file, not within a batch.
    monkeypatch.setattr(records, "PARQUET_BATCH_ROWS", 2)
    rows = ultrafeedback_rows(7)
    rows[5] = change(rows[5])
    file = write_parquet(str(tmp_path / "bad.parquet"), rows, row_group_size=3)
    with pytest.raises(DataError, match=re.escape(f"{file}: row 5: ") + ".*" + re.escape(problem)) as caught:
        read_pairs([file])
    assert caught.value.exit_code == 11


def test_parquet_file_errors(tmp_path):
    columns = [{k: v for k, v in row.items() if k != "rejected"} for row in ultrafeedback_rows(2)]
    pq.write_table(pa.Table.from_pylist(columns), tmp_path / "no-rejected.parquet")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/no-rejected.parquet: row 0: missing field `rejected`")):
        read_pairs([str(tmp_path / "no-rejected.parquet")])
    (tmp_path / "text.parquet").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/text.parquet: not a readable Parquet file")):
        read_pairs([str(tmp_path / "text.parquet")])


def test_parquet_through_the_gcs_emulator(monkeypatch, tmp_path):
    rows = ultrafeedback_rows(3)
    local = read_pairs([write_parquet(str(tmp_path / "d.parquet"), rows)])
    with gcs_emulator() as env:
        point_this_process_at(env, monkeypatch)
        url = write_parquet(f"gs://{BUCKET}/prefs/train_prefs-00000-of-00001.parquet", rows, row_group_size=1)
        pairs = read_pairs([f"gs://{BUCKET}/prefs/*.parquet"])
    assert [pair.source for pair in pairs] == [f"{url}: row {i}" for i in range(3)]
    assert without_sources(pairs) == without_sources(local)


def test_training_from_parquet_is_training_from_the_same_jsonl(tmp_path):
    """The worker trained on the project's preference set as UltraFeedback Parquet: every step's metrics
    bit-identical to the run on the JSONL (straight_run)."""
    rows = [ultrafeedback_row(row) for row in storage.read_jsonl(preference_files())]
    parquet = write_parquet(str(tmp_path / "train_prefs.parquet"), rows, row_group_size=40)
    output_dir = tmp_path / "run"
    checked(run_worker(tiny_config(output_dir, **{"data.train_files": [parquet]})))
    untimed = lambda records: [{k: v for k, v in r.items() if k != "step_time"} for r in records]  # noqa: E731
    assert [r["step"] for r in train_records(output_dir)] == list(range(1, 8))
    assert untimed(train_records(output_dir)) == untimed(train_records(straight_run()))
