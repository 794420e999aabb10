"""Template slots: the pieces a chat template lays a message out with.

A slot is a tuple of text pieces (``{{content}}`` marks where the message goes) and single
tokens (:data:`BOS`, :data:`EOS` or a named token), as LLaMA-Factory writes its templates.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Special:
    """A slot element that is one token: the tokenizer's ``bos``/``eos``, or a named token."""

    kind: str  # "bos", "eos" or "token"
    token: str = ""


BOS = Special("bos")
EOS = Special("eos")
Slot = tuple[str | Special, ...]
"""A message's layout: text pieces (``{{content}}`` marks the message) and single tokens."""

THOUGHT = ("<think>\n", "\n</think>\n\n")
TOOL_CALL = ("<tool_call>", "</tool_call>")


def fill(slot: Slot, **values: str) -> list[str | Special]:
    """The slot with ``{{name}}`` placeholders replaced (each once, as LLaMA-Factory does)."""
    out: list[str | Special] = []
    for piece in slot:
        if isinstance(piece, str):
            for key, value in values.items():
                piece = piece.replace("{{" + key + "}}", value, 1)
        out.append(piece)
    return out
