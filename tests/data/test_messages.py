"""check_turns: the one rule on role order (optional system, then user/assistant alternating)."""

from __future__ import annotations

import pytest

from finetune_kit.data.messages import TurnProblem, check_turns


@pytest.mark.parametrize(
    "roles",
    [
        [],
        ["system"],
        ["user"],
        ["user", "assistant"],
        ["system", "user", "assistant", "user"],
        ("system", "user", "assistant", "user", "assistant"),
    ],
)
def test_alternating_roles_pass(roles):
    assert check_turns(roles) is None


@pytest.mark.parametrize(
    ("roles", "index", "turn", "role", "expected"),
    [
        (["assistant"], 0, 0, "assistant", "user"),
        (["system", "assistant"], 1, 0, "assistant", "user"),
        (["user", "user"], 1, 1, "user", "assistant"),
        (["system", "user", "assistant", "assistant"], 3, 2, "assistant", "user"),
        (["system", "system", "user"], 1, 0, "system", "user"),  # only the first message may be the system
        (["user", "system"], 1, 1, "system", "assistant"),
        (["user", None], 1, 1, None, "assistant"),
        (["user", "tool", "user"], 1, 1, "tool", "assistant"),
    ],
)
def test_the_first_bad_message_is_reported(roles, index, turn, role, expected):
    assert check_turns(roles) == TurnProblem(index=index, turn=turn, role=role, expected=expected)


def test_the_problem_reads_as_a_sentence():
    problem = check_turns(["system", "user", "user"])
    assert str(problem) == (
        "message 2 has role 'user' but 'assistant' was expected: after an optional system "
        "message, turns must alternate user, assistant, user, ..."
    )


def test_how_a_conversation_ends_is_left_to_the_caller():
    assert check_turns(["user"]) is None  # a prompt
    assert check_turns(["user", "assistant"]) is None  # a training example
