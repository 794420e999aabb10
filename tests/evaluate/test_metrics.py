"""ROUGE/BLEU follow LLaMA-Factory's ComputeSimilarity: hand-computed cases and a direct re-computation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from finetune_kit.evaluate.metrics import SCORE_KEYS, example_scores, generation_scores, per_example_scores


def f1(overlap: int, n_pred: int, n_label: int) -> float:
    p, r = overlap / n_pred, overlap / n_label
    return round(200 * p * r / (p + r), 4)


def test_identical_strings_score_100_everywhere():
    scores = generation_scores(
        ["亲，我们全国包邮哦", "Orders ship within 48 hours."], ["亲，我们全国包邮哦", "Orders ship within 48 hours."]
    )
    assert scores == {key: 100.0 for key in SCORE_KEYS}


def test_disjoint_strings_score_0_everywhere():
    # no shared word and no shared character, so BLEU's unigram precision is 0 too
    assert generation_scores(["今天天气很好"], ["我买了苹果"]) == {key: 0.0 for key in SCORE_KEYS}


def test_english_partial_overlap_by_hand():
    # words: pred {the, cat, sat}, label {the, cat, ran, away}; unigrams shared: the, cat;
    # bigrams: pred {the cat, cat sat}, label {the cat, cat ran, ran away}; shared: the cat
    scores = example_scores("the cat sat", "the cat ran away")
    assert scores["rouge-1"] == f1(2, 3, 4) == 57.1429
    assert scores["rouge-2"] == f1(1, 2, 3) == 40.0
    assert scores["rouge-l"] == f1(2, 3, 4)  # LCS "the cat"
    assert 0 < scores["bleu-4"] < 100


def test_chinese_partial_overlap_by_hand():
    import jieba

    # the hand computation relies on this segmentation (jieba 0.42 dictionary)
    assert list(jieba.cut("我们包邮")) == ["我们", "包邮"]
    assert list(jieba.cut("我们全国包邮哦")) == ["我们", "全国", "包邮", "哦"]
    scores = example_scores("我们包邮", "我们全国包邮哦")
    assert scores["rouge-1"] == f1(2, 2, 4) == 66.6667  # P = 2/2, R = 2/4
    assert scores["rouge-2"] == 0.0  # "我们 包邮" is not a bigram of the label
    assert scores["rouge-l"] == 66.6667  # LCS 我们 ... 包邮
    assert 0 < scores["bleu-4"] < 100


def test_rouge_is_word_level_and_bleu_character_level():
    # 我喜欢苹果 -> 我/喜欢/苹果 and 我非常喜欢吃香蕉 -> 我/非常/喜欢/吃/香蕉: 2 shared words,
    # P = 2/3, R = 2/5, F = 0.5; character-level scoring would give another number.
    assert example_scores("我喜欢苹果", "我非常喜欢吃香蕉")["rouge-1"] == 50.0


@pytest.mark.parametrize("pred", ["", "   ", "\n"])
def test_empty_prediction_scores_0(pred):
    assert example_scores(pred, "亲，我们全国包邮哦") == {key: 0.0 for key in SCORE_KEYS}


def test_mean_of_per_example_scores():
    preds, labels = ["the cat sat", "我们包邮", ""], ["the cat ran away", "我们全国包邮哦", "abc"]
    rows = per_example_scores(preds, labels)
    assert [r["rouge-1"] for r in rows] == [57.1429, 66.6667, 0.0]
    assert generation_scores(preds, labels)["rouge-1"] == round((57.1429 + 66.6667) / 3, 4)


def _lf_compute_similarity(preds: list[str], labels: list[str]) -> dict[str, float]:
    """LLaMA-Factory's ComputeSimilarity loop, written out against the libraries directly."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    score_dict: dict[str, list[float]] = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(preds, labels, strict=False):
        hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu * 100, 4))
    return {k: float(np.mean(v)) for k, v in score_dict.items()}


def test_equals_llamafactory_recipe_on_real_pairs():
    preds = [
        "亲，我们是星辰小铺，主要卖家居小物。",
        "We ship in 48 hours, free over 99 yuan.",
        "您好！退货请在七天内联系客服。",
        "好的",
        "",
        "Sure. 我们支持7天无理由退货。",
    ]
    labels = [
        "亲，这里是星辰小铺，主营家居小物和数码配件，很高兴为您服务哦。",
        "Orders ship within 48 hours; shipping is free over 99 yuan.",
        "亲，支持七天无理由退货，请联系在线客服办理哦。",
        "好的呢亲",
        "有的",
        "我们支持7天无理由退货哦。",
    ]
    expected = _lf_compute_similarity(preds, labels)
    got = generation_scores(preds, labels)
    assert got.keys() == expected.keys()
    for key in SCORE_KEYS:
        assert got[key] == round(expected[key], 4), key
    assert 0 < got["rouge-1"] < 100 and 0 < got["bleu-4"] < 100


def test_length_mismatch_and_bare_strings_are_rejected():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        generation_scores(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        generation_scores("abc", "abc")
    with pytest.raises(ValueError, match="0 examples"):
        generation_scores([], [])


def test_jieba_start_up_is_silent():
    code = (
        "from finetune_kit.evaluate.metrics import generation_scores\n"
        "print(generation_scores(['我们包邮'], ['我们全国包邮哦'])['rouge-1'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "66.6667"
    assert "prefix dict" not in out.stderr and "Loading model" not in out.stderr, out.stderr


def test_missing_package_names_the_metrics_extra(monkeypatch):
    from finetune_kit.errors import MissingDependencyError
    from finetune_kit.evaluate import metrics

    metrics._backend.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_chinese", None)  # makes `import rouge_chinese` fail
    try:
        with pytest.raises(MissingDependencyError, match=r"rouge-chinese.*finetune-kit\[metrics\]"):
            metrics.require_metrics()
    finally:
        metrics._backend.cache_clear()
