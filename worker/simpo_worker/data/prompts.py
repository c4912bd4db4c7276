"""The inference prompt set: from a file or generated, rendered with the chat template, tokenized and checked.

File formats (local path or any fsspec URL such as gs://; `.gz` is decompressed):
- `.jsonl` / `.json`: one JSON value per line: a message list `[{"role": "user", "content": ...}, ...]`,
  `{"messages": [...]}`, or `{"prompt": "text" | [messages]}` (UltraFeedback rows work as they are). A message
  list is cut before its trailing assistant turns (UltraFeedback's `messages` ends with the answer), so the model
  answers the prompt turns.
- `.parquet` (e.g. UltraFeedback-binarized as published): the same, per row, from its `messages` or `prompt`
  column, streamed (records.py).
- anything else: plain text, one user prompt per non-empty line.
Each prompt is rendered with the tokenizer's chat template plus the generation prompt. A prompt longer than
`inference.max_prompt_len` tokens is an error naming its index and the limit (never truncated silently).

Hosts take contiguous shards of the global prompt list (`host_shard`), so prompt i is always global index i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simpo_worker.contract.config import InferenceConfig
from simpo_worker.contract.errors import DataError
from simpo_worker.data.preference_data import _message
from simpo_worker.data.records import is_parquet, read_rows
from simpo_worker.store import storage

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# A row's prompt, in the order looked for (a Parquet file's other columns are not read).
PROMPT_COLUMNS = ("messages", "prompt")

_SYNTHETIC_TASKS = ["Explain", "Write a short poem about", "Give three facts about", "Summarize the idea of",
                    "Describe a day in the life of", "List the pros and cons of", "Teach a child about"]
_SYNTHETIC_TOPICS = ["the ocean", "prime numbers", "photosynthesis", "the moon", "bread baking", "gravity",
                     "honeybees", "volcanoes", "the printing press", "rainbows", "chess", "glaciers", "magnets"]


@dataclass(frozen=True)
class PromptSet:
    texts: list[str]             # rendered (chat template + generation prompt), as the model sees them
    token_ids: list[list[int]]   # global prompt i is token_ids[i]

    def __len__(self) -> int:
        return len(self.token_ids)


def load_prompts(inference: InferenceConfig, tokenizer) -> PromptSet:
    """The prompts of an enabled inference config (its rules guarantee exactly one source)."""
    if inference.prompts_file is not None:
        conversations = read_prompt_file(inference.prompts_file)
    else:
        conversations = synthetic_prompts(inference.synthetic_prompt_count)
    return render_prompts(conversations, tokenizer, inference.max_prompt_len)


def render_prompts(conversations: list[list[dict[str, str]]], tokenizer, max_prompt_len: int) -> PromptSet:
    texts, token_ids = [], []
    for index, messages in enumerate(conversations):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > max_prompt_len:
            raise DataError(f"prompt {index}: {len(ids)} tokens after the chat template exceed "
                            f"inference.max_prompt_len = {max_prompt_len}")
        texts.append(text)
        token_ids.append(ids)
    return PromptSet(texts=texts, token_ids=token_ids)


def read_prompt_file(url: str) -> list[list[dict[str, str]]]:
    """The conversations of a prompt file, each a message list ending where the assistant should answer."""
    if url.endswith(JSONL_SUFFIXES) or is_parquet(url):
        conversations = [_parse_row(row, source) for source, row in read_rows(url, "prompt file", PROMPT_COLUMNS)]
    else:
        conversations = [[{"role": "user", "content": line}]
                         for line in storage.read_text(url, "prompt file").splitlines() if line.strip()]
    if not conversations:
        raise DataError(f"{url}: the prompt file holds no prompts")
    return conversations


def _parse_row(row: Any, where: str) -> list[dict[str, str]]:
    if isinstance(row, dict):
        present = [name for name in PROMPT_COLUMNS if row.get(name) is not None]
        if present:
            row = row[present[0]]
        else:
            raise DataError(f"{where}: expected `messages` or `prompt`, got keys {sorted(row)}")
    if isinstance(row, str):
        if not row.strip():
            raise DataError(f"{where}: empty prompt")
        return [{"role": "user", "content": row}]
    if isinstance(row, list) and row:
        messages = [_message(message, f"{where}[{i}]") for i, message in enumerate(row)]
        # The model answers the conversation: trailing assistant turns (UltraFeedback's `messages` ends with the
        # answer) are cut, leaving the prompt turns.
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise DataError(f"{where}: the conversation has only assistant turns, no prompt to answer")
        return messages
    raise DataError(f"{where}: a prompt must be a string or a non-empty message list, got {row!r:.80}")


def synthetic_prompts(count: int) -> list[list[dict[str, str]]]:
    """`count` deterministic single-turn chat prompts (the same list on every host and every run)."""
    return [[{"role": "user", "content": f"{_SYNTHETIC_TASKS[i % len(_SYNTHETIC_TASKS)]} "
                                         f"{_SYNTHETIC_TOPICS[i % len(_SYNTHETIC_TOPICS)]}. (#{i})"}]
            for i in range(count)]


def host_shard(num_prompts: int, process_index: int, process_count: int) -> range:
    """The contiguous global prompt indices of one host; sizes differ by at most one, lower hosts larger."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} is outside [0, {process_count})")
    base, extra = divmod(num_prompts, process_count)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))
