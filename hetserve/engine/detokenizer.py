"""Incremental detokenization with stop strings, for streaming one request's output.

Each step decodes only a short window of the most recent tokens, ``token_ids[window_start:]``, never the
whole sequence. Invariant: the decoded window text, minus any trailing U+FFFD run, only ever grows by
appending as tokens are added (true of byte-level, byte-fallback and metaspace decoders), so the text
past the first ``window_emitted_chars`` characters is exactly what the new tokens added. A trailing
U+FFFD is held back because it is usually a multi-byte character whose remaining bytes are still to
come; it is released when more text follows it or when the request finishes.

Known limit: a byte-fallback decoder turns a whole run of ``<0xNN>`` tokens into U+FFFDs once the run is
not valid UTF-8, including bytes of the run that were valid (and streamed) before; the streamed text then
keeps those characters where a full decode shows U+FFFDs. Models emit valid runs, so this is cosmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

from hetserve.engine.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"
# tokens kept before the read position when the window slides: enough context for decoders whose output
# for a token depends on its neighbours (a leading space stripped from the first token, byte fallback)
_WINDOW_KEEP_TOKENS = 4
# the window is slid once it holds more tokens than this, so a one-token step decodes about this many
_WINDOW_MAX_TOKENS = 12
# how far back into the prompt the first window may reach looking for a clean start
_MAX_PROMPT_CONTEXT_TOKENS = 64


class IncrementalDetokenizer:
    """Turns one request's generated tokens into text as they arrive, and watches for stop strings.

    Stop strings are matched on the generated text only (never the prompt). When several could match,
    the one whose occurrence ends first wins (what a character-by-character stream would see first);
    between occurrences ending at the same character, the one starting first (the longer) wins. So the
    outcome does not depend on how the text was split into tokens.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.stop: list[str] = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        # The prompt's last few tokens give the first output token its context. Go further back while
        # they decode to nothing (skipped special tokens; see _maybe_slide_window) or start with U+FFFD
        # (the window would cut a character, or a byte-fallback run, in two).
        self._window_start = self.num_prompt_tokens
        prompt_tail = ""
        while self._window_start > 0 and self.num_prompt_tokens - self._window_start < _MAX_PROMPT_CONTEXT_TOKENS:
            self._window_start = max(self._window_start - _WINDOW_KEEP_TOKENS, 0)
            prompt_tail = self._decode_window()
            if prompt_tail and not prompt_tail.startswith(_REPLACEMENT_CHAR):
                break
        # a prompt that ends inside a character gets that character completed by the output, so count
        # its replacement char as not yet emitted
        self._window_emitted_chars = len(prompt_tail.rstrip(_REPLACEMENT_CHAR))
        self._output_text = ""
        self._stop_reason: str | None = None
        # characters of the output that may still turn out to start a stop string
        longest_stop_chars = max(map(len, self.stop), default=0)
        self._stop_buffer_chars = 0 if include_stop_str_in_output else max(longest_stop_chars - 1, 0)
        self._last_output_offset = 0
        self._flushed = False

    @property
    def output_text(self) -> str:
        """Generated text so far: no held-back partial character, truncated at a matched stop string."""
        return self._output_text

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def stop_reason(self) -> str | None:
        """The stop string that matched, if one did."""
        return self._stop_reason

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append generated tokens; return the stop string they completed, if any (then stop calling)."""
        if not new_token_ids or self._stop_reason is not None:
            return None
        self.token_ids.extend(new_token_ids)
        window_text = self._decode_window()
        stable_end = len(window_text)
        while stable_end > self._window_emitted_chars and window_text[stable_end - 1] == _REPLACEMENT_CHAR:
            stable_end -= 1
        new_text = window_text[self._window_emitted_chars : stable_end]
        self._window_emitted_chars = max(self._window_emitted_chars, stable_end)
        self._maybe_slide_window(window_text)
        return self._append_text(new_text)

    def flush(self) -> str | None:
        """The request is finished: release a held-back trailing U+FFFD (the bytes really are invalid)."""
        if self._flushed or self._stop_reason is not None:
            return None
        self._flushed = True
        window_text = self._decode_window()
        new_text = window_text[self._window_emitted_chars :]
        self._window_emitted_chars = len(window_text)
        return self._append_text(new_text)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to stream now: the new part (``delta``) or all of it. Until the request is finished, the
        last ``len(longest stop) - 1`` characters are withheld as they may still become a stop string."""
        if finished:
            self.flush()
        done = finished or self._stop_reason is not None
        length = len(self._output_text) if done else max(len(self._output_text) - self._stop_buffer_chars, 0)
        if not delta:
            return self._output_text[:length]
        start = self._last_output_offset
        if length <= start:
            return ""
        self._last_output_offset = length
        return self._output_text[start:length]

    def _decode_window(self) -> str:
        return self._tokenizer.decode(self.token_ids[self._window_start :], self._skip_special_tokens)

    def _maybe_slide_window(self, window_text: str) -> None:
        num_tokens = len(self.token_ids)
        if num_tokens - self._window_start <= _WINDOW_MAX_TOKENS:
            return
        # Ignoring the held-back U+FFFD tails, the new window must decode to a suffix of the current one:
        # that rejects a start that cuts a character (or a byte-fallback run) in two, which decodes to
        # U+FFFDs there. The two may differ only at the start, by characters a decoder strips from a
        # window's first token, and those are emitted already.
        stable = window_text.rstrip(_REPLACEMENT_CHAR)
        lowest_start = max(self._window_start, num_tokens - 2 * _WINDOW_KEEP_TOKENS)
        for start in range(num_tokens - _WINDOW_KEEP_TOKENS, lowest_start, -1):
            candidate = self._tokenizer.decode(self.token_ids[start:], self._skip_special_tokens)
            candidate_stable = candidate.rstrip(_REPLACEMENT_CHAR)
            emitted = self._window_emitted_chars - (len(stable) - len(candidate_stable))
            # an empty window would make the next token its first, and some decoders strip a first
            # token's leading space
            if emitted >= 0 and candidate_stable and stable.endswith(candidate_stable):
                self._window_start = start
                self._window_emitted_chars = emitted
                return

    def _append_text(self, new_text: str) -> str | None:
        if not new_text:
            return None
        old_length = len(self._output_text)
        self._output_text += new_text
        if not self.stop:
            return None
        text = self._output_text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stop:
            # an occurrence that lies wholly in the old text would have been found by an earlier call
            begin = max(old_length - len(stop) + 1, 0)
            index = text.find(stop, begin)
            if index >= 0:
                candidate = (index + len(stop), index, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        if best is None:
            return None
        end, start, stop = best
        self._output_text = text[:end] if self.include_stop_str_in_output else text[:start]
        self._stop_reason = stop
        return stop
