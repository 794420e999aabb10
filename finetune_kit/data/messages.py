"""Chat messages: the ``Message`` type and the one rule on the order of their roles.

Dataset rows (``formats/sharegpt.py``), chat templates (:func:`split_system`) and the
server's requests all accept the same shape: an optional leading system message, then turns
that alternate user, assistant, user, ... :func:`check_turns` is that rule; each caller turns
its answer into its own error (a row error, a template error, an HTTP 400).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finetune_kit.errors import TemplateError

Message = dict[str, str]
"""One chat message: ``{"role": ..., "content": "..."}``.

Roles: ``system`` (first only), ``user``, ``assistant``, and for tool use ``function`` (an
assistant turn holding tool calls as JSON) and ``observation`` (a user-side turn holding tool results).
"""

ASKING = ("user", "observation")
"""Roles that ask for a reply (even turns)."""
ANSWERING = ("assistant", "function")
"""Roles that reply (odd turns)."""


@dataclass(frozen=True)
class TurnProblem:
    """The first message that breaks the turn order, as found by :func:`check_turns`.

    ``index`` counts every message given; ``turn`` counts from the first message after the
    optional leading system message (``turn == index`` when there is none).
    """

    index: int
    turn: int
    role: str | None
    expected: str

    def __str__(self) -> str:
        return (
            f"message {self.index} has role {self.role!r} but {self.expected!r} was expected: after an optional "
            "system message, turns must alternate user, assistant, user, ..."
        )


def check_turns(roles: Sequence[str | None]) -> TurnProblem | None:
    """Check that, after an optional leading ``"system"``, roles alternate ``"user"``, ``"assistant"``, ...

    Tool turns take the same places: ``"observation"`` where a user turn may be, ``"function"``
    where an assistant turn may be.

    Returns None when they do, else the first offending message. Only the order is checked:
    an empty conversation passes, and how it must end (a reply to train on, a question to
    answer) is the caller's rule.

    Example::

        >>> check_turns(["system", "user", "assistant", "user"]) is None
        True
        >>> problem = check_turns(["user", "user"])
        >>> (problem.index, problem.turn, problem.role, problem.expected)
        (1, 1, 'user', 'assistant')
    """
    first = 1 if roles and roles[0] == "system" else 0
    for index in range(first, len(roles)):
        turn = index - first
        allowed = ASKING if turn % 2 == 0 else ANSWERING
        if roles[index] not in allowed:
            return TurnProblem(index=index, turn=turn, role=roles[index], expected=allowed[0])
    return None


def split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """Separate a leading system message from the turns, checking roles alternate."""
    system = None
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    problem = check_turns([msg.get("role") for msg in messages])
    if problem is not None:
        raise TemplateError(
            f"message {problem.turn} has role {problem.role!r} but {problem.expected!r} was expected: after an "
            "optional system message, turns must alternate user, assistant, user, ..."
        )
    return system, turns
