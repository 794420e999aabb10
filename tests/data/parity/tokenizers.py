"""Deterministic tokenizer variants used by the LLaMA-Factory parity goldens.

Plain Python, no project imports: this file is imported both by
``make_golden.py`` (run under LLaMA-Factory 0.9.5's venv, transformers 5.6)
and by finetune_kit's parity tests (transformers 5.24).  Every variant starts
from the bundled SmolLM2-135M-Instruct tokenizer directory and only *adds*
tokens / re-points bos/eos, so ids of the base vocabulary never move and the
new tokens get ids 49152, 49153, ... in the order listed below.

Variants
--------
smollm2       unchanged (bos=<|im_start|>, eos=pad=<|im_end|>, unk=<|endoftext|>)
llama3_style  + LLAMA3_TOKENS as special tokens;
              bos=<|begin_of_text|>, eos=<|end_of_text|>
kitchen       + KITCHEN_TOKENS as special tokens (markers of the gemma, glm4,
              phi4, deepseek3, mistral and qwen3 templates);
              bos=<｜begin▁of▁sentence｜>, eos=<｜end▁of▁sentence｜>
"""

from __future__ import annotations

from pathlib import Path

# NOTE: this module is called ``tokenizers.py``; never put its directory on sys.path
# (it would shadow the HF ``tokenizers`` package).  Load it by file path instead.
from transformers import AddedToken, AutoTokenizer

__all__ = ["VARIANTS", "LLAMA3_TOKENS", "KITCHEN_TOKENS", "build", "default_base_dir"]

LLAMA3_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
]

KITCHEN_TOKENS = [
    # deepseek3 (first, so bos/eos get the lowest new ids)
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    # gemma
    "<start_of_turn>",
    "<end_of_turn>",
    # glm4
    "[gMASK]",
    "<sop>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|observation|>",
    # phi4 (<|im_start|>/<|im_end|> are already in the SmolLM2 vocab)
    "<|im_sep|>",
    # mistral
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    # qwen3
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]

_SPECS: dict[str, tuple[list[str], str | None, str | None]] = {
    "smollm2": ([], None, None),
    "llama3_style": (LLAMA3_TOKENS, "<|begin_of_text|>", "<|end_of_text|>"),
    "kitchen": (KITCHEN_TOKENS, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}

VARIANTS = tuple(_SPECS)


def default_base_dir() -> Path:
    return Path.home() / ".cache" / "finetune_kit" / "bundled" / "smollm2-135m-instruct"


def build(name: str, base_dir: str | Path | None = None):
    """Return a fresh ``PreTrainedTokenizerFast`` for variant ``name``."""
    if name not in _SPECS:
        raise KeyError(f"unknown tokenizer variant {name!r}; known: {', '.join(VARIANTS)}")
    tokens, bos, eos = _SPECS[name]
    base_dir = Path(base_dir) if base_dir is not None else default_base_dir()
    tok = AutoTokenizer.from_pretrained(str(base_dir), padding_side="right")
    if tokens:
        added = [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False) for t in tokens
        ]
        tok.add_tokens(added, special_tokens=True)
        start = len(tok) - len(tokens)
        got = tok.convert_tokens_to_ids(tokens)
        if got != list(range(start, start + len(tokens))):
            raise RuntimeError(f"unexpected ids for added tokens of {name}: {got}")
    if bos is not None:
        tok.bos_token = bos
    if eos is not None:
        tok.eos_token = eos
    return tok
