"""Incremental detokenization and stop-string matching for one sequence."""

from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so leading spaces/merges come out right


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text without ever emitting half a UTF-8 character.

    Text is decoded over a short sliding window ``[prefix, read)`` of ids; new text is released only
    once it no longer ends in the replacement character (an incomplete byte sequence).
    Stop strings are searched in the text across token boundaries; while running, the last
    ``max(len(stop)) - 1`` characters are held back so a partial match is never shown.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.stopped_on: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, final: bool = False, check_stop: bool = True) -> str | None:
        """Feed one token; returns the stop string if one matched (text is then cut there).
        ``check_stop=False`` (before ``min_tokens``): no stop string can end the text yet."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            before = len(self.text)
            self.text += new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return self._check_stop(before) if check_stop else None
        return None

    def flush(self) -> None:
        """At the end of generation release whatever is pending, even an incomplete character."""
        if self.read < len(self.ids):
            prefix_text = self._decode(self.ids[self.prefix:self.read])
            new_text = self._decode(self.ids[self.prefix:])
            if len(new_text) > len(prefix_text):
                self.text += new_text[len(prefix_text):]
            self.prefix = self.read = len(self.ids)

    def _check_stop(self, before: int) -> str | None:
        if not self.stop:
            return None
        start = max(0, before - self.holdback)
        best: tuple[int, str] | None = None
        for s in self.stop:
            p = self.text.find(s, start)
            if p != -1 and (best is None or p < best[0]):
                best = (p, s)
        if best is None:
            return None
        p, s = best
        self.text = self.text[:p + len(s)] if self.include_stop else self.text[:p]
        self.stopped_on = s
        return s

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: everything once finished, else minus the stop-string holdback."""
        if finished or self.stopped_on is not None or not self.holdback:
            return self.text
        return self.text[:max(0, len(self.text) - self.holdback)]
