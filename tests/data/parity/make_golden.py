"""Generate LLaMA-Factory 0.9.5 golden token files for finetune_kit's parity tests.

Run from the repository root with LLaMA-Factory's own interpreter::

    $LF_VENV/bin/python tests/data/parity/make_golden.py            # (re)write golden/*.json
    $LF_VENV/bin/python tests/data/parity/make_golden.py --check    # regenerate in memory, diff
    $LF_VENV/bin/python tests/data/parity/make_golden.py --only sft-smollm2-chatml-alpaca_mix

Every configuration goes through LLaMA-Factory's real data pipeline:
``hparams.get_train_args`` (the same parser ``llamafactory-cli train`` uses, so LF's
post-processing of the data arguments applies) -> ``data.get_template_and_fix_tokenizer``
-> ``data.get_dataset``.  Only the tokenizer is built by ``tokenizers.build`` (this
folder) instead of LF's ``load_tokenizer``, which would only add padding_side/model_max_length.

Two deliberate patches (recorded in each affected golden's ``args``):

* ``tool_date``: LF's llama3 tool prompt embeds ``datetime.now()``; it is pinned to
  26 Jul 2024.
* ``patched: "openai system quirk removed"``: LF 0.9.5's OpenAIDatasetConverter appends
  "detailed thinking off" (or "\\n" when tools are present) to the system prompt. The
  generator replaces ``_system`` with what the row itself says ("" if nothing).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import types
from contextlib import redirect_stdout
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Running this file as a script puts HERE on sys.path, where our ``tokenizers.py`` would shadow
# the HF ``tokenizers`` package.  Drop it before anything imports transformers.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

_TMP = Path(tempfile.mkdtemp(prefix="lf_parity_"))
os.environ["HF_DATASETS_CACHE"] = str(_TMP / "hf_datasets_cache")  # never reuse a stale cache
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")

# LF's mm_plugin does ``import torchaudio`` at import time; text-only use never touches it.
if importlib.util.find_spec("torchaudio") is None:
    import transformers.utils.import_utils as _iu

    _iu.is_torchaudio_available()  # cache the honest answer (False) before the stub exists
    import peft  # noqa: F401  (imports transformers' lazy modules while torchaudio is still absent)

    sys.modules["torchaudio"] = types.ModuleType("torchaudio")

import datasets  # noqa: E402
import llamafactory  # noqa: E402
import transformers  # noqa: E402
from llamafactory.data import converter as lf_converter  # noqa: E402
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer  # noqa: E402
from llamafactory.data import tool_utils as lf_tool_utils  # noqa: E402
from llamafactory.data.template import TEMPLATES  # noqa: E402
from llamafactory.hparams import get_train_args  # noqa: E402
from llamafactory.hparams import parser as lf_parser  # noqa: E402

# quiet: get_train_args would switch transformers' logging to INFO (logging only)
lf_parser._set_transformers_logging = lambda *a, **k: None
transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()


def _load_variants():
    spec = importlib.util.spec_from_file_location("parity_tokenizers", HERE / "tokenizers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tk = _load_variants()

DATA_DIR = HERE / "data"
GOLDEN_DIR = HERE / "golden"
INDEX_FILE = HERE / "index.json"
LF_VERSION = "0.9.5"
TOOL_DATE = "26 Jul 2024"
OPENAI_PATCH = "openai system quirk removed"

# ----------------------------------------------------------------------------------------------
# patches
# ----------------------------------------------------------------------------------------------
import datetime as _dt  # noqa: E402


class _FixedDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: D102
        return cls(2024, 7, 26, 12, 0, 0, tzinfo=tz)


lf_tool_utils.datetime = _FixedDatetime
assert _FixedDatetime.now().strftime("%d %b %Y") == TOOL_DATE


class _NoQuirkOpenAIConverter(lf_converter.OpenAIDatasetConverter):
    """LF's converter, but ``_system`` is exactly the row's system message ("" when absent)."""

    def __call__(self, example):
        out = super().__call__(example)
        attr = self.dataset_attr
        messages = example[attr.messages]
        if attr.system_tag and len(messages) != 0 and messages[0][attr.role_tag] == attr.system_tag:
            system = messages[0][attr.content_tag]
        else:
            system = example.get(attr.system, "") if attr.system else ""
        out["_system"] = system or ""
        return out


lf_converter.DATASET_CONVERTERS["openai"] = _NoQuirkOpenAIConverter

# get_template_and_fix_tokenizer mutates the registered Template objects (tool_format,
# default_system, enable_thinking, ...); restore a pristine copy before every configuration.
_PRISTINE_TEMPLATES = {name: copy.deepcopy(tpl) for name, tpl in TEMPLATES.items()}

# ----------------------------------------------------------------------------------------------
# configuration matrix
# ----------------------------------------------------------------------------------------------
DATA_KEYS = (
    "dataset",
    "template",
    "cutoff_len",
    "train_on_prompt",
    "mask_history",
    "tool_format",
    "enable_thinking",
    "preserve_thinking",
    "packing",
    "neat_packing",
    "default_system",
)
DATA_DEFAULTS = {
    "cutoff_len": 2048,
    "train_on_prompt": False,
    "mask_history": False,
    "tool_format": None,
    "enable_thinking": True,
    "preserve_thinking": False,
    "packing": None,
    "neat_packing": False,
    "default_system": None,
}
SHORT = {  # option name -> file-name fragment
    "train_on_prompt": "trainprompt",
    "mask_history": "maskhist",
    "packing": "packing",
    "neat_packing": "neatpacking",
    "default_system": "defsys",
    "tool_format": "toolfmt",
    "enable_thinking": "think",
    "cutoff_len": "cut",
}
TOOL_DATASETS = {"sharegpt_tools", "openai_tools"}
OPENAI_DATASETS = {"openai_tools"}


def _cfg(stage, tokenizer, template, dataset, **opts):
    name = f"{stage}-{tokenizer}-{template}-{dataset}"
    for key, val in opts.items():
        frag = SHORT[key]
        if isinstance(val, bool):
            frag = frag if val else f"no{frag}"
        elif key == "cutoff_len":
            frag = f"cut{val}"
        elif key == "tool_format":
            frag = f"toolfmt_{val}"
        name += "-" + frag
    return {
        "name": name,
        "tokenizer": tokenizer,
        "stage": stage,
        "args": {"dataset": dataset, "template": template, **opts},
    }


def build_matrix():
    m = []
    # SFT, smollm2 tokenizer, many templates on alpaca + sharegpt data
    for tpl in (
        "default",
        "empty",
        "alpaca",
        "vicuna",
        "fewshot",
        "llama2",
        "mistral",
        "chatml",
        "qwen",
        "qwen3_nothink",
        "smollm2",
    ):
        for ds in ("alpaca_mix", "sharegpt_multi"):
            m.append(_cfg("sft", "smollm2", tpl, ds))
    # chatml masking / truncation variants
    m += [
        _cfg("sft", "smollm2", "chatml", "alpaca_mix", train_on_prompt=True),
        _cfg("sft", "smollm2", "chatml", "sharegpt_multi", train_on_prompt=True),
        _cfg("sft", "smollm2", "chatml", "alpaca_mix", mask_history=True),
        _cfg("sft", "smollm2", "chatml", "sharegpt_multi", mask_history=True),
        _cfg("sft", "smollm2", "chatml", "alpaca_mix", cutoff_len=64),
        _cfg("sft", "smollm2", "chatml", "sharegpt_multi", cutoff_len=64),
        _cfg("sft", "smollm2", "chatml", "alpaca_mix", train_on_prompt=True, cutoff_len=64),
        _cfg("sft", "smollm2", "chatml", "sharegpt_multi", mask_history=True, cutoff_len=64),
        _cfg("sft", "smollm2", "chatml", "alpaca_mix", default_system="You are a test bot."),
        _cfg("sft", "smollm2", "fewshot", "sharegpt_multi", mask_history=True, cutoff_len=64),
    ]
    # openai-tag sharegpt and openai formatting
    for tpl in ("chatml", "qwen"):
        m.append(_cfg("sft", "smollm2", tpl, "sharegpt_openai_tags"))
        m.append(_cfg("sft", "smollm2", tpl, "openai_tools"))
    # llama3-style tokenizer
    m += [
        _cfg("sft", "llama3_style", "llama3", "alpaca_mix"),
        _cfg("sft", "llama3_style", "llama3", "sharegpt_multi"),
        _cfg("sft", "llama3_style", "llama3", "sharegpt_multi", mask_history=True),
        _cfg("sft", "llama3_style", "llama3", "alpaca_mix", cutoff_len=64),
        _cfg("sft", "llama3_style", "llama3", "sharegpt_tools"),
        # llama3 template on the unmodified SmolLM2 tokenizer: LF itself adds <|eot_id|> (as the new
        # eos, replace_eos) and <|eom_id|> (stop word) to the vocabulary; the header markers stay text.
        _cfg("sft", "smollm2", "llama3", "sharegpt_multi"),
    ]
    # kitchen tokenizer: plain templates on sharegpt data
    for tpl in ("gemma", "glm4", "phi4", "deepseek3", "mistral", "qwen3"):
        m.append(_cfg("sft", "kitchen", tpl, "sharegpt_multi"))
    # reasoning data with qwen3
    m += [
        _cfg("sft", "kitchen", "qwen3", "reasoning", enable_thinking=True),
        _cfg("sft", "kitchen", "qwen3", "reasoning", enable_thinking=False),
        _cfg("sft", "kitchen", "qwen3", "reasoning", enable_thinking=True, mask_history=True),
        _cfg("sft", "kitchen", "qwen3", "reasoning", enable_thinking=False, mask_history=True),
    ]
    # tool calling
    m += [
        _cfg("sft", "smollm2", "qwen", "sharegpt_tools"),
        _cfg("sft", "smollm2", "chatml", "sharegpt_tools"),
        _cfg("sft", "smollm2", "chatml", "sharegpt_tools", tool_format="default"),
        _cfg("sft", "smollm2", "default", "sharegpt_tools", tool_format="default"),
        _cfg("sft", "kitchen", "glm4", "sharegpt_tools"),
        _cfg("sft", "kitchen", "mistral", "sharegpt_tools"),
        _cfg("sft", "kitchen", "qwen3", "sharegpt_tools"),
    ]
    # preference (pairwise, what DPO uses)
    m += [
        _cfg("rm", "smollm2", "chatml", "pref_alpaca"),
        _cfg("rm", "smollm2", "chatml", "pref_sharegpt"),
        _cfg("rm", "smollm2", "chatml", "pref_alpaca", cutoff_len=64),
        _cfg("rm", "smollm2", "chatml", "pref_sharegpt", cutoff_len=64),
        _cfg("rm", "llama3_style", "llama3", "pref_alpaca"),
        _cfg("rm", "llama3_style", "llama3", "pref_sharegpt"),
    ]
    # KTO
    m += [
        _cfg("kto", "smollm2", "chatml", "kto"),
        _cfg("kto", "smollm2", "chatml", "kto", cutoff_len=64),
    ]
    # pre-training
    m += [
        _cfg("pt", "smollm2", "chatml", "pt_text", cutoff_len=64),
        _cfg("pt", "smollm2", "chatml", "pt_text", cutoff_len=64, packing=True),
        _cfg("pt", "smollm2", "chatml", "pt_text", cutoff_len=64, packing=False),
        _cfg("pt", "llama3_style", "llama3", "pt_text", cutoff_len=64),
        _cfg("pt", "llama3_style", "llama3", "pt_text", cutoff_len=64, packing=False),
    ]
    # SFT packing
    m += [
        _cfg("sft", "smollm2", "chatml", "alpaca_mix", packing=True, cutoff_len=128),
        _cfg("sft", "smollm2", "chatml", "alpaca_mix", neat_packing=True, cutoff_len=128),
        _cfg("sft", "smollm2", "chatml", "sharegpt_multi", packing=True, cutoff_len=128),
    ]
    names = [c["name"] for c in m]
    assert len(names) == len(set(names)), "duplicate configuration names"
    return m


# ----------------------------------------------------------------------------------------------
# running one configuration
# ----------------------------------------------------------------------------------------------
FEATURES = {
    "sft": ("input_ids", "labels"),
    "rm": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
    "kto": ("input_ids", "labels", "kl_input_ids", "kl_labels", "kto_tags"),
    "pt": ("input_ids",),
}
PACKED_EXTRA = ("attention_mask", "position_ids")


def _count_input_rows(dataset: str) -> int:
    info = json.loads((DATA_DIR / "dataset_info.json").read_text(encoding="utf-8"))
    path = DATA_DIR / info[dataset]["file_name"]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return sum(1 for line in text.splitlines() if line.strip())
    return len(json.loads(text))


def _tok_state(tok) -> dict:
    return {
        "len": len(tok),
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
    }


def run_config(cfg: dict, base_dir: Path) -> dict:
    for name, tpl in _PRISTINE_TEMPLATES.items():
        TEMPLATES[name] = copy.deepcopy(tpl)

    given = cfg["args"]
    stage = cfg["stage"]
    out_dir = _TMP / "out" / cfg["name"]  # never created; only keeps HF's TrainingArguments happy
    lf_args = {
        "stage": stage,
        "do_train": True,
        "model_name_or_path": str(base_dir),
        "dataset_dir": str(DATA_DIR),
        "output_dir": str(out_dir),
        "overwrite_cache": True,
        "report_to": "none",
        **given,
    }
    model_args, data_args, training_args, _finetuning_args, _ = get_train_args(lf_args)
    assert data_args.preprocessing_num_workers is None

    tokenizer = tk.build(cfg["tokenizer"], base_dir)
    before = _tok_state(tokenizer)
    vocab_before = set(tokenizer.get_vocab())
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    after = _tok_state(tokenizer)
    added_by_lf = sorted(
        ([t, i] for t, i in tokenizer.get_vocab().items() if t not in vocab_before), key=lambda x: x[1]
    )

    log = io.StringIO()
    with redirect_stdout(log):
        module = get_dataset(template, model_args, data_args, training_args, stage, tokenizer=tokenizer, processor=None)
    ds = module["train_dataset"]

    packed_sft = stage == "sft" and bool(data_args.packing)
    feats = FEATURES[stage] + (PACKED_EXTRA if packed_sft else ())
    rows = []
    for ex in ds:
        row = {k: ex[k] for k in feats}
        if packed_sft and data_args.neat_packing:
            row["sequence_boundaries"] = ex["packing_params"]["sequence_boundaries"]
        if not packed_sft:  # attention masks are all-ones everywhere else; check instead of storing
            for prefix in ("", "chosen_", "rejected_", "kl_"):
                if prefix + "input_ids" in ex and prefix + "attention_mask" in ex:
                    assert ex[prefix + "attention_mask"] == [1] * len(ex[prefix + "input_ids"]), cfg["name"]
        rows.append(row)

    rows_in = _count_input_rows(given["dataset"])
    if stage == "pt":
        examples_out = None  # rows are cutoff-sized blocks (packing) or 1:1 (no packing)
        if not data_args.packing:
            examples_out = len(rows)
    elif packed_sft:
        examples_out = sum(_count_packed(r, data_args.neat_packing) for r in rows)
    else:
        examples_out = len(rows)
    if examples_out is not None and examples_out != rows_in:
        raise RuntimeError(f"{cfg['name']}: LF kept {examples_out} of {rows_in} examples")

    args = {k: given.get(k, DATA_DEFAULTS.get(k)) for k in DATA_KEYS}
    args["effective"] = {"cutoff_len": data_args.cutoff_len, "packing": bool(data_args.packing)}
    uses_llama3_tools = given["dataset"] in TOOL_DATASETS and (
        given.get("tool_format") == "llama3" or (given.get("tool_format") is None and given["template"] == "llama3")
    )
    if uses_llama3_tools:
        args["tool_date"] = TOOL_DATE
    if given["dataset"] in OPENAI_DATASETS:
        args["patched"] = OPENAI_PATCH

    return {
        "name": cfg["name"],
        "tokenizer": cfg["tokenizer"],
        "stage": stage,
        "args": args,
        "llamafactory": llamafactory.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "tokenizer_before": before,
        "tokenizer_after": after,
        "tokens_added_by_lf": added_by_lf,
        "rows_in": rows_in,
        "rows": rows,
    }


def _count_packed(row: dict, neat: bool) -> int:
    if neat:
        return len({m for m in row["attention_mask"] if m != 0})
    pos = row["position_ids"]
    # a packed sub-sequence starts at position 0 followed by position 1; padding is all zeros
    return sum(1 for i in range(len(pos) - 1) if pos[i] == 0 and pos[i + 1] == 1)


def dumps_golden(g: dict) -> str:
    head = {k: v for k, v in g.items() if k != "rows"}
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1]
    lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in g["rows"]]
    return text + ',"rows":[\n' + ",\n".join(lines) + "\n]}\n"


def index_entry(g: dict) -> dict:
    a = g["args"]
    opts = {k: a[k] for k in DATA_KEYS if k not in ("dataset", "template") and a[k] != DATA_DEFAULTS.get(k)}
    return {
        "name": g["name"],
        "stage": g["stage"],
        "template": a["template"],
        "tokenizer": g["tokenizer"],
        "dataset": a["dataset"],
        "options": opts,
        "rows": len(g["rows"]),
        "rows_in": g["rows_in"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dir", default=str(tk.default_base_dir()), help="SmolLM2 tokenizer directory")
    ap.add_argument("--only", action="append", default=[], help="run only these configuration names")
    ap.add_argument("--check", action="store_true", help="compare against golden/ instead of writing")
    ap.add_argument("--list", action="store_true", help="print configuration names and exit")
    ns = ap.parse_args(argv)

    matrix = build_matrix()
    if ns.list:
        print("\n".join(c["name"] for c in matrix))
        return 0
    if ns.only:
        unknown = set(ns.only) - {c["name"] for c in matrix}
        if unknown:
            ap.error(f"unknown configuration(s): {sorted(unknown)}")
        matrix = [c for c in matrix if c["name"] in ns.only]

    base_dir = Path(ns.base_dir).expanduser()
    GOLDEN_DIR.mkdir(exist_ok=True)
    results, mismatched = [], []
    try:
        for i, cfg in enumerate(matrix, 1):
            g = run_config(cfg, base_dir)
            results.append(g)
            text = dumps_golden(g)
            path = GOLDEN_DIR / f"{g['name']}.json"
            if ns.check:
                same = path.exists() and path.read_text(encoding="utf-8") == text
                if not same:
                    mismatched.append(g["name"])
                status = "ok" if same else "DIFFERS"
            else:
                path.write_text(text, encoding="utf-8")
                status = "written"
            print(f"[{i:2d}/{len(matrix)}] {g['name']}: {len(g['rows'])} rows ({status})", file=sys.stderr)
    finally:
        shutil.rmtree(_TMP, ignore_errors=True)

    if not ns.only and not ns.check:
        names = {g["name"] for g in results}
        for stale in GOLDEN_DIR.glob("*.json"):
            if stale.stem not in names:
                stale.unlink()
        index = [index_entry(g) for g in results]
        INDEX_FILE.write_text(
            "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in index) + "\n]\n", encoding="utf-8"
        )
        total = sum(e["rows"] for e in index)
        print(f"{len(index)} configurations, {total} rows", file=sys.stderr)
    if mismatched:
        print(f"{len(mismatched)} golden file(s) differ: {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
