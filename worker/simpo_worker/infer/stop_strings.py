"""Stop strings (inference.stop_tokens): where a row's generated text first contains one of them.

The text is the one written to the outputs: the generated tokens decoded with special tokens left out. A row stops
at the first token after which its text contains a stop string; its completion text is the shortest prefix that
contains one, so it ends with the stop string (vLLM's include_stop_str_in_output). The token ids keep the token
that completed the stop string (as HF generate's stop_strings), whose text may run past it.

Each token is decoded once, as it comes (the tokenizer's StreamDecoder, so a character split across tokens is
whole), and only the last few characters are searched: a stop string that ends in the new text starts at most
len(stop) - 1 characters before it, which also finds one spanning several tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from simpo_worker.data.tokenizer import Tokenizer


class StopStringMatcher:
    """One row's text, fed token by token, until it contains one of `stop_strings` (none empty)."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Iterable[str]):
        self._stop_strings = tuple(stop_strings)
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        # The text before a new piece that a stop string ending in that piece can start in.
        self._tail_length = max(map(len, self._stop_strings)) - 1
        self._tail = ""
        self._length = 0  # characters of text so far
        self.tokens = 0  # tokens fed
        # Once a stop string has appeared: the end of the first one in the text (the completion text's length).
        self.text_end: Optional[int] = None

    def feed(self, token_ids: Iterable[int]) -> bool:
        """Feed the row's next tokens, up to the one that completes a stop string (the rest are not taken);
        True once one has appeared. `tokens` then counts the tokens the row keeps."""
        for token_id in token_ids:
            if self.text_end is not None:
                break
            self.tokens += 1
            piece = self._decoder.add(token_id)
            if not piece:
                continue
            window = self._tail + piece
            # Occurrences ending inside `piece` only: one ending earlier would have stopped the row already.
            ends = [start + len(stop) for stop in self._stop_strings
                    if (start := window.find(stop, max(0, len(self._tail) - len(stop) + 1))) >= 0]
            if ends:
                self.text_end = self._length - len(self._tail) + min(ends)
            self._length += len(piece)
            self._tail = window[max(0, len(window) - self._tail_length):]
        return self.text_end is not None
