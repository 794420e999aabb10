"""Mixing datasets: LLaMA-Factory's mix_strategy and interleave_probs, row order included."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_kit.data.conversations import Conversations, Example
from finetune_kit.data.mix import check_probs, interleave_order, mix
from finetune_kit.errors import ConfigError, DatasetError


def part(name: str, n: int, skipped: int = 0) -> Conversations:
    examples = tuple(
        Example(
            ({"role": "user", "content": f"{name} q{i}"}, {"role": "assistant", "content": f"{name} a{i}"}),
            f"{name}.json, row {i}",
        )
        for i in range(n)
    )
    return Conversations(examples, (name,), skipped)


def labels(conversations: Conversations) -> list[str]:
    return [ex.label for ex in conversations]


def reference_order(lengths: list[int], probs: list[float], seed: int, *, until_all: bool) -> list[int]:
    """datasets 4.0's interleaving loop (the version LLaMA-Factory 0.9.5 pins), written out."""
    offsets = np.cumsum([0, *lengths[:-1]])
    exhausted = [False] * len(lengths)
    current = [0] * len(lengths)
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while True:
        for source in (int(i) for i in rng.choice(len(lengths), size=1000, p=probs)):
            if (all if until_all else any)(exhausted):
                return out
            out.append(int(current[source] + offsets[source]))
            current[source] += 1
            if current[source] >= lengths[source]:
                exhausted[source] = True
                current[source] = 0


def test_concat_puts_datasets_one_after_the_other():
    mixed = mix([part("a", 2, skipped=1), part("b", 3, skipped=2)])
    assert labels(mixed) == ["a a0", "a a1", "b a0", "b a1", "b a2"]
    assert mixed.names == ("a", "b")
    assert mixed.skipped == 3


def test_interleave_under_takes_turns_until_the_shortest_runs_out():
    mixed = mix([part("a", 2), part("b", 4)], "interleave_under")
    assert labels(mixed) == ["a a0", "b a0", "a a1", "b a1"]


def test_interleave_over_repeats_the_shorter_until_every_dataset_is_used_up():
    mixed = mix([part("a", 2), part("b", 3)], "interleave_over")
    assert labels(mixed) == ["a a0", "b a0", "a a1", "b a1", "a a0", "b a2"]


@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over"])
@pytest.mark.parametrize("seed", [42, 7])
def test_probabilities_draw_rows_in_llamafactorys_order(strategy, seed):
    lengths, probs = [30, 50, 20], [0.5, 0.2, 0.3]
    got = interleave_order(
        lengths, "all_exhausted" if strategy == "interleave_over" else "first_exhausted", probs, seed
    )
    assert got == reference_order(lengths, probs, seed, until_all=strategy == "interleave_over")
    parts = [part("a", 30), part("b", 50), part("c", 20)]
    flat = [ex for p in parts for ex in p]
    assert list(mix(parts, strategy, probs, seed=seed)) == [flat[i] for i in got]


def test_the_seed_decides_the_order():
    parts = [part("a", 40), part("b", 40)]
    one = labels(mix(parts, "interleave_under", [0.5, 0.5], seed=1))
    assert one == labels(mix(parts, "interleave_under", [0.5, 0.5], seed=1))
    assert one != labels(mix(parts, "interleave_under", [0.5, 0.5], seed=2))


def test_a_zero_probability_dataset_is_left_out_when_undersampling():
    mixed = mix([part("a", 5), part("b", 5)], "interleave_under", [1.0, 0.0])
    assert labels(mixed) == [f"a a{i}" for i in range(5)]


def test_one_dataset_is_returned_as_it_is():
    only = part("a", 3)
    assert mix([only], "interleave_over", [1.0]) is only


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        mix([part("a", 2), part("b", 2)], "concat", [0.5, 0.3, 0.4])
    problems = "\n".join(err.value.problems)
    assert "only applies to interleaved mixing" in problems and "mix_strategy: interleave_under" in problems
    assert "3 value(s)" in problems and "for 2 dataset(s)" in problems
    assert "sum to 1.2, not 1" in problems
    assert len(err.value.problems) == 3


@pytest.mark.parametrize(
    ("strategy", "probs", "message"),
    [
        ("interleave", None, "mix_strategy='interleave' is not supported"),
        ("interleave_under", [1.5, -0.5], "negative or invalid values [-0.5]"),
        ("interleave_over", [1.0, 0.0], "could never use it up"),
        ("interleave_under", [0.5, 0.4], "sum to 0.9, not 1"),
    ],
)
def test_bad_mixing_arguments_say_how_to_fix_them(strategy, probs, message):
    with pytest.raises(ConfigError, match="Invalid dataset mixing") as err:
        mix([part("a", 2), part("b", 2)], strategy, probs)
    assert message in str(err.value)
    assert "Fix:" in str(err.value)


def test_check_probs_returns_floats_or_none():
    assert check_probs(2, "interleave_under", [0.25, 0.75]) == [0.25, 0.75]
    assert check_probs(2, "interleave_under", None) is None
    assert check_probs(3, "interleave_over", ["0.2", "0.3", "0.5"]) == [0.2, 0.3, 0.5]  # type: ignore[list-item]


def test_an_empty_dataset_cannot_be_interleaved():
    with pytest.raises(DatasetError, match=r"part\(s\) \[1\] have no examples"):
        mix([part("a", 2), Conversations((), ("b",))], "interleave_under")
    assert len(mix([part("a", 2), Conversations((), ("b",))])) == 2
