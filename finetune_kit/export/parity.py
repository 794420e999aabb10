"""Parity of a GGUF file with the transformers model it was made from, checked with llama.cpp itself.

For each probe prompt the transformers model's greedy reply (computed once) is compared with
llama.cpp's greedy reply to the same prompt tokens; the GGUF's own chat template is rendered and
compared with the training template's text; and a chat completion through llama.cpp (its embedded
template, its stop tokens) must end where the transformers reply ends. Results go to ``parity.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit._deps import require
from finetune_kit._fs import write_json
from finetune_kit.export.gguf import quiet_llama

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel

PARITY_FILE = "parity.json"
# short, varied prompts; several have short answers, so a reply that ends is compared too
DEFAULT_PROBES: tuple[str, ...] = (
    "What is the capital of France?",
    "What is 12 times 7?",
    "Say hello.",
    "List three prime numbers.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "你们包邮吗？",
    "请用一句话介绍你自己。",
)
EXACT_TYPES = ("f32", "f16")  # greedy text must be identical; other types report a rate


NEAR_TIE = 0.05  # logits: a first different token the transformers model scored this close to its own pick


@dataclass(frozen=True)
class Probe:
    """The transformers model's greedy reply to one probe: prompt ids, reply ids and the logits of each step."""

    prompt: str
    prompt_text: str
    prompt_ids: tuple[int, ...]
    reply_ids: tuple[int, ...]
    finish_reason: str
    text: str
    scores: Any = field(repr=False)  # (steps, vocab) float tensor: the logits each reply token was picked from


@dataclass(frozen=True)
class Reference:
    """The transformers model's greedy replies to the probes, one at a time (no padding), with their logits."""

    probes: tuple[Probe, ...]
    max_new_tokens: int
    described: str
    stop_ids: tuple[int, ...]

    @classmethod
    def of(cls, model: LoadedModel, probes: Sequence[str] = DEFAULT_PROBES, *, max_new_tokens: int = 32) -> Reference:
        import torch

        module, stops = model.model, tuple(model.stop_token_ids)
        rows = []
        for prompt in probes:
            conversation = [{"role": "user", "content": prompt}]
            ids = model.encode_prompt(conversation)
            with torch.no_grad():
                out = module.generate(
                    input_ids=torch.tensor([ids], device=module.device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=module.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=list(stops),
                    pad_token_id=model.tokenizer.pad_token_id,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            reply = out.sequences[0, len(ids) :].tolist()
            stopped = bool(reply) and reply[-1] in stops
            reply = reply[:-1] if stopped else reply
            rows.append(
                Probe(
                    prompt=prompt,
                    prompt_text=model.render_prompt(conversation),
                    prompt_ids=tuple(ids),
                    reply_ids=tuple(reply),
                    finish_reason="stop" if stopped else "length",
                    text=model.tokenizer.decode(reply, skip_special_tokens=True),
                    scores=torch.stack([s[0].float().cpu() for s in out.scores]),
                )
            )
        described = f"transformers, {str(module.dtype).replace('torch.', '')}, {module.device.type}"
        if model.adapters:
            described += f", adapters {', '.join(Path(a).name for a in model.adapters)}"
        return cls(probes=tuple(rows), max_new_tokens=max_new_tokens, described=described, stop_ids=stops)


@dataclass(frozen=True)
class ParityReport:
    """How one GGUF file answered the probes compared with the transformers model.

    A probe is *identical* when llama.cpp picks the same reply tokens and ends the same way, a
    *near tie* when the first different token was within :data:`NEAR_TIE` logits of the
    transformers model's own pick (rounding decides such a step), else *different*.
    """

    file: str
    outtype: str
    identical: int
    near_ties: int
    total: int
    prompt_tokens_identical: int
    template_identical: bool
    chat_stops: bool
    chat_identical: bool
    expect_identical: bool
    seconds: float
    probes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.identical / self.total if self.total else 0.0

    @property
    def different(self) -> int:
        return self.total - self.identical - self.near_ties

    @property
    def passed(self) -> bool:
        """Prompts, template and stopping always; for f32/f16 also no reply that differs beyond a near tie."""
        exact = self.different == 0 if self.expect_identical else True
        return exact and self.template_identical and self.chat_stops and self.prompt_tokens_identical == self.total

    def summary(self) -> str:
        state = "ok" if self.passed else "MISMATCH"
        ties = f", {self.near_ties} near tie{'s' if self.near_ties != 1 else ''}" if self.near_ties else ""
        return (
            f"{self.file}: {self.identical}/{self.total} greedy replies identical ({self.rate:.0%}){ties}, "
            f"chat {'stops' if self.chat_stops else 'does NOT stop'} at the end-of-turn token, "
            f"template {'identical' if self.template_identical else 'DIFFERENT'} [{state}]"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "outtype": self.outtype,
            "passed": self.passed,
            "identical": self.identical,
            "near_ties": self.near_ties,
            "different": self.different,
            "total": self.total,
            "rate": round(self.rate, 4),
            "expect_identical": self.expect_identical,
            "prompt_tokens_identical": self.prompt_tokens_identical,
            "template_identical": self.template_identical,
            "chat_stops": self.chat_stops,
            "chat_identical": self.chat_identical,
            "seconds": round(self.seconds, 1),
            "probes": self.probes,
        }


def check_parity(gguf: Path, outtype: str, reference: Reference) -> ParityReport:
    """Load ``gguf`` with llama-cpp-python and compare its greedy replies with ``reference``."""
    llama_cpp = require("llama_cpp", purpose="Checking GGUF parity with llama.cpp")
    start = time.perf_counter()
    longest = max(len(p.prompt_ids) for p in reference.probes) + reference.max_new_tokens + 8
    with quiet_llama():
        llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=max(512, longest), n_threads=os.cpu_count(), seed=0, verbose=False
        )
    try:
        rows, counts = [], {"identical": 0, "near tie": 0, "different": 0}
        same_prompt = 0
        for probe in reference.probes:
            own_ids = llm.tokenize(probe.prompt_text.encode("utf-8"), add_bos=False, special=True)
            same_prompt += list(own_ids) == list(probe.prompt_ids)
            reply, reason = _greedy(llm, llama_cpp, probe.prompt_ids, reference.max_new_tokens)
            verdict, margin = _compare(probe, reply, reason, reference.stop_ids)
            counts[verdict] += 1
            rows.append(
                {
                    "prompt": probe.prompt,
                    "verdict": verdict,
                    "identical": verdict == "identical",
                    "logit_margin": None if margin is None else round(margin, 4),
                    "transformers": probe.text,
                    "llama_cpp": llm.detokenize(reply).decode("utf-8", errors="replace"),
                    "finish_reason": {"transformers": probe.finish_reason, "llama_cpp": reason},
                }
            )
        template_same = _template_identical(llm, reference)
        chat_stops, chat_same = _chat_check(llm, reference)
    finally:
        llm.close()
    return ParityReport(
        file=gguf.name,
        outtype=outtype,
        identical=counts["identical"],
        near_ties=counts["near tie"],
        total=len(rows),
        prompt_tokens_identical=same_prompt,
        template_identical=template_same,
        chat_stops=chat_stops,
        chat_identical=chat_same,
        expect_identical=outtype in EXACT_TYPES,
        seconds=time.perf_counter() - start,
        probes=rows,
    )


def _greedy(llm: Any, llama_cpp: Any, prompt_ids: Sequence[int], limit: int) -> tuple[list[int], str]:
    """llama.cpp's greedy reply tokens (without the end-of-generation token) and why it ended."""
    reply: list[int] = []
    with quiet_llama():
        for token in llm.generate(list(prompt_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                return reply, "stop"
            reply.append(token)
            if len(reply) >= limit:
                break
    return reply, "length"


def _compare(probe: Probe, reply: Sequence[int], reason: str, stops: Sequence[int]) -> tuple[str, float | None]:
    """``identical``, ``near tie`` or ``different``, with the transformers logit margin at the first difference."""
    ours = list(probe.reply_ids)
    if list(reply) == ours and reason == probe.finish_reason:
        return "identical", None
    step = next((i for i, (a, b) in enumerate(zip(ours, reply, strict=False)) if a != b), min(len(ours), len(reply)))
    if step >= len(probe.scores):
        return "different", None
    logits = probe.scores[step]
    if step < len(reply):
        theirs = float(logits[reply[step]])
    else:  # llama.cpp ended here: its best stop token against the transformers pick
        theirs = max(float(logits[i]) for i in stops)
    margin = float(logits.max()) - theirs
    return ("near tie" if margin <= NEAR_TIE else "different"), margin


def _template_identical(llm: Any, reference: Reference) -> bool:
    """The GGUF's embedded chat template renders every probe as the training template does."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return False
    model = llm._model
    eos, bos = model.token_eos(), model.token_bos()
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=model.token_get_text(eos) if eos != -1 else "",
        bos_token=model.token_get_text(bos) if bos != -1 else "",
    )
    rendered = [formatter(messages=[{"role": "user", "content": p.prompt}]).prompt for p in reference.probes]
    return rendered == [p.prompt_text for p in reference.probes]


def _chat_check(llm: Any, reference: Reference) -> tuple[bool, bool]:
    """Chat completions through llama.cpp (its embedded template and stop tokens) on up to three probes whose
    transformers reply ended by itself, with room to spare (4x the tokens): does a reply end at the end-of-turn
    token, with no stop token leaking into the text? And is the first one the transformers reply?"""
    ended = [p for p in reference.probes if p.finish_reason == "stop"][:3]
    stop_texts = [llm._model.token_get_text(i) for i in reference.stop_ids]
    stopped, leaked, first_same = [], False, False
    for i, probe in enumerate(ended):
        llm.reset()
        with quiet_llama():
            out = llm.create_chat_completion(
                messages=[{"role": "user", "content": probe.prompt}],
                max_tokens=4 * reference.max_new_tokens,
                temperature=0.0,
            )
        choice = out["choices"][0]
        content = choice["message"]["content"] or ""
        stopped.append(choice["finish_reason"] == "stop")
        leaked = leaked or any(t and t in content for t in stop_texts)
        if i == 0:
            first_same = content == probe.text
    return any(stopped) and not leaked, first_same  # no probe ended by itself: stopping was not shown


def write_parity(folder: Path, reports: Sequence[ParityReport], reference: Reference) -> Path:
    """Add ``reports`` to ``folder/parity.json`` (one entry per GGUF file), written atomically."""
    path = folder / PARITY_FILE
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
    files = data.get("files", {}) if isinstance(data.get("files"), dict) else {}
    files.update({r.file: r.to_dict() for r in reports})
    data = {
        "reference": reference.described,
        "max_new_tokens": reference.max_new_tokens,
        "probes": [p.prompt for p in reference.probes],
        "near_tie_logits": NEAR_TIE,
        "files": files,
    }
    write_json(path, data)
    return path
