"""Token-exact parity with LLaMA-Factory 0.9.5.

Every file in tests/data/parity/golden was written by LLaMA-Factory itself (``make_golden.py``,
run in its own virtualenv) from the dataset folder tests/data/parity/data, a tokenizer variant
built by tests/data/parity/tokenizers.py and one set of options. Here finetune_kit reads the same
dataset_info.json, builds the same tokenizer and encodes with the same template and options: the
``input_ids`` and ``labels`` (and the preference/KTO columns) must be identical, row for row.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from finetune_kit.data import tools
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.templates import get_template
from finetune_kit.data.tokenize import tokenize
from finetune_kit.errors import TemplateError

PARITY = Path(__file__).parent / "parity"
GOLDEN = sorted((PARITY / "golden").glob("*.json"))
COLUMNS = {
    "sft": ("input_ids", "labels"),
    "sft-packed": ("input_ids", "labels", "attention_mask", "position_ids"),
    "pt": ("input_ids",),
    "rm": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
    "kto": ("input_ids", "labels", "kl_input_ids", "kl_labels", "kto_tags"),
}


def _variants():
    spec = importlib.util.spec_from_file_location("parity_tokenizers", PARITY / "tokenizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_tokenizer(tokenizer_dir):
    variants = _variants()
    built = {}

    def build(name: str):
        if name not in built:
            built[name] = variants.build(name, tokenizer_dir)
        return built[name]

    return build


def test_there_are_goldens_for_every_stage():
    stages = {json.loads(p.read_text(encoding="utf-8"))["stage"] for p in GOLDEN}
    assert stages == {"sft", "pt", "rm", "kto"}
    assert len(GOLDEN) >= 40


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_tokens_equal_llamafactorys(path, build_tokenizer, monkeypatch):
    golden = json.loads(path.read_text(encoding="utf-8"))
    args = golden["args"]
    if args.get("tool_date"):
        monkeypatch.setattr(tools, "today", lambda: args["tool_date"])
    tokenizer = build_tokenizer(golden["tokenizer"])
    if golden.get("tokens_added_by_lf"):
        # LLaMA-Factory adds the template's missing stop words as new, untrained tokens (and asks
        # for resize_vocab); finetune_kit refuses such a template/model pairing, naming the token.
        template = get_template(args["template"])
        with pytest.raises(TemplateError, match="another model family"):
            template.fit_tokenizer(copy.deepcopy(tokenizer))
        return
    template = get_template(args["template"]).with_options(
        tool_format=args.get("tool_format"),
        enable_thinking=args.get("enable_thinking", True),
        preserve_thinking=args.get("preserve_thinking", False),
        default_system=args.get("default_system"),
    )
    data = DatasetRegistry.from_dir(PARITY / "data").load(args["dataset"], stage=golden["stage"])
    assert len(data) == golden["rows_in"]
    ours = tokenize(
        data,
        tokenizer,
        template,
        cutoff_len=args["cutoff_len"],
        train_on_prompt=args.get("train_on_prompt", False),
        mask_history=args.get("mask_history", False),
        stage=golden["stage"],
        packing=args.get("packing"),
        neat_packing=args.get("neat_packing", False),
    )
    assert len(ours) == len(golden["rows"])
    for i, row in enumerate(golden["rows"]):
        packed = golden["stage"] == "sft" and args["effective"].get("packing")
        for column in COLUMNS["sft-packed" if packed else golden["stage"]]:
            assert ours.dataset[i][column] == row[column], f"row {i}, {column}"
