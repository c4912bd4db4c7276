"""Tokenizer and chat template against HF: goldens from tests/goldens/make_tokenizer_goldens.py (transformers), and
HF `tokenizers` (the Rust implementation, test extra) live on generated text."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tokenizers
from gguf import GGUFReader, GGUFWriter
from gguf.vocab import bytes_to_unicode

from simpo_worker.contract.errors import DataError, ModelError
from simpo_worker.data.chat_template import ChatTemplate
from simpo_worker.data.tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from simpo_worker.weights.smollm2 import smollm2_gguf_path

BYTE_TO_CHAR = [bytes_to_unicode()[byte] for byte in range(256)]  # GPT-2's printable spelling of each byte

GOLDENS = Path(__file__).parents[1] / "goldens"
SMOLLM2_HF = GOLDENS / "tokenizer_smollm2_hf"
TINY_HF = GOLDENS / "tokenizer_tiny_hf"


def read_golden(name: str) -> dict:
    path = GOLDENS / name
    assert path.is_file(), f"missing golden {path}: run tests/goldens/make_tokenizer_goldens.py"
    return json.loads(path.read_text(encoding="utf-8"))


SMOLLM2 = read_golden("tokenizer_smollm2.json")
TINY = read_golden("tokenizer_tiny.json")


@pytest.fixture(scope="module")
def gguf_tok() -> Tokenizer:
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def hf_tok() -> Tokenizer:
    return Tokenizer.from_hf(SMOLLM2_HF)


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    return Tokenizer.from_hf(TINY_HF)


def text_id(case):
    return repr(case["text"][:24])


# -- SmolLM2 from its GGUF, and from its HF tokenizer.json --

@pytest.mark.parametrize("case", SMOLLM2["texts"], ids=text_id)
def test_smollm2_ids_equal_hf(gguf_tok, hf_tok, case):
    assert gguf_tok.encode(case["text"]) == case["ids"]
    assert gguf_tok.encode(case["text"], add_special_tokens=True) == case["ids_with_special_tokens"]
    assert hf_tok.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", SMOLLM2["texts"], ids=text_id)
def test_smollm2_decode_equals_hf(gguf_tok, case):
    assert gguf_tok.decode(case["ids"]) == case["decoded"]
    assert gguf_tok.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]
    # Prefixes cut multi-byte characters in half: those bytes become U+FFFD exactly as HF does it.
    for k, expected in enumerate(case["prefix_decodes"], start=1):
        assert gguf_tok.decode(case["ids"][:k]) == expected, f"prefix of {k} ids"


def test_smollm2_roundtrip(gguf_tok):
    # SmolLM2 has no symbol for a few control bytes (HF drops them too, see test_bytes_missing_from_vocab);
    # every other text comes back exactly.
    lossless = [c["text"] for c in SMOLLM2["texts"] if not c["text"].startswith("Control chars")]
    assert len(lossless) >= len(SMOLLM2["texts"]) - 1
    for text in lossless:
        assert gguf_tok.decode(gguf_tok.encode(text)) == text


def test_bytes_missing_from_vocab(gguf_tok):
    case = next(c for c in SMOLLM2["texts"] if c["text"].startswith("Control chars"))
    assert gguf_tok.encode(case["text"]) == case["ids"]
    assert gguf_tok.decode(case["ids"]) != case["text"]


def test_smollm2_special_tokens(gguf_tok, hf_tok):
    for tok in (gguf_tok, hf_tok):
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (
            SMOLLM2["bos_token_id"], SMOLLM2["eos_token_id"], SMOLLM2["pad_token_id"], SMOLLM2["vocab_size"])
        assert tok.eos_token_ids[0] == SMOLLM2["eos_token_id"]
        assert tok.decode(tok.eos_token_ids) == "<|im_end|><|endoftext|>"
        assert [i for i in range(tok.vocab_size) if tok.is_special(i)] == SMOLLM2["special_ids"]
        assert tok.add_bos is False


def chat_id(chat):
    return f"{len(chat['messages'])}msg-gen{chat['add_generation_prompt']:d}"


@pytest.mark.parametrize("chat", SMOLLM2["chats"], ids=chat_id)
def test_smollm2_chat_template_equals_hf(gguf_tok, hf_tok, chat):
    for tok in (gguf_tok, hf_tok):
        rendered = tok.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
        assert rendered == chat["rendered"]
        assert tok.encode(rendered) == chat["ids"]


@pytest.mark.parametrize("chat", SMOLLM2["custom_chats"], ids=chat_id)
def test_custom_template_equals_hf(gguf_tok, chat):
    """A Llama-2 style template: bos_token/eos_token variables, loop controls, tojson, raise_exception."""
    template = ChatTemplate(SMOLLM2["custom_template"], "custom", gguf_tok.chat_template.special_tokens)
    assert template.render(chat["messages"], chat["add_generation_prompt"]) == chat["rendered"]


def test_template_raise_exception_is_a_data_error(gguf_tok):
    rejection = SMOLLM2["custom_rejection"]
    template = ChatTemplate(SMOLLM2["custom_template"], "custom", gguf_tok.chat_template.special_tokens)
    with pytest.raises(DataError, match=rejection["message"].replace(".", r"\.")):
        template.render(rejection["messages"])


def test_transformers_gguf_path_differs_only_where_recorded(gguf_tok):
    """transformers' GGUF converter uses GPT-2's split for "smollm"; the goldens follow the model's own pipeline.
    On every other text our ids also equal what transformers' GGUF path gives."""
    differs = set(SMOLLM2["texts_where_transformers_gguf_path_differs"])
    assert 0 < len(differs) < len(SMOLLM2["texts"]) // 4
    for case in SMOLLM2["texts"]:
        same = gguf_tok.encode(case["text"]) == case["transformers_gguf_ids"]
        assert same == (case["text"] not in differs), case["text"]


# -- live against HF tokenizers on generated text --

ALPHABET = [*"abcXYZ  \t\n\r019'.,!?-_/<>|", "'s", "'ll", "  ", "\n\n", "123", "é", "e\u0301", "日本", "한", "🎉", "👍🏽",
            "\u00a0", "\u3000", "²", "١", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool>", "<s>", "Ⅻ", "ﬁ"]


def generated_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.mark.parametrize("directory", [SMOLLM2_HF, TINY_HF], ids=lambda d: d.name)
def test_generated_text_equals_hf_tokenizers(directory):
    ours = Tokenizer.from_hf(directory)
    peer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    texts = generated_texts(400, seed=len(directory.name)) + ["a" * 3000, " " * 500 + "x", "9" * 1000, "🎉" * 300]
    for text in texts:
        for add_special_tokens in (False, True):
            expected = peer.encode(text, add_special_tokens=add_special_tokens).ids
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, repr(text)
        ids = ours.encode(text)
        assert ours.decode(ids) == peer.decode(ids, skip_special_tokens=False), repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == peer.decode(ids, skip_special_tokens=True), repr(text)


# -- the tiny tokenizer: normalizer, Split regex, prefix space, BOS from the post-processor, non-special added --

@pytest.mark.parametrize("case", TINY["texts"], ids=text_id)
def test_tiny_ids_equal_hf(tiny_tok, case):
    assert tiny_tok.encode(case["text"]) == case["ids"]
    assert tiny_tok.encode(case["text"], add_special_tokens=True) == case["ids_with_special_tokens"]
    assert tiny_tok.decode(case["ids_with_special_tokens"]) == case["decoded"]


def test_tiny_special_tokens(tiny_tok):
    assert (tiny_tok.bos_token_id, tiny_tok.eos_token_id, tiny_tok.pad_token_id, tiny_tok.vocab_size) == (
        TINY["bos_token_id"], TINY["eos_token_id"], TINY["pad_token_id"], TINY["vocab_size"])
    assert tiny_tok.add_bos is True
    assert tiny_tok.eos_token_ids == [TINY["eos_token_id"]]
    tool = tiny_tok.encode("<tool>")
    assert len(tool) == 1 and not tiny_tok.is_special(tool[0])
    assert tiny_tok.decode(tiny_tok.encode("x<tool></s>"), skip_special_tokens=True) == " x<tool>"


def test_from_hf_fsspec_url(tmp_path):
    """A remote directory (fsspec URL) loads the same as a local one; in-memory fs stands in for gs://."""
    fs = fsspec.filesystem("memory")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        fs.pipe(f"/tiny_remote/{name}", (TINY_HF / name).read_bytes())
    remote = Tokenizer.from_hf("memory://tiny_remote")
    assert remote.source == "memory://tiny_remote/tokenizer.json"
    for case in TINY["texts"]:
        assert remote.encode(case["text"], add_special_tokens=True) == case["ids_with_special_tokens"]


def test_from_hf_accepts_the_tokenizer_json_path():
    assert Tokenizer.from_hf(TINY_HF / "tokenizer.json").encode("hello world") == \
        Tokenizer.from_hf(TINY_HF).encode("hello world")


# -- streaming decode --

def test_stream_decoder_holds_partial_characters(gguf_tok):
    text = "Emoji 🎉 and 日本語, then ascii"
    ids = gguf_tok.encode(text)
    stream = gguf_tok.stream_decoder()
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) + stream.finish() == text
    assert all("\ufffd" not in piece for piece in pieces)
    # The emoji takes several tokens: all but the last yield nothing.
    emoji = gguf_tok.encode("🎉")
    assert len(emoji) > 1
    stream = StreamDecoder(gguf_tok)
    assert [stream.add(i) for i in emoji] == [""] * (len(emoji) - 1) + ["🎉"]
    assert stream.add(emoji[0]) == ""  # the start of a character that never completes
    assert stream.finish() == "\ufffd"


def test_stream_decoder_equals_decode(gguf_tok):
    for case in SMOLLM2["texts"]:
        for skip in (False, True):
            stream = gguf_tok.stream_decoder(skip_special_tokens=skip)
            streamed = "".join(stream.add(i) for i in case["ids"]) + stream.finish()
            assert streamed == gguf_tok.decode(case["ids"], skip_special_tokens=skip)


def test_decode_accepts_numpy_ids(gguf_tok):
    ids = gguf_tok.encode("numpy ids, 42")
    assert gguf_tok.decode(np.asarray(ids, dtype=np.int32)) == "numpy ids, 42"


def test_decode_rejects_ids_outside_vocab(gguf_tok):
    with pytest.raises(DataError, match="token id 49152 is outside the vocabulary"):
        gguf_tok.decode([5, 49152])
    with pytest.raises(DataError, match="token id -1"):
        gguf_tok.decode([-1])


# -- bad input --

def write_tokenizer_gguf(path: Path, pre: str, model: str = "gpt2", template: str | None = None) -> None:
    """A GGUF holding only tokenizer metadata: an end-of-text token, the 256 byte symbols and one merge."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["<|endoftext|>", *BYTE_TO_CHAR, "hi"])
    writer.add_token_types([3] + [1] * 257)
    writer.add_token_merges(["h i"])
    writer.add_eos_token_id(0)
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_minimal_gguf_loads(tmp_path):
    path = tmp_path / "bytes.gguf"
    write_tokenizer_gguf(path, pre="smollm")
    for source in (path, GGUFReader(path)):  # a path, or a reader the weight loader already opened
        tok = Tokenizer.from_gguf(source)
        assert tok.encode("hit<|endoftext|>") == [257, 1 + ord("t"), 0]
        assert tok.pad_token_id == 0 and tok.eos_token_ids == [0]
        assert tok.source == str(path)


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match=r"nothing\.gguf: GGUF file not found") as e:
        load_tokenizer(str(tmp_path / "nothing.gguf"))
    assert e.value.exit_code == 12


@pytest.mark.parametrize("size", [0, 24, 1000, 100_000])
def test_truncated_gguf(tmp_path, size):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(ModelError, match=r"truncated\.gguf: not a readable GGUF file"):
        Tokenizer.from_gguf(path)


def test_unsupported_pre_tokenizer(tmp_path):
    path = tmp_path / "jais.gguf"
    write_tokenizer_gguf(path, pre="jais")
    with pytest.raises(ModelError, match=r"jais\.gguf: pre-tokenizer \(tokenizer.ggml.pre\) 'jais' is not supported"):
        Tokenizer.from_gguf(path)


def test_unsupported_tokenizer_model(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tokenizer_gguf(path, pre="smollm", model="llama")
    with pytest.raises(ModelError, match=r"spm\.gguf: tokenizer.ggml.model 'llama' is not supported"):
        Tokenizer.from_gguf(path)


def test_bad_chat_template(tmp_path):
    path = tmp_path / "badtemplate.gguf"
    write_tokenizer_gguf(path, pre="smollm", template="{% for message in messages %}{{ message['content'] }")
    with pytest.raises(ModelError, match=r"badtemplate\.gguf: chat template does not compile"):
        Tokenizer.from_gguf(path)


def test_missing_chat_template(tmp_path):
    path = tmp_path / "notemplate.gguf"
    write_tokenizer_gguf(path, pre="smollm")
    with pytest.raises(ModelError, match=r"notemplate\.gguf: the tokenizer has no chat template"):
        Tokenizer.from_gguf(path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_hf_dir(tmp_path):
    with pytest.raises(ModelError, match=r"nowhere/tokenizer\.json: file not found"):
        load_tokenizer(str(tmp_path / "nowhere"))


def copy_tiny(tmp_path: Path, edit) -> Path:
    directory = tmp_path / "edited"
    shutil.copytree(TINY_HF, directory)
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    edit(spec)
    (directory / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return directory


def test_hf_unsupported_model(tmp_path):
    directory = copy_tiny(tmp_path, lambda spec: spec["model"].update(type="WordPiece"))
    with pytest.raises(ModelError, match=r"edited/tokenizer\.json: model type 'WordPiece' is not supported"):
        Tokenizer.from_hf(directory)


def test_hf_unsupported_pre_tokenizer(tmp_path):
    directory = copy_tiny(tmp_path, lambda spec: spec.update(pre_tokenizer={"type": "Whitespace"}))
    with pytest.raises(ModelError, match=r"edited/tokenizer\.json: pre-tokenizer 'Whitespace' is not supported"):
        Tokenizer.from_hf(directory)


def test_hf_merge_outside_vocab(tmp_path):
    directory = copy_tiny(tmp_path, lambda spec: spec["model"]["merges"].append(["zz", "qq"]))
    with pytest.raises(ModelError, match=r"edited/tokenizer\.json: merge \d+ \('zz' 'qq'\) uses 'zz'"):
        Tokenizer.from_hf(directory)


def test_hf_truncated_json(tmp_path):
    directory = tmp_path / "cut"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((TINY_HF / "tokenizer.json").read_bytes()[:500])
    with pytest.raises(ModelError, match=r"cut/tokenizer\.json: not valid JSON"):
        Tokenizer.from_hf(directory)


def test_gguf_gpt2_pre_tokenizer_equals_transformers(tmp_path):
    """SmolLM2's vocabulary in a GGUF that says pre-tokenizer "gpt-2": what transformers' GGUF path computes for
    SmolLM2 itself (it uses GPT-2's split there), recorded in the goldens."""
    spec = json.loads((SMOLLM2_HF / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = [None] * SMOLLM2["vocab_size"]
    for token, token_id in spec["model"]["vocab"].items():
        tokens[token_id] = token
    writer = GGUFWriter(str(tmp_path / "gpt2.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in SMOLLM2["special_ids"] else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(pair) for pair in spec["model"]["merges"]])
    writer.add_eos_token_id(SMOLLM2["eos_token_id"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = Tokenizer.from_gguf(tmp_path / "gpt2.gguf")
    for case in SMOLLM2["texts"]:
        assert tok.encode(case["text"]) == case["transformers_gguf_ids"], case["text"]


def test_gguf_from_fsspec_url(tmp_path):
    """A remote GGUF (memory:// standing in for gs://) is fetched into fsspec's cache and read like a local one."""
    write_tokenizer_gguf(tmp_path / "remote.gguf", pre="smollm")
    fsspec.filesystem("memory").pipe("/models/remote.gguf", (tmp_path / "remote.gguf").read_bytes())
    tok = load_tokenizer("memory://models/remote.gguf")
    assert tok.encode("hit<|endoftext|>") == [257, 1 + ord("t"), 0]


def handmade_tokenizer_json(path: Path, ignore_merges: bool, unk: str | None) -> Path:
    """Byte symbols without one for byte 0x04, an "abc" token no merge reaches, optionally an unknown token."""
    symbols = ["<unk>", *(char for char in BYTE_TO_CHAR if char != BYTE_TO_CHAR[4]), "ab", "abc"]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": {s: i for i, s in enumerate(symbols)},
                  "merges": [["a", "b"]]},
    }
    path.mkdir()
    (path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>"}), encoding="utf-8")
    return path


@pytest.mark.parametrize("ignore_merges", [False, True])
@pytest.mark.parametrize("unk", [None, "<unk>"])
def test_bpe_options_equal_hf_tokenizers(tmp_path, ignore_merges, unk):
    directory = handmade_tokenizer_json(tmp_path / "handmade", ignore_merges, unk)
    ours = Tokenizer.from_hf(directory)
    peer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in ["abc", "abcd", "xabc", " abc", "ab", "a\x04b", "\x04\x04", "abc\x04abc"]:
        assert ours.encode(text) == peer.encode(text).ids, (text, ours.encode(text))
    assert (ours.encode("abc") == [len(BYTE_TO_CHAR) + 1]) == ignore_merges  # the "abc" token, not "ab" + "c"


def test_generation_config_adds_end_of_generation_ids(tmp_path):
    directory = tmp_path / "with_generation_config"
    shutil.copytree(TINY_HF, directory)
    extra = TINY["pad_token_id"]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [TINY["eos_token_id"], extra]}))
    assert Tokenizer.from_hf(directory).eos_token_ids == [TINY["eos_token_id"], extra]


def write_gguf_from_tokenizer_json(path: Path, tokenizer_json: Path, pre: str) -> None:
    """The vocabulary and merges of an HF tokenizer.json as GGUF metadata; its special added tokens as control
    tokens, the other added tokens as user-defined ones."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    types = {token["id"]: 3 if token["special"] else 4 for token in spec["added_tokens"]}
    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    by_id.update({token["id"]: token["content"] for token in spec["added_tokens"]})
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([by_id[i] for i in range(len(by_id))])
    writer.add_token_types([types.get(i, 1) for i in range(len(by_id))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", sorted(TINY["gguf_pre_tokenizer_ids"]))
def test_gguf_pre_tokenizers_equal_transformers_splits(tmp_path, pre):
    """Llama 3 and Qwen2 pre-tokenizer names, on the tiny vocabulary: ids from transformers' split for that name."""
    write_gguf_from_tokenizer_json(tmp_path / f"{pre}.gguf", TINY_HF / "tokenizer.json", pre)
    tok = Tokenizer.from_gguf(tmp_path / f"{pre}.gguf")
    for case, expected in zip(TINY["texts"], TINY["gguf_pre_tokenizer_ids"][pre], strict=True):
        assert tok.encode(case["text"]) == expected, case["text"]


@pytest.mark.parametrize("pre, whole", [("llama-bpe", True), ("qwen2", False), ("smollm", False)])
def test_gguf_llama3_looks_whole_pieces_up(tmp_path, pre, whole):
    """Llama 3 takes a piece that is itself a token as that token, even if no merge sequence reaches it."""
    json_dir = handmade_tokenizer_json(tmp_path / "handmade", ignore_merges=False, unk=None)
    write_gguf_from_tokenizer_json(tmp_path / "handmade.gguf", json_dir / "tokenizer.json", pre)
    abc = len(BYTE_TO_CHAR) + 1
    assert (Tokenizer.from_gguf(tmp_path / "handmade.gguf").encode("abc") == [abc]) == whole
