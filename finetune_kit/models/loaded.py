"""LoadedModel: a model, its tokenizer and its chat template, ready to chat, train or serve."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finetune_kit.data.template import ChatTemplate, Message, get_template
from finetune_kit.models.generation import GenerationConfig

if TYPE_CHECKING:
    from finetune_kit.models.source import ModelSource

RUN_CONFIG = "finetune_kit_config.json"
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    """One generated reply with its token counts and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class LoadedModel:
    """A loaded causal LM with tokenizer and chat template.

    ``model`` is a ``transformers`` model, or a ``peft.PeftModel`` when an adapter is applied.
    Example::

        model = ModelSource.bundled().load()
        print(model.chat("你们包邮吗？", max_new_tokens=40))
    """

    source: ModelSource
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    template: ChatTemplate = field(repr=False)
    adapters: tuple[str, ...] = ()

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        adapters = f", adapters={list(self.adapters)}" if self.adapters else ""
        return (f"LoadedModel({self.source.display_name}, {n / 1e6:.1f}M params, template={self.template.name}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, device={self.device}{adapters})")

    @property
    def dtype(self) -> Any:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a reply: EOS, the template's stop words and generation_config's EOS."""
        ids = self.template.stop_token_ids(self.tokenizer)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for tid in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
            if tid not in ids:
                ids.append(int(tid))
        return ids

    def with_adapter(self, path: str | Path) -> LoadedModel:
        """Return a new LoadedModel with the LoRA adapter at ``path`` applied on top (not merged)."""
        return load_model(self.source.with_config(adapter_name_or_path=(*self.adapters, str(path))))

    # ------------------------------------------------------------------ generation
    def encode_prompt(self, messages: str | Sequence[Message], system: str | None = None) -> list[int]:
        msgs = _as_messages(messages, system)
        text = self.template.prompt(msgs, self.tokenizer)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: str | Sequence[Message], *, system: str | None = None,
             generation: GenerationConfig | None = None, **overrides: Any) -> str:
        """Answer one conversation (or a single user string) and return the reply text.

        ``overrides`` are :class:`GenerationConfig` fields, e.g. ``max_new_tokens=64, do_sample=False``.
        """
        gen = (generation or GenerationConfig()).with_(**overrides) if overrides else (generation or GenerationConfig())
        return self.generate([_as_messages(messages, system)], gen)[0].text

    def generate(self, conversations: Sequence[Sequence[Message]], generation: GenerationConfig | None = None,
                 *, batch_size: int = 8, stop: Sequence[str] = ()) -> list[Completion]:
        """Generate replies for many conversations, in left-padded batches."""
        import torch

        gen = generation or GenerationConfig()
        results: list[Completion] = []
        prompts = [self.encode_prompt(c) for c in conversations]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        self.model.eval()
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id,
                                          eos_token_id=self.stop_token_ids, **self._stop_kwargs(stop),
                                          **gen.to_hf_kwargs())
            for row in out[:, width:].tolist():
                results.append(self._finish(row, len(chunk[len(results) - start]), gen, stop))
        return results

    def stream(self, messages: str | Sequence[Message], generation: GenerationConfig | None = None, *,
               system: str | None = None, stop: Sequence[str] = ()) -> Iterator[str | Completion]:
        """Yield text pieces as they are generated, then one final :class:`Completion`."""
        import torch
        from transformers import TextIteratorStreamer

        gen = generation or GenerationConfig()
        prompt = self.encode_prompt(messages, system)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=gen.skip_special_tokens)
        holder: dict[str, Any] = {}
        ids = torch.tensor([prompt], device=self.device)

        def run() -> None:
            try:
                with torch.inference_mode():
                    holder["out"] = self.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_token_ids,
                        **self._stop_kwargs(stop), **gen.to_hf_kwargs())
            except BaseException as exc:  # re-raised in the consuming thread
                holder["error"] = exc
                streamer.end()

        self.model.eval()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        sent = ""  # text already yielded
        seen = ""  # text generated so far
        stopped_early = False
        for piece in streamer:
            seen += piece
            cut = _cut_at_stop(seen, stop)
            if cut is not None:
                if cut > len(sent):
                    yield seen[len(sent):cut]
                stopped_early = True
                break
            # hold back a tail that could start a stop string, or be half of a character
            safe = len(seen) - max(_stop_prefix_len(seen, stop), len(seen) - len(seen.rstrip("\ufffd")))
            if safe > len(sent):
                yield seen[len(sent):safe]
                sent = seen[:safe]
        if stopped_early:  # drain after a stop string so the generation thread can finish
            for _ in streamer:
                pass
        thread.join()
        if "error" in holder:
            raise holder["error"]
        row = holder["out"][0, len(prompt):].tolist()
        final = self._finish(row, len(prompt), gen, stop)
        if not stopped_early and len(final.text) > len(sent) and final.text.startswith(sent):
            yield final.text[len(sent):]  # the held-back tail turned out not to be a stop string
        yield final

    def _stop_kwargs(self, stop: Sequence[str]) -> dict[str, Any]:
        return {"stop_strings": list(stop), "tokenizer": self.tokenizer} if stop else {}

    def _finish(self, row: list[int], n_prompt: int, gen: GenerationConfig, stop: Sequence[str]) -> Completion:
        stops = set(self.stop_token_ids)
        pad = self.tokenizer.pad_token_id
        tokens: list[int] = []
        reason: FinishReason = "length"
        for tid in row:
            if tid in stops:
                reason = "stop"
                break
            tokens.append(tid)
        if reason == "length" and pad is not None and pad not in stops:
            while tokens and tokens[-1] == pad:
                tokens.pop()
        text = self.tokenizer.decode(tokens, skip_special_tokens=gen.skip_special_tokens)
        if reason == "length":
            text = text.rstrip("\ufffd")  # the token limit split a multi-byte character
        cut = _cut_at_stop(text, stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        return Completion(text=text, prompt_tokens=n_prompt, completion_tokens=len(tokens), finish_reason=reason)


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


def _cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _as_messages(messages: str | Sequence[Message], system: str | None = None) -> list[Message]:
    msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else [dict(m) for m in messages]
    if system is not None and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _saved_template(adapters: Sequence[str]) -> tuple[str | None, str | None]:
    """The template (and default system) an adapter was trained with, from its saved run config."""
    for path in reversed(adapters):
        cfg = Path(path) / RUN_CONFIG
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            model_cfg = data.get("config", {}).get("model", {})
            return model_cfg.get("template"), model_cfg.get("default_system")
    return None, None


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def attn_implementation(flash_attn: str) -> str | None:
    return {"auto": None, "sdpa": "sdpa", "disabled": "eager", "eager": "eager", "fa2": "flash_attention_2"}[flash_attn]


def load_tokenizer(source: ModelSource, path: Path, template_name: str | None) -> tuple[Any, ChatTemplate]:
    """Load the tokenizer and fix it up for ``template_name`` (EOS = first stop word, pad set)."""
    from transformers import AutoTokenizer

    cfg = source.config
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, token=cfg.hf_hub_token)
    template = get_template(template_name, tokenizer, default_system=cfg.default_system)
    if template.stop_words:
        first = template.stop_words[0]
        tid = tokenizer.convert_tokens_to_ids(first)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.eos_token != first:
            tokenizer.eos_token = first  # like LLaMA-Factory's replace_eos: replies end with the stop word
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, template


def load_model(source: ModelSource, *, for_training: bool = False) -> LoadedModel:
    """Resolve ``source``, load tokenizer, template, weights and adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = source.config
    path = source.resolve()
    adapters = tuple(cfg.adapter_name_or_path or ())
    template_name, saved_system = cfg.template, None
    if template_name is None and adapters:
        template_name, saved_system = _saved_template(adapters)
    if cfg.default_system is None and saved_system is not None:
        source = source.with_config(default_system=saved_system)
    if template_name is None and source.kind == "bundled":
        from finetune_kit.models.bundled import BUNDLED

        template_name = BUNDLED[source.location][2]
    tokenizer, template = load_tokenizer(source, path, template_name)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(cfg.infer_dtype, device), "trust_remote_code": cfg.trust_remote_code}
    attn = attn_implementation(cfg.flash_attn)
    if attn:
        kwargs["attn_implementation"] = attn
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not for_training:
        model.to(device)
    if adapters:
        from finetune_kit.models.adapters import apply_adapters

        model = apply_adapters(model, adapters, trainable=for_training)
    source = replace(source, config=source.config.with_(template=template_name))
    return LoadedModel(source=source, model=model, tokenizer=tokenizer, template=template, adapters=adapters)
