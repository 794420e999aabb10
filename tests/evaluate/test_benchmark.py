"""Evaluator.benchmark: MMLU/CMMLU/C-Eval files in their released layouts, LLaMA-Factory's and
lm-evaluation-harness's prompts and scorings, aggregation, results files, errors and ``finetune-kit eval``.

The question sets under ``benchmarks/`` are our own, written in each benchmark's exact file layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune_kit.cli.main import main
from finetune_kit.errors import ConfigError, DatasetError, DatasetRowError, OutputExistsError, UnknownKeysError
from finetune_kit.evaluate import BenchmarkConfig, BenchmarkPrediction, BenchmarkResult, Evaluator
from finetune_kit.evaluate.benchmark_data import (
    LfShuffler,
    find_subjects,
    harness_context,
    lf_messages,
    locate,
    read_questions,
    resolve_task,
)
from finetune_kit.evaluate.benchmark_scoring import encode_pair, letter_token_ids

BENCH = Path(__file__).parent / "benchmarks"


def questions(task: str, subject: str, folder: str | None = None):
    spec, split = resolve_task(task, None)
    folder = folder or spec.folders[split]
    return read_questions(spec, locate(spec, BENCH, folder), folder, subject)


# ------------------------------------------------------------------ reading the released layouts
def test_each_layout_reads_its_subjects_in_llamafactory_order():
    cases = {"mmlu": (14, ["astronomy", "high_school_geography", "nutrition"]), "cmmlu": (13, None), "ceval": (7, None)}
    for task, (total, order) in cases.items():
        spec, split = resolve_task(task, None)
        root = locate(spec, BENCH, spec.folders[split])
        subjects = find_subjects(spec, root, spec.folders[split], None)
        assert subjects == [s for s in spec.subjects if s in subjects]  # mapping order, not file order
        assert order is None or subjects == order
        assert sum(len(read_questions(spec, root, spec.folders[split], s)) for s in subjects) == total
    assert locate(*resolve_task("mmlu", None)[:1], BENCH, "test") == BENCH / "mmlu" / "data"
    assert resolve_task("ceval", None)[1] == "validation"


def test_quoted_commas_line_breaks_and_the_cmmlu_row_number_column():
    astronomy = questions("mmlu", "astronomy")
    assert astronomy[0].question.startswith("How many planets orbit the Sun in the Solar System, as counted")
    assert "\n(Pick the most compact outcome.)" in astronomy[3].question
    assert astronomy[3].answer == "D" and astronomy[0].choices == ("7", "8", "9", "10")
    history = questions("cmmlu", "chinese_history")
    assert history[0].question == "中国历史上第一个统一的中央集权国家是哪个？" and history[0].choices[1] == "秦朝"
    network = questions("ceval", "computer_network", "dev")  # dev has an explanation column too
    assert network[0].answer == "C" and network[0].choices[2] == "网络层"


@pytest.mark.parametrize(
    ("task", "split", "expected"),
    [
        ("mmlu", None, ("mmlu", "test")),
        ("MMLU_test", None, ("mmlu", "test")),
        ("mmlu_validation", None, ("mmlu", "validation")),
        ("mmlu", "val", ("mmlu", "validation")),
        ("cmmlu_test", None, ("cmmlu", "test")),
        ("ceval_validation", "validation", ("ceval", "validation")),
    ],
)
def test_task_names(task, split, expected):
    spec, chosen = resolve_task(task, split)
    assert (spec.name, chosen) == expected


@pytest.mark.parametrize(
    ("task", "split", "message"),
    [
        ("mmlux", None, "Did you mean 'mmlu'"),
        ("ceval_test", None, "keeps its test answers private"),
        ("cmmlu_validation", None, "CMMLU has no 'validation' split"),
        ("mmlu_test", "validation", "give the split once"),
    ],
)
def test_bad_task_names(task, split, message):
    with pytest.raises(ConfigError, match=message):
        resolve_task(task, split)


# ------------------------------------------------------------------ prompts
def test_llamafactory_prompt_in_english_with_the_fewshot_template(tiny_llama):
    from finetune_kit.data.templates import get_template

    q, dev = questions("mmlu", "nutrition")[0], questions("mmlu", "nutrition", "dev")
    messages = lf_messages(q, dev[:1], "nutrition", "en")
    ids = get_template("fewshot").encode_oneturn(tiny_llama.tokenizer, messages)[0]
    assert tiny_llama.tokenizer.decode(ids) == (
        "The following are multiple choice questions (with answers) about nutrition.\n\n"
        "Which nutrient is the body's main source of quick energy?\nA. Carbohydrates\nB. Vitamin C\nC. Calcium\n"
        "D. Water\nAnswer:A\n\n"
        "A lack of iron in the diet can lead to which condition?\nA. Scurvy\nB. Anaemia\nC. Rickets\nD. Goitre\n"
        "Answer:"
    )
    assert messages[-1] == {"role": "assistant", "content": "B"}  # the gold answer, left out of the prompt


def test_llamafactory_prompt_in_chinese_as_chat_turns(tiny_llama):
    q = questions("cmmlu", "agronomy")[1]
    prompt = tiny_llama.render_prompt(lf_messages(q, [], "农学", "zh")[:-1])
    assert prompt == (
        "<|im_start|>user\n以下是中国关于农学考试的单项选择题，请选出其中的正确答案。\n\n"
        "下列哪种动物是传粉昆虫？\nA. 蜜蜂\nB. 蚯蚓\nC. 蜗牛\nD. 青蛙\n答案：<|im_end|>\n<|im_start|>assistant\n"
    )


def test_harness_prompts_take_the_first_dev_questions():
    spec, _ = resolve_task("mmlu", None)
    q, dev = questions("mmlu", "astronomy")[1], questions("mmlu", "astronomy", "dev")
    assert harness_context(q, dev[:2], spec, "astronomy", "en") == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
        "What is the name of the galaxy that contains the Solar System?\nA. Andromeda\nB. Triangulum\n"
        "C. The Milky Way\nD. Sombrero\nAnswer: C\n\n"
        "Which force keeps the Moon in orbit around Earth?\nA. Magnetism\nB. Friction\nC. Gravity\n"
        "D. The strong force\nAnswer:"
    )
    cmmlu, ceval = resolve_task("cmmlu", None)[0], resolve_task("ceval", None)[0]
    q = questions("cmmlu", "agronomy")[0]
    assert harness_context(q, [], cmmlu, "农学", "zh") == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "小麦一般在哪个季节播种冬小麦？\nA. 春季\nB. 夏季\nC. 秋季\nD. 冬季\n答案："
    )
    assert harness_context(q, [], ceval, "法学", "zh").startswith(
        "以下是中国关于法学的单项选择题，请选出其中的正确答案。\n\n"
    )


def test_exemplar_draws_are_llamafactorys_datasets_shuffles():
    """LLaMA-Factory seeds numpy and calls ``Dataset.shuffle()`` (no seed) once per question."""
    import numpy as np
    from datasets import Dataset

    dev = questions("mmlu", "astronomy", "dev")
    table = Dataset.from_dict({"i": list(range(len(dev)))})
    state = np.random.get_state()
    try:
        np.random.seed(42)
        theirs = [table.shuffle().select(range(3))["i"] for _ in range(12)]
    finally:
        np.random.set_state(state)
    shuffler = LfShuffler(42)
    ours = [[q.index for q in shuffler.draw(dev, 3)] for _ in range(12)]
    assert ours == theirs
    assert len({tuple(x) for x in ours}) > 3  # a new draw per question
    assert len(LfShuffler(42).draw(dev, 9)) == 5  # n_shot beyond the dev split: all of it, shuffled


def test_letter_tokens_and_harness_continuations(tiny_llama):
    tok = tiny_llama.tokenizer
    assert letter_token_ids(tok) == [tok.encode(c, add_special_tokens=False)[-1] for c in "ABCD"]
    ctx, cont = encode_pair(tok, "Answer:", " A")
    assert ctx == tok.encode("Answer:", add_special_tokens=False) and tok.decode(cont) == " A"
    assert encode_pair(tok, "Answer: ", "A") == (ctx, cont)  # a trailing space moves to the continuation


# ------------------------------------------------------------------ scoring on the tiny model
@pytest.fixture(scope="module")
def letter_run(tiny_llama):
    return Evaluator(tiny_llama).benchmark("mmlu_test", task_dir=BENCH, n_shot=2, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def loglik_run(tiny_llama):
    return Evaluator(tiny_llama).benchmark(
        "cmmlu", task_dir=BENCH, n_shot=2, batch_size=4, scoring="loglikelihood", progress=False
    )


def test_letter_scores_are_the_softmax_of_one_unpadded_forward_pass(tiny_llama, letter_run):
    q, dev = questions("mmlu", "astronomy")[0], questions("mmlu", "astronomy", "dev")
    shots = LfShuffler(42).draw(dev, 2)  # the first question gets the first draw
    ids = tiny_llama.encode_prompt(lf_messages(q, shots, "astronomy", "en")[:-1])
    with torch.inference_mode():
        logits = tiny_llama.model(input_ids=torch.tensor([ids])).logits[0, -1]
    expected = torch.softmax(logits[letter_token_ids(tiny_llama.tokenizer)], dim=-1).tolist()
    first = letter_run.predictions[0]
    assert (first.subject, first.index, first.answer) == ("astronomy", 0, "B")
    assert first.scores == pytest.approx(expected, abs=1e-5)
    assert first.prediction == "ABCD"[max(range(4), key=expected.__getitem__)]
    assert all(sum(p.scores) == pytest.approx(1.0, abs=1e-5) for p in letter_run.predictions)


def test_loglikelihood_scores_are_summed_continuation_log_probs(tiny_llama, loglik_run):
    spec = resolve_task("cmmlu", None)[0]
    q, dev = questions("cmmlu", "agronomy")[2], questions("cmmlu", "agronomy", "dev")
    context = harness_context(q, dev[:2], spec, "农学", "zh")
    expected = []
    for letter in "ABCD":
        ctx, cont = encode_pair(tiny_llama.tokenizer, context, f" {letter}")
        with torch.inference_mode():
            logits = tiny_llama.model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        expected.append(sum(float(logprobs[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont)))
    ours = next(p for p in loglik_run.predictions if p.subject == "agronomy" and p.index == 2)
    assert ours.scores == pytest.approx(expected, abs=1e-4)
    assert all(s < 0 for p in loglik_run.predictions for s in p.scores)


@pytest.mark.parametrize("scoring", ["letter", "loglikelihood"])
def test_batch_size_does_not_change_results(tiny_llama, letter_run, loglik_run, scoring):
    task, before = ("mmlu_test", letter_run) if scoring == "letter" else ("cmmlu", loglik_run)
    after = Evaluator(tiny_llama).benchmark(
        task, task_dir=BENCH, n_shot=2, batch_size=1 if scoring == "letter" else 13, scoring=scoring, progress=False
    )
    assert [p.prediction for p in after.predictions] == [p.prediction for p in before.predictions]
    for a, b in zip(after.predictions, before.predictions, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-4)
    assert after.subjects == before.subjects and after.accuracy == before.accuracy


def test_result_fields_and_aggregation(letter_run):
    r = letter_run
    assert (r.task, r.split, r.n_shot, r.scoring, r.lang) == ("mmlu", "test", 2, "letter", "en")
    assert r.counts == {
        "Average": 14,
        "STEM": 5,
        "Social Sciences": 4,
        "Other": 5,
        "astronomy": 5,
        "high_school_geography": 4,
        "nutrition": 5,
    }
    correct = [p.correct for p in r.predictions]
    assert r.accuracy == pytest.approx(100 * sum(correct) / 14)
    assert r.subjects["nutrition"] == pytest.approx(100 * sum(correct[9:]) / 5)
    assert r.categories["Other"] == r.subjects["nutrition"]
    assert list(r.categories) == ["STEM", "Social Sciences", "Other"]  # LF's order, empty ones left out
    assert "\n" not in repr(r) and f"accuracy={r.accuracy:.2f}" in repr(r)


def test_categories_are_question_weighted_averages():
    preds = [
        BenchmarkPrediction("astronomy", 0, "A", "A", (0.0,)),
        BenchmarkPrediction("college_physics", 0, "A", "B", (0.0,)),
        BenchmarkPrediction("college_physics", 1, "A", "A", (0.0,)),
        BenchmarkPrediction("college_physics", 2, "A", "A", (0.0,)),
        BenchmarkPrediction("philosophy", 0, "C", "D", (0.0,)),
    ]
    r = BenchmarkResult.from_predictions(preds, task="mmlu", split="test", n_shot=5, scoring="letter", lang="en")
    assert r.subjects == {"astronomy": 100.0, "college_physics": pytest.approx(200 / 3), "philosophy": 0.0}
    assert r.categories == {"STEM": 75.0, "Humanities": 0.0}  # 3 of 4 STEM questions, not the mean of subjects
    assert r.accuracy == 60.0
    assert r.summary() == "        Average: 60.00\n           STEM: 75.00\n     Humanities: 0.00"
    assert r.results_json() == {
        "astronomy": {"0": "A"},
        "college_physics": {"0": "B", "1": "A", "2": "A"},
        "philosophy": {"0": "D"},
    }
    assert "| STEM | 75.00 | 4 |" in r._repr_markdown_() and "<table>" in r._repr_html_()


def test_save_writes_llamafactory_files_and_refuses_a_used_folder(letter_run, tmp_path):
    out = letter_run.save(tmp_path / "mmlu")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results) == ["astronomy", "high_school_geography", "nutrition"]
    assert results["astronomy"] == {str(i): p.prediction for i, p in enumerate(letter_run.predictions[:5])}
    log = (out / "results.log").read_text(encoding="utf-8")
    assert log.startswith(letter_run.summary() + "\n\n") and "high_school_geography" in log
    record = json.loads((out / "finetune_kit_benchmark.json").read_text(encoding="utf-8"))
    assert record["kind"] == "benchmark" and record["template"] == "chatml"
    assert record["config"]["benchmark"]["n_shot"] == 2 and record["scores"]["accuracy"] == letter_run.accuracy
    assert len(record["predictions"]) == 14
    with pytest.raises(OutputExistsError, match="not empty"):
        letter_run.save(out)
    (tmp_path / "empty").mkdir()
    assert letter_run.save(tmp_path / "empty") == tmp_path / "empty"


def test_save_dir_is_checked_before_any_work(tiny_llama, tmp_path, monkeypatch):
    from finetune_kit.evaluate import benchmark_scoring

    (tmp_path / "results.log").write_text("earlier run\n")
    monkeypatch.setattr(benchmark_scoring, "forward_last", lambda *a, **k: pytest.fail("scored before refusing"))
    with pytest.raises(OutputExistsError, match="Fix: pass a new save_dir"):
        Evaluator(tiny_llama).benchmark("mmlu", task_dir=BENCH, save_dir=tmp_path, progress=False)


def test_chinese_wording_and_settings_reach_the_result(tiny_llama, tmp_path):
    r = Evaluator(tiny_llama).benchmark(
        "ceval_validation",
        task_dir=BENCH / "ceval",
        n_shot=0,
        subjects=["law"],
        save_dir=tmp_path / "c",
        progress=False,
    )
    assert (r.task, r.split, r.lang, r.counts["Average"], list(r.subjects)) == ("ceval", "validation", "zh", 3, ["law"])
    assert r.save_dir == tmp_path / "c" and (tmp_path / "c" / "results.log").is_file()


# ------------------------------------------------------------------ errors
def copy_of(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(BENCH / name, tmp_path / name))


def test_a_malformed_row_names_its_file_row_and_field(tiny_llama, tmp_path):
    root = copy_of(tmp_path, "mmlu")
    path = root / "data" / "test" / "nutrition_test.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",E"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetRowError, match="expected one of A, B, C, D") as info:
        Evaluator(tiny_llama).benchmark("mmlu", task_dir=root, progress=False)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 2, "answer")
    lines[2] = "only,three,fields"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetRowError, match="has 3 fields, expected 6"):
        questions_of(root, "nutrition")


def questions_of(root: Path, subject: str):
    spec, _ = resolve_task("mmlu", None)
    return read_questions(spec, locate(spec, root, "test"), "test", subject)


def test_layout_errors(tiny_llama, tmp_path):
    ev = Evaluator(tiny_llama)
    with pytest.raises(DatasetError, match="not a folder.*hendrycks/data.tar"):
        ev.benchmark("mmlu", task_dir=tmp_path / "nowhere", progress=False)
    with pytest.raises(DatasetError, match="no CMMLU 'test' folder"):
        ev.benchmark("cmmlu", task_dir=BENCH / "mmlu", progress=False)
    root = copy_of(tmp_path, "cmmlu")
    (root / "test" / "agronomics.csv").write_text(",Question,A,B,C,D,Answer\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="'agronomics' is not a CMMLU subject. Did you mean 'agronomy'"):
        ev.benchmark("cmmlu", task_dir=root, progress=False)
    (root / "test" / "agronomics.csv").unlink()
    (root / "test" / "arts.csv").write_text("Question,A,B,C,D,answer\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no 'Answer' column"):
        ev.benchmark("cmmlu", task_dir=root, progress=False)
    shutil.rmtree(root / "dev")
    with pytest.raises(DatasetError, match="dev.*does not exist"):
        ev.benchmark("cmmlu", task_dir=root, subjects=["agronomy"], progress=False)
    assert ev.benchmark("cmmlu", task_dir=root, subjects=["agronomy"], n_shot=0, progress=False).counts["Average"] == 4


def test_argument_errors(tiny_llama):
    ev = Evaluator(tiny_llama)
    with pytest.raises(ConfigError, match="'astronomie' is not a MMLU subject. Did you mean 'astronomy'"):
        ev.benchmark("mmlu", task_dir=BENCH, subjects=["astronomie"], progress=False)
    with pytest.raises(ConfigError, match="lang: got 'fr'; expected one of 'en', 'zh'"):
        ev.benchmark("mmlu", task_dir=BENCH, lang="fr", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        ev.benchmark("mmlu", task_dir=BENCH, n_shot=-1, batch_size=0, progress=False)
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError, match="without a chat template"):
        ev.benchmark("mmlu", task_dir=BENCH, scoring="loglikelihood", template="fewshot", progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        ev.benchmark("mmlu", task_dir=BENCH, subjects=["anatomy"], progress=False)


def test_an_engine_without_logits_is_refused(tiny_llama):
    class Remote:  # satisfies the Engine protocol by duck typing only what Evaluator checks
        name, context_length, max_concurrency = "remote", None, 1
        encode_prompt = render_prompt = generate = stream = None

    with pytest.raises(TypeError, match="needs a LoadedModel"):
        Evaluator(Remote()).benchmark("mmlu", task_dir=BENCH)


def test_config_checks_all_problems_at_once():
    with pytest.raises(ConfigError) as info:
        BenchmarkConfig(task="mmlu_tset", n_shot=-2)
    assert len(info.value.problems) == 2
    assert BenchmarkConfig(task="cmmlu", subjects="agronomy,arts").subjects == ("agronomy", "arts")
    assert BenchmarkConfig(n_shot=3).unused_keys() == ["n_shot"]


# ------------------------------------------------------------------ the command line, with LLaMA-Factory's keys
def test_cli_eval_runs_the_tutorials_task(tiny_llama_dir, tiny_llama, tmp_path, capsys):
    save = tmp_path / "mmlu"
    config = tmp_path / "llama3_lora_eval.yaml"  # the shape of LLaMA-Factory's example
    config.write_text(
        f"model_name_or_path: {tiny_llama_dir}\ntemplate: fewshot\nfinetuning_type: lora\ntask: mmlu_test\n"
        f"task_dir: {BENCH}\nsave_dir: {save}\nbatch_size: 4\nn_shot: 2\nlang: en\nseed: 42\n"
        "download_mode: reuse_dataset_if_exists\n",
        encoding="utf-8",
    )
    assert main(["eval", str(config)]) == 0
    out = capsys.readouterr().out
    assert "        Average: " in out and f"Results: {save}" in out
    expected = Evaluator(tiny_llama).benchmark(
        "mmlu_test", task_dir=BENCH, n_shot=2, template="fewshot", batch_size=3, progress=False
    )
    assert json.loads((save / "results.json").read_text(encoding="utf-8")) == expected.results_json()
    assert (save / "results.log").read_text(encoding="utf-8").startswith(expected.summary())
    assert main(["eval", str(config)]) == 1  # save_dir is used now
    assert "not empty" in capsys.readouterr().err


def test_cli_eval_key_errors(tiny_llama_dir, capsys):
    base = ["eval", f"model_name_or_path={tiny_llama_dir}"]
    assert main([*base, "task=mmlu_test", "eval_dataset=shop_test", f"task_dir={BENCH}"]) == 1
    assert "two different runs" in capsys.readouterr().err
    assert main([*base, "eval_dataset=shop_test", "n_shot=3", "output_dir=x"]) == 1
    assert "n_shot set the benchmark, but no task" in capsys.readouterr().err
    assert main([*base, "task=ceval_test", "n_shot=-1"]) == 1
    err = capsys.readouterr().err
    assert "2 problems" in err and "test answers private" in err and "n_shot: got -1" in err
    assert main([*base, "task=mmlu", "scoring=logits"]) == 1
    assert "scoring: got 'logits'; expected one of 'letter', 'loglikelihood'" in capsys.readouterr().err
    with pytest.raises(UnknownKeysError, match="unknown key 'task'"):
        from finetune_kit.cli.commands import COMMANDS
        from finetune_kit.config.parse import build

        build({"task": "mmlu_test"}, COMMANDS["train"].sections)


# ------------------------------------------------------------------ the bundled model
@pytest.mark.slow
def test_bundled_model_scores_both_ways(bundled_model):
    """Zero-shot, one subject: a forward pass of the 135M model costs about a second per prompt on 2 cores."""
    ev = Evaluator(bundled_model)
    kwargs = {"task_dir": BENCH, "n_shot": 0, "subjects": ["astronomy"], "progress": False}
    five = ev.benchmark("mmlu", batch_size=5, **kwargs)
    two = ev.benchmark("mmlu", batch_size=2, **kwargs)
    assert [p.prediction for p in two.predictions] == [p.prediction for p in five.predictions]
    for a, b in zip(two.predictions, five.predictions, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-3)
        assert sum(a.scores) == pytest.approx(1.0, abs=1e-4)
    assert five.counts["Average"] == 5 and five.save_dir is None
    harness = ev.benchmark("mmlu", batch_size=5, scoring="loglikelihood", **kwargs)
    assert all(s < 0 for p in harness.predictions for s in p.scores)
    assert [p.prediction for p in harness.predictions] == [
        "ABCD"[p.scores.index(max(p.scores))] for p in harness.predictions
    ]
