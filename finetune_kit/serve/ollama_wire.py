"""Ollama's wire format around the engine: requests read into messages and settings, and the model described.

The request bodies themselves are pydantic models in :mod:`finetune_kit.serve.protocol`
(``OllamaChatRequest``, ...); :mod:`finetune_kit.serve.ollama_api` serves the routes. Texts and
defaults follow ``ollama/ollama``: ``server/routes.go`` (errors, load/unload answers),
``api/types.go`` (``Duration``, ``Options``, ``ModelDetails``), ``template/template.go``
(``collate``) and ``format/format.go`` (``HumanNumber``).
"""

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from finetune_kit.data.messages import Message
from finetune_kit.errors import ConfigError, RequestError, TemplateError
from finetune_kit.export.ollama import go_template, stop_strings
from finetune_kit.models.engine import Engine
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.loaded import LoadedModel
from finetune_kit.models.sampling import NO_EXTRAS, SamplingExtras

if TYPE_CHECKING:
    from finetune_kit.serve.protocol import OllamaOptions, OllamaRequest

FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
"""Go's largest Duration: what Ollama's keep_alive < 0 ("never unload") becomes, added to now by /api/ps."""
_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")


def refuse_unsupported(body: "OllamaRequest") -> None:
    """The 400s both generating routes give for what the engine cannot do (texts from routes.go)."""
    if body.think not in (None, False):
        raise RequestError(f'"{body.model}" does not support thinking')
    if body.logprobs:
        raise RequestError("logprobs: this server does not return log probabilities")
    wants_json(body.format)
    unloads(body.keep_alive)


def wants_json(fmt: str | dict[str, Any] | None) -> bool:
    """Whether the reply must be JSON; a schema, or any other value, is a 400."""
    if fmt in (None, ""):
        return False
    if fmt == "json":
        return True
    if isinstance(fmt, dict):
        raise RequestError(
            "format: a JSON schema cannot be enforced here (this server does not constrain decoding). Fix: send "
            'format "json" (the reply is then checked to be JSON) and describe the schema in the prompt'
        )
    raise RequestError(f'invalid format: expected "json" or a valid JSON schema; got {fmt!r}')


def unloads(keep_alive: float | str | None) -> bool:
    """Whether ``keep_alive`` asks to unload now (zero), read as Ollama's Duration.UnmarshalJSON reads it."""
    if keep_alive is None:
        return False
    if isinstance(keep_alive, (int, float)):
        if not math.isfinite(keep_alive):  # JSON's 1e999 reads as infinity; Go's decoder refuses it
            raise RequestError(f"keep_alive: got {keep_alive}; expected a finite number of seconds, e.g. 300 or -1")
        return int(keep_alive) == 0  # Ollama: a number is whole seconds
    text = keep_alive.strip().lstrip("+-")
    if text == "0":
        return True
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise RequestError(f'keep_alive: time: invalid duration "{keep_alive}" (expected e.g. "5m", "1h", 0 or -1)')
    return all(float(n) == 0 for n, _ in parts)


def conversation(messages: Sequence[Any]) -> list[Message]:
    """Ollama's collate: system messages joined into one, consecutive same-role messages merged with a blank line."""
    system: list[str] = []
    turns: list[Message] = []
    for i, msg in enumerate(messages):
        role = msg.role.lower()
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                f"messages[{i}].role: got {msg.role!r}; this server takes system, user and assistant messages "
                "(no tool messages: the model is served without tool support)"
            )
        if msg.images or msg.tool_calls:
            what = "images" if msg.images else "tool_calls"
            raise RequestError(f"messages[{i}].{what}: this server serves a text-only model without tool support")
        if role == "system":
            system.append(msg.content)
        elif turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + msg.content
        else:
            turns.append({"role": role, "content": msg.content})
    if not turns or turns[0]["role"] != "user" or turns[-1]["role"] != "user":
        raise RequestError(
            "messages: after the system messages the conversation must start and end with a user message "
            "(this server answers the last user message and cannot continue an assistant reply)"
        )
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + turns


def generation_options(
    options: "OllamaOptions | None",
    default: GenerationConfig,
    prompt_tokens: int,
    context: int | None,
    limit_tokens: int | None = None,
) -> tuple[GenerationConfig, list[str]]:
    """``options`` over the server's defaults, by the OpenAI route's rules (temperature 0 or top_p 0 is greedy).

    ``num_predict`` absent keeps the server's ``max_new_tokens``; 0 or less (Ollama's -1 "no limit",
    -2 "fill the context") means up to the context length, or up to ``limit_tokens`` (the server's
    ``max_tokens_limit``). No reply outgrows the context; an explicit ``num_predict`` above
    ``limit_tokens`` is a 400.
    """
    if options is not None and options.num_predict and limit_tokens and options.num_predict > limit_tokens:
        raise RequestError(
            f"num_predict is {options.num_predict}, above this server's limit of {limit_tokens} tokens per reply. "
            f"Fix: ask for at most {limit_tokens}"
        )
    room = context - prompt_tokens if context else None
    if room is not None and room <= 0:
        raise RequestError(
            f"the prompt takes {prompt_tokens} tokens but this model's context length is {context}. "
            "Fix: shorten the messages"
        )
    changes: dict[str, Any] = {}
    if options is None:
        limit = default.max_new_tokens
    else:
        from finetune_kit.serve.protocol import sampling_changes  # pydantic's module: imported on use

        changes.update(sampling_changes(None, options.temperature, options.top_p))
        if options.top_k is not None:
            changes["top_k"] = options.top_k
        if options.repeat_penalty is not None:
            changes["repetition_penalty"] = options.repeat_penalty
        asked = options.num_predict
        limit = default.max_new_tokens if asked is None else asked if asked > 0 else room or default.max_new_tokens
    if limit_tokens is not None:
        limit = min(limit, limit_tokens)
    changes["max_new_tokens"] = min(limit, room) if room is not None else limit
    stop = [s for s in (options.stop or []) if s] if options else []
    try:
        return default.with_(**changes), stop
    except ConfigError as exc:
        raise RequestError(f"options: {exc}") from exc


def sampling_extras(options: "OllamaOptions | None") -> SamplingExtras:
    """``options.seed`` and the two penalties, as the OpenAI routes read them."""
    if options is None:
        return NO_EXTRAS
    try:
        return SamplingExtras(
            seed=options.seed,
            presence_penalty=float(options.presence_penalty or 0.0),
            frequency_penalty=float(options.frequency_penalty or 0.0),
        )
    except ValueError as exc:
        raise RequestError(f"options: {exc}") from None


def json_problem(text: str) -> str | None:
    """Why ``text`` fails ``format: "json"``, or None when it parses."""
    try:
        json.loads(text)
    except ValueError as exc:
        return (
            f'format "json" was asked for but the reply is not valid JSON ({exc}): {text[:200]!r}. This server '
            "checks JSON replies but does not constrain decoding; ask for JSON in the prompt or the system message"
        )
    return None


@dataclass(frozen=True)
class ModelFacts:
    """What /api/tags, /api/ps and /api/show say about the served model, worked out once."""

    tagged: str
    aliases: frozenset[str]
    size: int = 0
    digest: str = ""
    on_gpu: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    template: str = ""
    system: str = ""
    stops: tuple[str, ...] = ()
    origin: tuple[str, ...] = ()
    modified_at: str = field(default_factory=lambda: timestamp(datetime.now(timezone.utc)))

    def listing(self) -> dict[str, Any]:
        return {
            **{"name": self.tagged, "model": self.tagged, "modified_at": self.modified_at},
            **{"size": self.size, "digest": self.digest, "details": self.details},
        }

    def show(self, gen: GenerationConfig, context: int | None) -> dict[str, Any]:
        params: list[tuple[str, Any]] = [("stop", s) for s in self.stops]
        params += [("num_ctx", context)] if context else []
        params += [("num_predict", gen.max_new_tokens), ("temperature", 0 if gen.greedy else gen.temperature)]
        params += [("top_k", gen.top_k), ("top_p", gen.top_p), ("repeat_penalty", gen.repetition_penalty)]
        lines = [
            *('# Modelfile generated by "ollama show"', "# To build a new Modelfile based on this, replace FROM with:"),
            *(f"# FROM {self.tagged}", "", *self.origin),
            *([f"TEMPLATE {_quoted(self.template)}"] if self.template else []),
            *([f"SYSTEM {_quoted(self.system)}"] if self.system else []),
            *(f"PARAMETER {key} {_go_value(value)}" for key, value in params),
        ]
        out = {
            **{
                "modelfile": "\n".join(lines) + "\n",
                "parameters": "\n".join(f"{k:<30} {_go_value(v)}" for k, v in params),
            },
            **({"template": self.template} if self.template else {}),
            **({"system": self.system} if self.system else {}),
            **{"details": self.details, "model_info": self.model_info, "capabilities": ["completion"]},
        }
        return {**out, "modified_at": self.modified_at}


def describe_model(engine: Engine, name: str) -> ModelFacts:
    """The facts of ``engine`` served as ``name``: weights, architecture and Go template for a LoadedModel,
    only the name for another backend. ``size`` counts parameter bytes; ``digest`` hashes name, config,
    adapters and template, so it changes exactly when the served model does."""
    tagged = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
    aliases = frozenset({tagged.casefold(), tagged.removesuffix(":latest").casefold()})
    details: dict[str, Any] = {"parent_model": "", "format": "", "family": "", "families": None}
    if not isinstance(engine, LoadedModel):  # another backend: only what the Engine protocol tells
        digest = hashlib.sha256(f"{type(engine).__qualname__}:{name}".encode()).hexdigest()
        details |= {"parameter_size": "", "quantization_level": ""}
        return ModelFacts(tagged, aliases, digest=digest, details=details, origin=(f"FROM {tagged}",))
    config = getattr(engine.model, "config", None)
    arch = str(getattr(config, "model_type", "") or "")
    params = list(engine.model.parameters())
    count = sum(p.numel() for p in params)
    described = {"name": name, "config": config.to_dict() if config is not None else None}
    described |= {"adapters": list(engine.adapters), "template": engine.template.name}
    details |= {"format": "safetensors", "family": arch, "families": [arch] if arch else None}
    details |= {"parameter_size": _human_number(count), "quantization_level": _quantization(config, engine.dtype)}
    info: dict[str, Any] = {"general.architecture": arch, "general.basename": name, "general.parameter_count": count}
    for key, attr in (
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("block_count", "num_hidden_layers"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
    ):
        if isinstance(value := getattr(config, attr, None), int):
            info[f"{arch}.{key}"] = value
    try:
        template = go_template(engine.template, engine.tokenizer)
    except TemplateError:  # the tokenizer's own Jinja template: no Go TEMPLATE to show
        template = ""
    local = engine.source.local_path()
    return ModelFacts(
        tagged,
        aliases,
        size=sum(p.numel() * p.element_size() for p in params),
        digest=hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest(),
        on_gpu=engine.device.type != "cpu",
        details=details,
        model_info=info,
        template=template,
        system=engine.template.default_system,
        stops=tuple(stop_strings(engine.template, engine.tokenizer)),
        origin=(f"FROM {local if local is not None else tagged}", *(f"ADAPTER {a}" for a in engine.adapters)),
    )


def _quantization(config: Any, dtype: Any) -> str:
    """Ollama's quantization_level: the weights' float type (F32, BF16, ...) or the quantization's name."""
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        spec = quant if isinstance(quant, dict) else quant.to_dict()
        if spec.get("load_in_4bit"):
            return str(spec.get("bnb_4bit_quant_type", "nf4")).upper()
        return "INT8" if spec.get("load_in_8bit") else str(spec.get("quant_method", "quantized")).upper()
    kind = str(dtype).removeprefix("torch.")
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(kind, kind.upper())


def _human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 134515008 -> "134.52M", 7000000000 -> "7B"."""
    for size, unit, decimals in ((10**9, "B", 1), (10**6, "M", 2)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


def _go_value(value: Any) -> str:
    """A parameter value as Go's %#v writes it: strings quoted, numbers bare."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _quoted(text: str) -> str:
    return f'"""{text}"""' if '"""' not in text else json.dumps(text, ensure_ascii=False)


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, as Go writes ``time.Now().UTC()``."""
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
