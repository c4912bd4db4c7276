"""Preference pairs from UltraFeedback-binarized style files, batched for the train step.

Files: JSONL / JSONL.gz, or Parquet in the layout UltraFeedback-binarized is published in (columns `prompt`,
`chosen`, `rejected`, plus `prompt_id`, `messages`, `score_chosen`, `score_rejected`, which are not read); local
or any fsspec URL (records.py). A row is `{"prompt": ..., "chosen": ..., "rejected": ...}` where chosen/rejected
are either message lists ending in the assistant's answer (`[{"role": "user", ...}, {"role": "assistant", ...}]`,
the binarized form) or plain answer strings, with `prompt` a string or a message list. The conversation before the
answer is rendered with the model's chat template (add_generation_prompt), the answer as the rest of the rendered
conversation, and only answer tokens carry loss weight.

Order and sharding: epoch e visits rows in a permutation drawn from (seed, e); batch k holds global rows
k*B .. (k+1)*B-1 of that endless sequence. The position (batches consumed) is part of the training state, so a
resumed run continues with the next batch. Each host tokenizes only its own rows of every global batch.
Held-out pairs are read once, in file order (`held_out_batch`): the last batch is filled up with padding rows.

All rows are parsed and checked when the data is opened (so a bad row fails the run before step 1, on every host
alike); tokenization, and with it the overlength policy, happens per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from simpo_worker.contract.config import DataConfig
from simpo_worker.contract.errors import DataError
from simpo_worker.data.records import read_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreferencePair:
    source: str  # "file:line" or "file: row N", for error messages
    context: list[dict[str, str]]  # the messages before the answer
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PreferenceBatch:
    """This host's rows of one global batch. tokens/loss_mask [b, 2, T] (0 chosen, 1 rejected), lengths [b, 2];
    pair_mask [b]: 1 for a pair, 0 for a padding row (no tokens, no loss weight)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    pair_mask: np.ndarray


# The columns a pair is made of (a Parquet file's others are not read).
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def expand_patterns(patterns: list[str]) -> list[str]:
    """Files matching the globs (local or any fsspec URL), sorted per pattern; an empty match is an error."""
    files = []
    for pattern in patterns:
        fs, _, paths = fsspec.core.get_fs_token_paths(pattern)
        if not paths:
            raise DataError(f"{pattern}: no preference data files match")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        files += sorted(path if protocol in ("file", "local") else f"{protocol}://{path}" for path in paths)
    return files


def read_pairs(patterns: list[str]) -> list[PreferencePair]:
    pairs = []
    for file in expand_patterns(patterns):
        for source, row in read_rows(file, "preference data file", PAIR_COLUMNS):
            pairs.append(parse_row(row, source))
    if not pairs:
        raise DataError(f"{', '.join(patterns)}: the preference data holds no rows")
    return pairs


def parse_row(row: Any, source: str) -> PreferencePair:
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(row).__name__}")
    for name in ("chosen", "rejected"):
        if name not in row:
            raise DataError(f"{source}: missing field `{name}`")
    chosen_context, chosen = _split_answer(row["chosen"], row.get("prompt"), f"{source}: `chosen`")
    rejected_context, rejected = _split_answer(row["rejected"], row.get("prompt"), f"{source}: `rejected`")
    if chosen_context != rejected_context:
        raise DataError(f"{source}: `chosen` and `rejected` answer different conversations")
    return PreferencePair(source=source, context=chosen_context, chosen=chosen, rejected=rejected)


def _split_answer(value: Any, prompt: Any, where: str) -> tuple[list[dict[str, str]], str]:
    """(context messages, answer text) from a message list ending in the answer, or a string plus `prompt`."""
    if isinstance(value, str):
        context, answer = _prompt_messages(prompt, where), value
    elif isinstance(value, list) and value:
        messages = [_message(m, f"{where}[{i}]") for i, m in enumerate(value)]
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer, "
                            f"got role {messages[-1]['role']!r}")
        context, answer = messages[:-1], messages[-1]["content"]
        if not context:
            context = _prompt_messages(prompt, where)
    else:
        raise DataError(f"{where}: expected a non-empty message list or a string, got {value!r:.80}")
    if not answer.strip():
        raise DataError(f"{where}: empty response")
    return context, answer


def _prompt_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    if prompt is None:
        raise DataError(f"{where}: missing field `prompt` (the answer has no conversation before it)")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: empty `prompt`")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return [_message(m, f"{where}: prompt[{i}]") for i, m in enumerate(prompt)]
    raise DataError(f"{where}: `prompt` must be a string or a non-empty message list, got {prompt!r:.80}")


def _message(value: Any, where: str) -> dict[str, str]:
    if not (isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)):
        raise DataError(f"{where}: a message needs string `role` and `content`, got {value!r:.80}")
    return {"role": value["role"], "content": value["content"]}


class PreferenceData:
    """Deterministically ordered, host-sharded batches of tokenized preference pairs."""

    def __init__(self, config: DataConfig, tokenizer, files: list[str], batch_size: int, seed: int):
        self.config, self.tokenizer = config, tokenizer
        self.pairs = read_pairs(files)
        self.batch_size, self.seed = batch_size, seed
        self._permutations: dict[int, np.ndarray] = {}

    def global_rows(self, position: int) -> np.ndarray:
        """Row numbers of global batch `position` (an endless sequence of per-epoch permutations)."""
        n = len(self.pairs)
        flat = np.arange(position * self.batch_size, (position + 1) * self.batch_size)
        return np.array([self._permutation(i // n)[i % n] for i in flat])

    def batch(self, position: int, rows: np.ndarray) -> PreferenceBatch:
        """Rows `rows` (indices into the global batch: this host's part) of global batch `position`."""
        return self._tokenize(self.global_rows(position)[rows])

    def held_out_batch(self, first: int, rows: np.ndarray) -> PreferenceBatch:
        """Pairs `first + rows` in file order (held-out evaluation: every pair once, no shuffling); a number past
        the last pair gives a padding row."""
        return self._tokenize(first + np.asarray(rows))

    def _tokenize(self, selected: np.ndarray) -> PreferenceBatch:
        """The pairs numbered `selected`; a number past the last pair gives a padding row."""
        length = self.config.max_seq_len
        tokens = np.full((len(selected), 2, length), self.tokenizer.pad_token_id, np.int32)
        loss_mask = np.zeros((len(selected), 2, length), np.float32)
        lengths = np.zeros((len(selected), 2), np.int32)
        pair_mask = np.zeros(len(selected), np.float32)
        for i, row in enumerate(selected):
            if row >= len(self.pairs):
                continue
            pair = self.pairs[row]
            pair_mask[i] = 1.0
            for j, answer in enumerate((pair.chosen, pair.rejected)):
                ids, mask = self.encode(pair, answer)
                tokens[i, j, :len(ids)], loss_mask[i, j, :len(ids)], lengths[i, j] = ids, mask, len(ids)
        return PreferenceBatch(tokens=tokens, loss_mask=loss_mask, lengths=lengths, pair_mask=pair_mask)

    def encode(self, pair: PreferencePair, answer: str) -> tuple[list[int], list[float]]:
        """Token ids of context + answer and the loss mask (1 on answer tokens)."""
        template = self.tokenizer.apply_chat_template
        prompt_text = template(pair.context, add_generation_prompt=True)
        full_text = template(pair.context + [{"role": "assistant", "content": answer}])
        if not full_text.startswith(prompt_text):
            raise DataError(f"{pair.source}: the chat template does not render the conversation as a prefix of "
                            f"the answered conversation; cannot separate the response tokens")
        prompt_ids = self.tokenizer.encode(prompt_text, add_special_tokens=False)
        answer_ids = self.tokenizer.encode(full_text[len(prompt_text):], add_special_tokens=False)
        limit = self.config.max_seq_len
        if len(prompt_ids) + len(answer_ids) > limit:
            where = (f"{pair.source}: {len(prompt_ids)} prompt + {len(answer_ids)} response tokens exceed "
                     f"data.max_seq_len = {limit}")
            if self.config.overlength == "error":
                raise DataError(f"{where} (data.overlength: error)")
            # Keep the whole response and at least one prompt token to condition its first token on.
            if len(answer_ids) >= limit:
                raise DataError(f"{where}: the response alone does not fit, even with the prompt truncated")
            log.warning("%s (data.overlength: truncate_prompt): prompt cut from the left", where)
            prompt_ids = prompt_ids[len(prompt_ids) + len(answer_ids) - limit:]
        ids = prompt_ids + answer_ids
        return ids, [0.0] * len(prompt_ids) + [1.0] * len(answer_ids)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return self._permutations[epoch]
