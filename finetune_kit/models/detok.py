"""Text of a growing token sequence, piece by piece, without ever showing a stop string.

Decoding the whole sequence at every step costs time that grows with the reply; instead a
sliding window is decoded (the few tokens before the new ones give the tokenizer its context,
e.g. for the leading-space rule of SentencePiece). A piece that ends in half a multi-byte
character (``\\ufffd``) waits for the next token, and a tail that could be the start of a stop
string is held back until the next piece shows what it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalText:
    """Feed token ids with :meth:`push`; it returns the text that may be shown now.

    ``stopped`` turns true once a stop string appeared (the text before it has been returned);
    the caller then ends the sequence. Example::

        text = IncrementalText(tokenizer, stop=["\\n\\n"])
        for token in tokens:
            print(text.push(token), end="")
            if text.stopped:
                break
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True, stop: Sequence[str] = ()) -> None:
        self._tok, self._skip, self._stop = tokenizer, skip_special_tokens, list(stop)
        self._ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are final
        self._read = 0  # tokens whose text is already in self._seen
        self._seen = ""  # all text decoded so far
        self._sent = 0  # how much of self._seen was returned
        self.stopped = False

    @property
    def sent(self) -> str:
        """Everything returned so far."""
        return self._seen[: self._sent]

    def rest(self, final: str) -> str:
        """What the finished reply ``final`` adds to the text returned so far: a held-back tail that
        turned out to start no stop string ("" when ``final`` does not continue it)."""
        sent = self.sent
        return final[len(sent) :] if len(final) > len(sent) and final.startswith(sent) else ""

    def push(self, token: int) -> str:
        """Add one generated token; return the new text that is safe to show (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        before = self._decode(self._prefix, self._read)
        now = self._decode(self._prefix, len(self._ids))
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # no new character yet (a special token skipped, or half a character)
        self._seen += now[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        cut = cut_at_stop(self._seen, self._stop)
        if cut is not None:
            self.stopped = True
            return self._release(max(cut, self._sent))
        return self._release(len(self._seen) - stop_prefix_len(self._seen, self._stop))

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        piece = self._seen[self._sent : upto]
        self._sent = upto
        return piece

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return str(self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip))


def stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


def cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text``, or None."""
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None
