"""Stop strings (inference.stop_tokens): SmolLM2's greedy completions with stop strings against the same prompts
generated without them, decoded by HF `tokenizers` and cut where the first stop string ends; the incremental
matcher against a brute-force search; and the config refusing an empty stop string."""

from __future__ import annotations

import random

import pytest
import tokenizers

from model_goldens import GOLDENS
from simpo_worker.contract.config import ConfigError, InferenceConfig, parse_worker_config
from simpo_worker.data.prompts import render_prompts
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.infer.engine import Engine
from simpo_worker.infer.stop_strings import StopStringMatcher
from simpo_worker.weights.pretrained import load_pretrained

PEER = GOLDENS / "tokenizer_smollm2_hf" / "tokenizer.json"
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer with one word."}],
    [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a message in a bottle."}],
    [{"role": "system", "content": "You are a helpful assistant who explains things step by step."},
     {"role": "user", "content": "How do I make a cup of tea?"}],
    [{"role": "user", "content": "List ten animals."}],
]
# More than the first decode chunk (1 + 64 tokens): rows stopped in it leave the batch before the second.
MAX_NEW = 72


@pytest.fixture(scope="module")
def peer():
    return tokenizers.Tokenizer.from_file(str(PEER))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def smollm2(tokenizer):
    return load_pretrained("smollm2"), tokenizer, render_prompts(CHATS, tokenizer, 64).token_ids


def generate(smollm2, stop_tokens: list[str], batch_size: int):
    model, tokenizer, prompts = smollm2
    inference = InferenceConfig(max_new_tokens=MAX_NEW, max_prompt_len=64, batch_size=batch_size,
                                stop_tokens=stop_tokens)
    engine = Engine(model.config, inference, tokenizer.eos_token_ids, tokenizer=tokenizer)
    return engine, engine.generate(model, prompts, list(range(len(prompts))), step=0, seed=0)


@pytest.fixture(scope="module")
def reference(smollm2):
    return generate(smollm2, [], batch_size=len(CHATS))


def first_stop_end(text: str, stops: list[str]):
    """The length of the shortest prefix of `text` that holds a stop string (None: it holds none)."""
    return min((text.find(stop) + len(stop) for stop in stops if stop in text), default=None)


def expected(peer, token_ids: list[int], finish_reason: str, stops: list[str]) -> tuple[list[int], str, str]:
    """A reference completion once `stops` apply: (token ids, finish reason, text)."""
    text = peer.decode(token_ids, skip_special_tokens=True)
    end = first_stop_end(text, stops)
    if end is None:
        return token_ids, finish_reason, text
    kept = next(k for k in range(1, len(token_ids) + 1)
                if peer.decode(token_ids[:k], skip_special_tokens=True).startswith(text[:end]))
    return token_ids[:kept], "stop", text[:end]


def pick_stop(peer, completions, row: int, after_token: int, spanning: bool) -> str:
    """A stop string from row `row`'s text past token `after_token`, first found there and in no other row: across
    the boundary of two tokens (3 characters of each), or ending 2 characters inside one token."""
    ids = completions[row].token_ids
    texts = [peer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    for k in range(after_token, len(ids)):
        before = peer.decode(ids[:k], skip_special_tokens=True)
        piece = peer.decode(ids[:k + 1], skip_special_tokens=True)[len(before):]
        if spanning:
            stop, start = before[-3:] + piece[:3], len(before) - 3
        else:
            stop, start = piece[:-2], len(before)
        if (len(stop) >= 4 and stop.strip() and texts[row].find(stop) == start
                and not any(stop in text for i, text in enumerate(texts) if i != row)):
            return stop
    raise AssertionError(f"no stop string to pick in row {row}: {texts[row]!r}")


def test_stop_strings_cut_completions_where_the_reference_text_holds_them(smollm2, peer, reference):
    reference_engine, plain = reference
    assert [c.finish_reason for c in plain] == ["stop", "length", "length", "length"]  # row 0 ends on EOS
    assert [c.text for c in plain] == [peer.decode(c.token_ids, skip_special_tokens=True) for c in plain]
    spanning = pick_stop(peer, plain, row=1, after_token=15, spanning=True)
    inside = pick_stop(peer, plain, row=2, after_token=25, spanning=False)
    stops = [spanning, inside, "\u2603 never generated"]
    want = [expected(peer, c.token_ids, c.finish_reason, stops) for c in plain]
    # The cases this test is about: rows 1 and 2 stop within the first chunk, row 2's text ends inside its last
    # token, rows 0 and 3 hold no stop string.
    assert want[1][1] == want[2][1] == "stop" and max(len(want[1][0]), len(want[2][0])) < 65
    assert len(peer.decode(want[1][0][:-1], skip_special_tokens=True)) > len(want[1][2]) - len(spanning)
    assert peer.decode(want[2][0], skip_special_tokens=True) != want[2][2]
    assert want[0] == (plain[0].token_ids, "stop", plain[0].text) and want[3][1] == "length"

    engine, stopped = generate(smollm2, stops, batch_size=len(CHATS))
    assert [(c.token_ids, c.finish_reason, c.text) for c in stopped] == want
    # The stopped rows freed their slots: the last row decoded on alone after the first chunk.
    assert engine.compactions == reference_engine.compactions + 1
    assert engine.row_steps < reference_engine.row_steps

    # More prompts than batch slots: two waves, each its own stop.
    _, two_slots = generate(smollm2, stops, batch_size=2)
    assert [(c.token_ids, c.finish_reason, c.text) for c in two_slots] == want


def test_engine_without_tokenizer_refuses_stop_strings(smollm2):
    model, tokenizer, _ = smollm2
    with pytest.raises(ConfigError, match="inference.stop_tokens: stop strings need the engine to have the tokenizer"):
        Engine(model.config, InferenceConfig(stop_tokens=["\n"]), tokenizer.eos_token_ids)


TEXT = ("The keeper's log — día 3: café, 日本, 🎉👍🏽 and naïve\n\nEnd<|im_end|> of 'it'.\t1 2 3"
        " lighthouse lighthouse")


def brute_force(prefix_texts: list[str], stops: list[str]):
    """(tokens kept, text end): the first prefix whose text, decoded whole, holds a stop string."""
    for kept, text in enumerate(prefix_texts, start=1):
        end = first_stop_end(text, stops)
        if end is not None:
            return kept, end
    return len(prefix_texts), None


def test_matcher_equals_a_search_of_every_prefix(tokenizer, peer):
    """Every substring of up to 6 characters as a stop string (alone and with another one), fed in chunks of 1 to
    5 tokens: multi-byte characters split over tokens, special tokens (left out of the text), repeats."""
    ids = tokenizer.encode(TEXT)
    prefix_texts = [peer.decode(ids[:k], skip_special_tokens=True) for k in range(1, len(ids) + 1)]
    text = prefix_texts[-1]
    assert ids == peer.encode(TEXT, add_special_tokens=False).ids and len(ids) < len(text)
    assert any("\ufffd" in prefix for prefix in prefix_texts)  # a character's bytes split over tokens
    substrings = sorted({text[i:i + n] for n in range(1, 7) for i in range(len(text) - n + 1)})
    rng = random.Random(3)
    cases = [[s] for s in substrings] + [rng.sample(substrings, 2) for _ in range(200)] + [["absent"]]
    for stops in cases:
        matcher = StopStringMatcher(tokenizer, stops)
        position = 0
        while position < len(ids) and matcher.text_end is None:
            size = rng.randint(1, 5)
            matcher.feed(ids[position:position + size])
            position += size
        assert (matcher.tokens, matcher.text_end) == brute_force(prefix_texts, stops), stops


def test_empty_stop_string_is_refused():
    config = {"model": {"source": "smollm2"}, "data": {"train_files": ["train.jsonl"]},
              "trainer": {"num_train_steps": 4, "batch_size": 8}, "output_dir": "gs://bucket/run",
              "inference": {"eval_at_steps": [2], "synthetic_prompt_count": 8}}
    config["inference"]["stop_tokens"] = ["\n", " "]  # whitespace is a stop string like any other
    assert parse_worker_config(config).inference.stop_tokens == ["\n", " "]
    config["inference"]["stop_tokens"] = ["\n", ""]
    message = r"^inference\.stop_tokens: stop strings must not be empty, got \['\\n', ''\]$"
    with pytest.raises(ConfigError, match=message):
        parse_worker_config(config)
