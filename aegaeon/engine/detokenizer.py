"""Streaming output text: incremental detokenization and stop-string matching.

Both classes do work proportional to a small window per call (recent tokens, or the longest
stop string plus the new delta), never to the whole output so far.
"""

from __future__ import annotations

from collections.abc import Sequence

from aegaeon.engine.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first generated tokens (vLLM uses 5): some tokenizers
# decode a token differently at the start of a text (SentencePiece drops a leading space).
PROMPT_CONTEXT_TOKENS = 5
# After each emission the window keeps at least this many already emitted tokens as context
# (where a clean start allows), for the same reason: a skipped special token alone is no context.
MIN_PREFIX_TOKENS = 4
# A UTF-8 character has at most 4 bytes, so when this many tokens are pending and the text still
# ends in U+FFFD, most of them are genuinely invalid bytes: look for a safe cut among them so the
# window stays bounded (the cut is verified, so this bound is about cost, not correctness).
MAX_PENDING_TOKENS = 8


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into text deltas for streaming.

    Uses vLLM's prefix/read-offset technique. The window `_window` holds a few already emitted
    tokens (the prefix, up to `_read`) followed by the tokens not yet fully emitted; each step
    decodes only the window and emits the text beyond what was emitted before. Text ending in
    U+FFFD may be a character whose remaining bytes are still to come, so a trailing run of
    U+FFFD is held back until a later token completes it, or until `flush()`.

    The window only ever starts at a "clean" offset (one where earlier read offsets ended on a
    whole character), because byte-fallback tokenizers decode a run of byte tokens as a unit and
    a window starting inside a character would spoil the whole run.

    With a byte-level BPE tokenizer (GPT-2 / Llama-3 / Qwen style) the deltas concatenate to
    exactly `tokenizer.decode(generated_ids, skip_special_tokens)`. SentencePiece-style
    tokenizers decode in the context of the prompt (a first token "▁Hi" gives " Hi", where a
    stand-alone decode gives "Hi"); byte-fallback tokenizers that regroup an already emitted
    character with later invalid bytes may differ from a full decode in their U+FFFDs.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"tokenizer must be an aegaeon Tokenizer, got {type(tokenizer).__name__}")
        if not all(_is_token_id(token_id) for token_id in prompt_token_ids):
            raise ValueError("prompt_token_ids must be a list of non-negative ints")
        self._tokenizer = tokenizer
        self._skip_special_tokens = bool(skip_special_tokens)
        self._window = self._prompt_context(list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]))
        self._read = len(self._window)  # window[:_read] is the prefix: emitted tokens kept as context
        # Offsets in the window where a decode may start; always includes 0 and _read.
        self._clean_offsets = [0, self._read] if self._read else [0]
        self._emitted = len(self._decode(self._window))  # chars of decode(window) already emitted
        self._chunks: list[str] = []
        self._num_generated = 0
        self._flushed = False

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every delta returned)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def num_generated_tokens(self) -> int:
        return self._num_generated

    def add(self, token_id: int) -> str:
        """Append one generated token and return the text it completes (possibly empty)."""
        if self._flushed:
            raise RuntimeError("add() called after flush(); the detokenizer is finished")
        if not _is_token_id(token_id):
            raise ValueError(f"token_id must be a non-negative int, got {token_id!r}")
        self._window.append(token_id)
        self._num_generated += 1
        window_text = self._decode(self._window)
        if not window_text.endswith(REPLACEMENT_CHAR):
            delta = window_text[self._emitted :]
            self._advance(len(self._window), emitted_past_cut=0)
            return self._record(delta)
        # Everything before the trailing U+FFFD run is final: later bytes can only change the run.
        stable_end = len(window_text.rstrip(REPLACEMENT_CHAR))
        delta = window_text[self._emitted : stable_end]
        self._emitted = max(self._emitted, stable_end)
        if len(self._window) - self._read > MAX_PENDING_TOKENS:
            delta += self._cut_invalid_run(window_text)
        return self._record(delta)

    def flush(self) -> str:
        """End of generation: return whatever is held back, invalid bytes (as U+FFFD) included."""
        if self._flushed:
            return ""
        self._flushed = True
        return self._record(self._decode(self._window)[self._emitted :])

    def _prompt_context(self, context: list[int]) -> list[int]:
        """Trim the prompt tail so that it neither starts nor ends inside a character."""
        # Ending inside one: generated bytes must decode on their own, as in decode(generated ids).
        while context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context.pop()
        # Starting inside one would spoil a byte-fallback run that continues into the output.
        while context and self._decode(context).startswith(REPLACEMENT_CHAR):
            context.pop(0)
        return context

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _record(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
        return delta

    def _advance(self, cut: int, emitted_past_cut: int) -> None:
        """Make window[:cut] the prefix and drop tokens no longer needed as context."""
        self._clean_offsets.append(cut)
        # Keep the latest clean start that leaves at least MIN_PREFIX_TOKENS of context.
        start = 0
        for offset in self._clean_offsets:
            if cut - offset >= MIN_PREFIX_TOKENS:
                start = offset
        del self._window[:start]
        self._clean_offsets = [offset - start for offset in self._clean_offsets if offset >= start]
        self._read = cut - start
        self._emitted = len(self._decode(self._window[: self._read])) + emitted_past_cut

    def _cut_invalid_run(self, window_text: str) -> str:
        """Move the read offset past pending tokens that can no longer change; return new text."""
        # A cut is safe when decoding both sides apart gives the same text as decoding them
        # together (no character, nor an invalid run that decodes as one U+FFFD, spans it) and
        # some text follows it: with only skipped special tokens after the cut, later bytes
        # could still complete a character that the cut would split.
        lowest = max(self._read, len(self._window) - 1 - MAX_PENDING_TOKENS)
        for cut in range(len(self._window) - 1, lowest, -1):
            left = self._decode(self._window[:cut])
            right = self._decode(self._window[cut:])
            if right and left + right == window_text:
                delta = window_text[self._emitted : len(left)]
                self._advance(cut, emitted_past_cut=max(0, self._emitted - len(left)))
                return delta
        return ""


class StopStringMatcher:
    """Finds OpenAI `stop` strings in streamed text and cuts the output at the first one.

    The stop occurrence that starts earliest in the whole text wins; among stops starting at
    the same position the shortest wins (it ends first). A tail of the text that could still
    grow into a stop string (or into an earlier-starting one) is held back until decided.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stops, str) or not isinstance(stops, (list, tuple)):
            raise ValueError(f"stops must be a list of strings, got {type(stops).__name__}")
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"each stop must be a non-empty string, got {stop!r}")
        self._stops = tuple(dict.fromkeys(stops))  # dedupe, keep order
        self._max_len = max((len(stop) for stop in self._stops), default=0)
        self._include = bool(include_stop_str_in_output)
        self._pending = ""
        self._matched: str | None = None
        self._finished = False

    @property
    def matched(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._matched

    @property
    def held_back(self) -> str:
        """Text received but not yet emitted because it may begin a stop string."""
        return self._pending

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, whether a stop string was matched)."""
        if not isinstance(delta, str):
            raise ValueError(f"delta must be a string, got {type(delta).__name__}")
        if self._matched is not None:
            return "", True
        if self._finished:
            raise RuntimeError("feed() called after finish()")
        if not self._stops:
            return delta, False
        buffer = self._pending + delta
        match_start, stop = self._earliest_match(buffer)
        hold_from = self._earliest_partial(buffer, end=match_start if stop else len(buffer))
        if hold_from is not None:
            self._pending = buffer[hold_from:]
            return buffer[:hold_from], False
        self._pending = ""
        if stop is None:
            return buffer, False
        return self._stop_at(buffer, match_start, stop), True

    def finish(self) -> str:
        """Generation ended for another reason: release the held-back tail (cut at a stop in it)."""
        if self._finished or self._matched is not None:
            return ""
        self._finished = True
        buffer, self._pending = self._pending, ""
        # The text is final now, so a partial stop can no longer complete; a full one still cuts.
        match_start, stop = self._earliest_match(buffer)
        return buffer if stop is None else self._stop_at(buffer, match_start, stop)

    def _stop_at(self, buffer: str, start: int, stop: str) -> str:
        self._matched = stop
        return buffer[: start + len(stop)] if self._include else buffer[:start]

    def _earliest_match(self, buffer: str) -> tuple[int, str | None]:
        """(start, stop) of the earliest full occurrence in buffer, shortest first on ties."""
        best_start, best_stop = len(buffer), None
        for stop in self._stops:
            start = buffer.find(stop, 0, best_start + len(stop))
            if start == -1:
                continue
            if start < best_start or (best_stop is not None and len(stop) < len(best_stop)):
                best_start, best_stop = start, stop
        return best_start, best_stop

    def _earliest_partial(self, buffer: str, end: int) -> int | None:
        """First index < end where buffer's tail is a proper prefix of some stop, if any."""
        # Only the last max_len - 1 positions can hold a tail shorter than some stop.
        for index in range(max(0, len(buffer) - self._max_len + 1), end):
            tail = buffer[index:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self._stops):
                return index
        return None
