"""Per-row token choice (models/sampling.py) on synthetic logits: OpenAI penalties and logit_bias,
repetition_penalty, top-k/top-p and seeds, checked against their definitions and transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.sampling import NO_EXTRAS, RowSampler, SamplingExtras, choose_tokens

VOCAB = 32
GREEDY = GenerationConfig(do_sample=False)
SAMPLE = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def logits_row(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def adjusted(gen: GenerationConfig, extras: SamplingExtras, row: torch.Tensor, prompt, generated) -> torch.Tensor:
    return RowSampler(gen, extras, "cpu").adjust(row.clone(), prompt, generated)


# ----- presence / frequency penalty --------------------------------------------------------------------------
@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.25), (2.0, 0.0), (0.0, 1.5), (-1.0, -0.5)])
def test_penalties_lower_generated_tokens_by_presence_plus_frequency_times_count(presence, frequency):
    row = logits_row()
    prompt, generated = [7, 8, 3], [3, 3, 5, 3, 9, 5]
    extras = SamplingExtras(presence_penalty=presence, frequency_penalty=frequency)
    got = adjusted(GREEDY, extras, row, prompt, generated)
    expected = row.clone()
    for token in set(generated):
        expected[token] -= presence + frequency * generated.count(token)
    torch.testing.assert_close(got, expected)
    untouched = [t for t in range(VOCAB) if t not in generated]
    assert torch.equal(got[untouched], row[untouched])  # prompt tokens (7, 8) do not count


def test_penalties_do_nothing_before_the_first_generated_token():
    row = logits_row(1)
    got = adjusted(GREEDY, SamplingExtras(presence_penalty=2.0, frequency_penalty=2.0), row, [1, 2, 3], [])
    assert torch.equal(got, row)


def test_frequency_penalty_changes_the_greedy_choice():
    row = torch.zeros(VOCAB)
    row[4], row[6] = 5.0, 4.0
    sampler = RowSampler(GREEDY, SamplingExtras(frequency_penalty=0.6), "cpu")
    assert choose_tokens(row[None], [sampler], [[]], [[4]]) == [4]  # 5 - 0.6 > 4
    assert choose_tokens(row[None], [sampler], [[]], [[4, 4]]) == [6]  # 5 - 1.2 < 4


# ----- logit_bias ------------------------------------------------------------------------------------------
def test_logit_bias_adds_its_value():
    row = logits_row(2)
    bias = {3: 1.5, 10: -2.25, 31: 100.0}
    got = adjusted(GREEDY, SamplingExtras(logit_bias=bias), row, [], [])
    expected = row.clone()
    for token, value in bias.items():
        expected[token] += value
    torch.testing.assert_close(got, expected)


def test_logit_bias_minus_100_bans_and_plus_100_forces_a_token():
    row = logits_row(3)
    top = int(row.argmax())
    low = int(row.argmin())
    banned = RowSampler(GREEDY, SamplingExtras(logit_bias={top: -100}), "cpu")
    forced = RowSampler(GREEDY, SamplingExtras(logit_bias={low: 100}), "cpu")
    second = int(row.topk(2).indices[1])
    assert choose_tokens(torch.stack([row, row]), [banned, forced], [[], []], [[], []]) == [second, low]
    # sampling: a banned token is never drawn, a forced one always is
    for seed in range(20):
        ban_s = RowSampler(SAMPLE, SamplingExtras(seed=seed, logit_bias={t: -100 for t in range(VOCAB - 1)}), "cpu")
        force_s = RowSampler(SAMPLE, SamplingExtras(seed=seed, logit_bias={low: 100}), "cpu")
        assert choose_tokens(torch.stack([row, row]), [ban_s, force_s], [[], []], [[], []]) == [VOCAB - 1, low]


def test_logit_bias_beyond_the_vocabulary_is_ignored():
    row = logits_row(4)
    got = adjusted(GREEDY, SamplingExtras(logit_bias={VOCAB + 5: 50.0, 0: 1.0}), row, [], [])
    expected = row.clone()
    expected[0] += 1.0
    torch.testing.assert_close(got, expected)


def test_a_negative_token_id_in_logit_bias_is_refused():
    # torch indexing would read -1 as the last token of the vocabulary and bias that one
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingExtras(logit_bias={-1: 100.0})


# ----- repetition_penalty -------------------------------------------------------------------------------------
@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    row = logits_row(5)
    prompt, generated = [1, 2, 2, 30], [5, 1, 17, 17]
    got = adjusted(GenerationConfig(do_sample=False, repetition_penalty=penalty), NO_EXTRAS, row, prompt, generated)
    ids = torch.tensor([prompt + generated])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, row.clone()[None])[0]
    torch.testing.assert_close(got, expected)


# ----- temperature, top-k, top-p --------------------------------------------------------------------------------
def sampled_probs(monkeypatch, gen: GenerationConfig, row: torch.Tensor) -> torch.Tensor:
    """The probabilities RowSampler.pick draws from (torch.multinomial's input)."""
    seen: list[torch.Tensor] = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.clone())
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    RowSampler(gen, SamplingExtras(seed=0), "cpu").pick(row.clone())
    monkeypatch.setattr(torch, "multinomial", real)
    assert len(seen) == 1
    return seen[0]


def hf_scores(gen: GenerationConfig, row: torch.Tensor) -> torch.Tensor:
    scores, ids = row.clone()[None], torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(gen.temperature)(ids, scores)
    if gen.top_k > 0:
        scores = TopKLogitsWarper(gen.top_k)(ids, scores)
    if gen.top_p < 1.0:
        scores = TopPLogitsWarper(gen.top_p)(ids, scores)
    return scores[0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 5, 1.0), (1.0, 1, 1.0), (0.7, 0, 0.5), (1.0, 0, 0.9), (1.3, 10, 0.8), (0.5, 50, 0.3), (1, VOCAB - 1, 0.99)],
)
def test_top_k_and_top_p_keep_the_tokens_transformers_keeps(monkeypatch, seed, temperature, top_k, top_p):
    row = logits_row(100 + seed)
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    probs = sampled_probs(monkeypatch, gen, row)
    expected = hf_scores(gen, row)
    kept = set(torch.nonzero(probs > 0).flatten().tolist())
    assert kept == set(torch.nonzero(torch.isfinite(expected)).flatten().tolist())
    torch.testing.assert_close(probs, expected.softmax(-1))


def test_top_p_keeps_the_most_likely_token_even_when_it_alone_exceeds_the_mass():
    row = torch.full((VOCAB,), -5.0)
    row[9] = 10.0
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=0.1)
    for seed in range(5):
        assert RowSampler(gen, SamplingExtras(seed=seed), "cpu").pick(row.clone()) == 9


# ----- seeds and the batch -------------------------------------------------------------------------------------
def draws(seed: int | None, n: int = 30) -> list[int]:
    row = torch.zeros(VOCAB)  # uniform: every draw is up to the generator
    sampler = RowSampler(SAMPLE, SamplingExtras(seed=seed), "cpu")
    return [sampler.pick(row.clone()) for _ in range(n)]


def test_the_same_seed_draws_the_same_tokens_and_another_seed_does_not():
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    torch.manual_seed(0)
    unseeded = draws(None)
    torch.manual_seed(0)
    assert draws(None) == unseeded  # an unseeded row uses torch's global generator
    assert RowSampler(GREEDY, SamplingExtras(seed=3), "cpu").generator is None  # greedy needs no generator


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    rows = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(9))
    alone = RowSampler(SAMPLE, SamplingExtras(seed=11), "cpu")
    expected = [choose_tokens(rows[1:2], [alone], [[]], [[]])[0] for _ in range(10)]
    mates = [
        RowSampler(SAMPLE, SamplingExtras(seed=1), "cpu"),
        RowSampler(SAMPLE, SamplingExtras(seed=11), "cpu"),
        RowSampler(GREEDY, NO_EXTRAS, "cpu"),
    ]
    got = [choose_tokens(rows, mates, [[], [], []], [[], [], []])[1] for _ in range(10)]
    assert got == expected


def test_choose_tokens_mixes_plain_greedy_and_adjusted_rows_without_touching_the_logits():
    rows = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(12))
    before = rows.clone()
    top = rows.argmax(-1).tolist()
    samplers = [
        RowSampler(GREEDY, NO_EXTRAS, "cpu"),
        RowSampler(GREEDY, SamplingExtras(logit_bias={top[1]: -100}), "cpu"),
        RowSampler(GREEDY, NO_EXTRAS, "cpu"),
        RowSampler(GenerationConfig(do_sample=False, repetition_penalty=1.5), NO_EXTRAS, "cpu"),
    ]
    assert [s.plain_greedy for s in samplers] == [True, False, True, False]
    picks = choose_tokens(rows, samplers, [[], [], [], [top[3]]], [[], [], [], []])
    assert picks[0] == top[0] and picks[2] == top[2]
    assert picks[1] == int(rows[1].topk(2).indices[1])
    penalized = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[top[3]]]), rows[3:4].clone())[0]
    assert picks[3] == int(penalized.argmax())
    assert torch.equal(rows, before)


def test_plain_greedy_only_without_adjustments():
    assert RowSampler(GREEDY, NO_EXTRAS, "cpu").plain_greedy
    assert RowSampler(GenerationConfig(do_sample=True, temperature=0.0), NO_EXTRAS, "cpu").plain_greedy
    assert not RowSampler(GREEDY, SamplingExtras(presence_penalty=0.1), "cpu").plain_greedy
    assert not RowSampler(GREEDY, SamplingExtras(logit_bias={1: 1.0}), "cpu").plain_greedy
    assert not RowSampler(GenerationConfig(do_sample=False, repetition_penalty=1.1), NO_EXTRAS, "cpu").plain_greedy
    assert not RowSampler(SAMPLE, NO_EXTRAS, "cpu").plain_greedy


# ----- SamplingExtras validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"presence_penalty": 2.5}, ["presence_penalty", "2.5", "-2.0 to 2.0"]),
        ({"presence_penalty": -2.01}, ["presence_penalty", "-2.01", "-2.0 to 2.0"]),
        ({"frequency_penalty": 3.0}, ["frequency_penalty", "3.0", "-2.0 to 2.0"]),
        ({"frequency_penalty": float("nan")}, ["frequency_penalty", "nan"]),
        ({"logit_bias": {5: 100.5}}, ["logit_bias[5]", "100.5", "-100 to 100"]),
        ({"logit_bias": {7: -101}}, ["logit_bias[7]", "-101", "-100 to 100"]),
    ],
)
def test_sampling_extras_out_of_range_says_the_field_the_value_and_the_range(kwargs, words):
    with pytest.raises(ValueError) as info:
        SamplingExtras(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_sampling_extras_accepts_the_bounds():
    extras = SamplingExtras(seed=0, presence_penalty=-2.0, frequency_penalty=2.0, logit_bias={0: -100, 1: 100})
    assert extras.penalizes
    assert not NO_EXTRAS.penalizes and NO_EXTRAS == SamplingExtras()
