"""Text encoded piece by piece through a ``tokenizers`` tokenizer, the pieces' ids cached
(:class:`PieceCache`), and the fixed special tokens its post-processor adds around a text
(:func:`special_affixes`): the same ids as encoding the whole text, faster for repeated prompts.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from tokenizers import Tokenizer


class PieceCache:
    """Encodes text piece by piece, with an LRU cache of the pieces' ids: chat prompts repeat
    (a shared system prompt, a conversation's earlier turns), and encoding is most of the cost.

    The pieces are the text between the tokenizer's own added tokens (those matched before
    normalization): ``tokenizers`` splits there first (leftmost-longest) and handles each piece on
    its own (normalizer, pre-tokenizer, model), so the pieces' ids joined with the tokens' are the
    whole text's. That holds unless something looks beyond a piece, so the cache is off (plain
    encoding) when an added token strips whitespace or must stand alone as a word, when special
    tokens are encoded as text, or when a pre-tokenizer prepends only to a text's first piece
    (Metaspace ``prepend_scheme: first``). Special tokens the post-processor adds are not
    handled here (see :func:`special_affixes`). Not thread-safe: one thread's cache."""

    def __init__(self, tok: Tokenizer, tokenizer_json: dict, split_special_tokens: bool,
                 max_chars: int = 4_000_000, max_piece_chars: int = 200_000):
        self._tok = tok
        self.max_chars, self.max_piece_chars = max_chars, max_piece_chars
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._chars = 0
        self.hits = self.misses = 0
        self._ids: dict[str, int] = {}
        self._split: re.Pattern | None = None
        added = tokenizer_json.get("added_tokens") or []
        if split_special_tokens or _prepends_first(tokenizer_json.get("pre_tokenizer")):
            return
        if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
            return
        self._ids = {t["content"]: t["id"] for t in added if not t.get("normalized") and t.get("content")}
        if self._ids:  # longest first: at a position the longest token wins, as tokenizers' matcher
            self._split = re.compile("|".join(re.escape(c) for c in sorted(self._ids, key=len, reverse=True)))

    @property
    def enabled(self) -> bool:
        return self._split is not None

    def encode(self, text: str) -> list[int]:
        """``text``'s ids without post-processor tokens (``add_special_tokens=False``)."""
        if self._split is None:
            return self._tok.encode(text, add_special_tokens=False).ids
        out: list[int] = []
        pos = 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                out += self._piece(text[pos:m.start()])
            out.append(self._ids[m.group()])
            pos = m.end()
        if pos < len(text):
            out += self._piece(text[pos:])
        return out

    def _piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is not None:
            self.hits += 1
            self._cache.move_to_end(piece)
            return ids
        self.misses += 1
        ids = self._tok.encode(piece, add_special_tokens=False).ids
        if len(piece) <= self.max_piece_chars:
            self._cache[piece] = ids
            self._chars += len(piece)
            while self._chars > self.max_chars:
                old, _ = self._cache.popitem(last=False)
                self._chars -= len(old)
        return ids


def special_affixes(tok: Tokenizer) -> tuple[list[int], list[int]] | None:
    """The ids a tokenizer's post-processor puts before and after a single text (e.g. BOS), found
    by encoding probes with and without them; None when they are not one fixed prefix and suffix."""
    found = set()
    for probe in ("a", "hello world", "1 2 3"):
        plain = tok.encode(probe, add_special_tokens=False).ids
        full = tok.encode(probe, add_special_tokens=True).ids
        at = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
        if len(at) != 1:
            return None
        found.add((tuple(full[:at[0]]), tuple(full[at[0] + len(plain):])))
    if len(found) != 1:
        return None
    prefix, suffix = found.pop()
    return list(prefix), list(suffix)


def _prepends_first(pre_tokenizer) -> bool:
    """Whether a pre-tokenizer (any nested part) treats a text's first piece unlike the others."""
    if isinstance(pre_tokenizer, dict):
        if pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme", "first") not in (
                "always", "never"):
            return True
        return any(_prepends_first(v) for v in pre_tokenizer.values())
    if isinstance(pre_tokenizer, list):
        return any(_prepends_first(v) for v in pre_tokenizer)
    return False
