"""MMLU, CMMLU and C-Eval questions read from their released CSV files, and the two prompt styles.

Each benchmark is read from a local folder in its own released layout; nothing is downloaded:

* MMLU (``data.tar``): ``{dev,val,test}/<subject>_<split>.csv``, no header, columns
  question, A, B, C, D, answer.
* CMMLU (``cmmlu_v1_0_1.zip``): ``{dev,test}/<subject>.csv``, header ``,Question,A,B,C,D,Answer``
  (the first column is a row number).
* C-Eval (``ceval-exam.zip``): ``{dev,val,test}/<subject>_<split>.csv``, header
  ``id,question,A,B,C,D,answer`` (``explanation`` too in dev; test has no answers).

Two prompt styles reproduce the two tools users compare with: LLaMA-Factory's (chat messages for
the model's template, exemplars shuffled with a seed, see :func:`lf_messages`) and
lm-evaluation-harness's (one raw text, the first ``n`` dev questions, see :func:`harness_context`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_kit.errors import ConfigError, DatasetError, DatasetRowError, did_you_mean
from finetune_kit.evaluate.subjects import CEVAL, CMMLU, MMLU, Subjects

logger = logging.getLogger("finetune_kit.evaluate")

CHOICES = ("A", "B", "C", "D")
SPLIT_ALIASES = {"test": "test", "validation": "validation", "val": "validation"}


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: its subject, its row in the split's file, the text, A-D and the answer."""

    subject: str
    index: int
    question: str
    choices: tuple[str, str, str, str]
    answer: str


@dataclass(frozen=True)
class BenchmarkSpec:
    """How one benchmark is laid out on disk and worded."""

    name: str
    title: str
    subjects: Subjects
    folders: dict[str, str]  # split -> folder ("validation" -> "val"); "dev" holds the exemplars
    default_split: str
    columns: tuple[str, ...] | None  # header names of question, A-D, answer; None: no header (MMLU)
    with_split_suffix: bool  # files are <subject>_<folder>.csv (else <subject>.csv)
    language: str
    download: str
    harness_zh: str  # lm-evaluation-harness's Chinese description of this benchmark

    def file_name(self, subject: str, folder: str) -> str:
        return f"{subject}_{folder}.csv" if self.with_split_suffix else f"{subject}.csv"


SPECS: dict[str, BenchmarkSpec] = {
    "mmlu": BenchmarkSpec(
        "mmlu",
        "MMLU",
        MMLU,
        {"test": "test", "validation": "val"},
        "test",
        None,
        True,
        "en",
        "https://people.eecs.berkeley.edu/~hendrycks/data.tar (unpack it; point task_dir at its data/ folder)",
        "以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n",
    ),
    "cmmlu": BenchmarkSpec(
        "cmmlu",
        "CMMLU",
        CMMLU,
        {"test": "test"},
        "test",
        ("Question", "A", "B", "C", "D", "Answer"),
        False,
        "zh",
        "https://github.com/haonan-li/CMMLU (data/cmmlu_v1_0_1.zip; point task_dir at the unzipped folder)",
        "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
    ),
    "ceval": BenchmarkSpec(
        "ceval",
        "C-Eval",
        CEVAL,
        {"validation": "val"},
        "validation",
        ("question", "A", "B", "C", "D", "answer"),
        True,
        "zh",
        "https://huggingface.co/datasets/ceval/ceval-exam (ceval-exam.zip; point task_dir at the unzipped folder)",
        "以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n",
    ),
}
TASK_NAMES = ("mmlu_test", "mmlu_validation", "cmmlu_test", "ceval_validation")


def resolve_task(task: str, split: str | None) -> tuple[BenchmarkSpec, str]:
    """The benchmark and split that ``task`` names: ``"mmlu"`` or LLaMA-Factory's ``"mmlu_test"`` form."""
    name, _, from_task = str(task).strip().lower().partition("_")
    spec = SPECS.get(name)
    if spec is None:
        hint = did_you_mean(str(task), [*SPECS, *TASK_NAMES])
        raise ConfigError(
            f"task: got {task!r}; expected mmlu, cmmlu or ceval, or one of {', '.join(TASK_NAMES)}.{hint}"
        )
    problems = []
    wanted = [SPLIT_ALIASES.get(s.lower(), s) for s in (from_task, split or "") if s]
    if len(set(wanted)) > 1:
        problems.append(f"task {task!r} names the split {from_task!r} but split={split!r}; give the split once")
    chosen = wanted[0] if wanted else spec.default_split
    if chosen not in spec.folders:
        fix = f"use {spec.name}_{spec.default_split}"
        if spec.name == "ceval" and chosen == "test":
            fix = "C-Eval keeps its test answers private (its test CSVs have no answer column); " + fix
        problems.append(f"{spec.title} has no {chosen!r} split to score: {fix} (splits: {', '.join(spec.folders)})")
    if problems:
        raise ConfigError(problems)
    return spec, chosen


def locate(spec: BenchmarkSpec, task_dir: str | Path, folder: str) -> Path:
    """The folder holding ``folder/`` (e.g. ``test/``): ``task_dir`` itself, or its ``<task>/``, ``data/`` below."""
    base = Path(task_dir).expanduser()
    if not base.is_dir():
        raise DatasetError(f"task_dir {str(base)!r} is not a folder. Fix: download {spec.title} from {spec.download}")
    candidates = [base, base / spec.name]
    if spec.name == "mmlu":  # data.tar unpacks to data/{dev,val,test}
        candidates += [base / "data", base / spec.name / "data"]
    for root in candidates:
        if (root / folder).is_dir():
            return root
    tried = ", ".join(str(c / folder) for c in candidates)
    raise DatasetError(
        f"no {spec.title} '{folder}' folder under task_dir {str(base)!r} (looked for {tried}). Fix: point "
        f"task_dir at the folder that holds {spec.title}'s {'/'.join(['dev', *spec.folders.values()])} folders; "
        f"download: {spec.download}"
    )


def find_subjects(spec: BenchmarkSpec, root: Path, folder: str, wanted: Sequence[str] | None) -> list[str]:
    """The subjects to score, in LLaMA-Factory's order: ``wanted``, else every subject file in ``root/folder``."""
    if wanted is not None:
        if isinstance(wanted, str):
            wanted = [wanted]
        unknown = [s for s in wanted if s not in spec.subjects]
        if unknown:
            raise ConfigError(
                [f"subjects: {s!r} is not a {spec.title} subject.{did_you_mean(s, spec.subjects)}" for s in unknown]
            )
        if not wanted:
            raise ConfigError("subjects: got an empty list; pass subject names, or None for every subject")
        missing = [root / folder / spec.file_name(s, folder) for s in wanted]
        missing = [p for p in missing if not p.is_file()]
        if missing:
            raise DatasetError(f"{missing[0]} does not exist (subject files of the {folder} split are read from there)")
        return [s for s in spec.subjects if s in set(wanted)]
    found: list[str] = []
    for path in sorted((root / folder).glob("*.csv")):
        subject = path.name.removesuffix(".csv")
        if spec.with_split_suffix:
            subject = subject.removesuffix(f"_{folder}")
        if subject not in spec.subjects:
            raise DatasetError(
                f"{path}: {subject!r} is not a {spec.title} subject.{did_you_mean(subject, spec.subjects)} Fix: "
                f"remove or rename the file ({len(spec.subjects)} subjects are known, e.g. {next(iter(spec.subjects))})"
            )
        found.append(subject)
    if not found:
        raise DatasetError(
            f"{root / folder} holds no {spec.title} subject files (expected e.g. "
            f"{spec.file_name(next(iter(spec.subjects)), folder)})"
        )
    if len(found) < len(spec.subjects):
        logger.info(
            "scoring %d of %d %s subjects (those in %s)", len(found), len(spec.subjects), spec.title, root / folder
        )
    return [s for s in spec.subjects if s in set(found)]


def read_questions(spec: BenchmarkSpec, root: Path, folder: str, subject: str) -> list[Question]:
    """Every question of one subject's CSV file; a malformed row raises :class:`DatasetRowError`."""
    path = root / folder / spec.file_name(subject, folder)
    if not path.is_file():
        raise DatasetError(f"{path} does not exist (the {folder} split of {spec.title}'s {subject!r})")
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    positions = list(range(6))
    names: tuple[str, ...] = ("question", "A", "B", "C", "D", "answer")
    header: list[str] = []
    if spec.columns is not None:
        header, rows = (rows[0] if rows else []), rows[1:]
        absent = [c for c in spec.columns if c not in header]
        if absent:
            raise DatasetError(
                f"{path}: the header has no {', '.join(repr(c) for c in absent)} column (found {header}). Fix: use "
                f"{spec.title}'s released files, whose header names {', '.join(spec.columns)}"
            )
        positions = [header.index(c) for c in spec.columns]
        names = spec.columns
    width = max(positions) + 1
    expected = 6 if spec.columns is None else len(header)
    questions = []
    for i, row in enumerate(rows):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < width or (spec.columns is None and len(row) != 6):
            raise DatasetRowError(
                file=str(path),
                row=i,
                field="(row)",
                problem=f"has {len(row)} fields, expected {expected} ({', '.join(names)})",
                fix="quote fields that contain commas or line breaks, as the released files do",
            )
        cells = [row[p] for p in positions]
        answer = cells[5].strip()
        if not cells[0].strip():
            raise DatasetRowError(
                file=str(path), row=i, field=names[0], problem="the question is empty", fix="fill in the question"
            )
        if answer not in CHOICES:
            raise DatasetRowError(
                file=str(path),
                row=i,
                field=names[5],
                problem=f"got {cells[5]!r}; expected one of A, B, C, D",
                fix="write the letter of the correct choice",
            )
        questions.append(Question(subject, i, cells[0], (cells[1], cells[2], cells[3], cells[4]), answer))
    if not questions:
        raise DatasetError(f"{path} holds no questions")
    return questions


# ----- LLaMA-Factory's prompt ---------------------------------------------------------------------
LF_WORDING = {
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "\nAnswer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n答案："),
}


def lf_text(q: Question, lang: str) -> str:
    """One question as LLaMA-Factory writes it: the question, ``\\nA. ...`` lines, ``\\nAnswer:``."""
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(CHOICES, q.choices, strict=True))
    return q.question + options + LF_WORDING[lang][1]


def lf_messages(q: Question, shots: Sequence[Question], subject_name: str, lang: str) -> list[dict[str, str]]:
    """LLaMA-Factory's messages: each exemplar a user/assistant pair, then the question with its answer.

    The instruction goes in front of the first user message (not a system message), and the last
    reply is the gold letter, which the template's one-turn encoding leaves out of the prompt.
    """
    messages = []
    for item in [*shots, q]:
        messages += [{"role": "user", "content": lf_text(item, lang)}, {"role": "assistant", "content": item.answer}]
    messages[0]["content"] = LF_WORDING[lang][0].format(subject=subject_name) + messages[0]["content"]
    return messages


class LfShuffler:
    """The exemplar draws of LLaMA-Factory's evaluator, reproduced.

    LLaMA-Factory seeds numpy's global generator with ``seed`` and, for every question of every
    subject (in its mapping's order), shuffles the dev split with ``datasets.Dataset.shuffle()``:
    that reads a seed off numpy's state, steps it once, and permutes with ``default_rng(seed)``.
    This does the same on a private ``RandomState``, so a full run draws LLaMA-Factory's exemplars.
    """

    def __init__(self, seed: int) -> None:
        import numpy as np  # noqa: PLC0415  (heavy: only when a benchmark runs)

        self._np = np
        self._state = np.random.RandomState(seed)

    def draw(self, dev: Sequence[Question], n_shot: int) -> list[Question]:
        state: Any = self._state.get_state()  # ("MT19937", keys, pos, ...)
        keys, pos = state[1], state[2]
        seed = int(keys[pos] if pos < 624 else keys[0])
        self._state.random_sample()
        order = self._np.random.default_rng(seed).permutation(len(dev))
        return [dev[int(i)] for i in order[: min(n_shot, len(dev))]]


# ----- lm-evaluation-harness's prompt -------------------------------------------------------------
HARNESS_EN = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def harness_text(q: Question, lang: str) -> str:
    """One question as lm-evaluation-harness's mmlu/cmmlu/ceval tasks write it (question stripped)."""
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(CHOICES, q.choices, strict=True))
    return q.question.strip() + options + ("\nAnswer:" if lang == "en" else "\n答案：")


def harness_context(q: Question, shots: Sequence[Question], spec: BenchmarkSpec, subject_name: str, lang: str) -> str:
    """The description, each exemplar as ``text + " " + letter + "\\n\\n"``, then the question."""
    description = (HARNESS_EN if lang == "en" else spec.harness_zh).format(subject=subject_name)
    return description + "".join(f"{harness_text(s, lang)} {s.answer}\n\n" for s in shots) + harness_text(q, lang)
