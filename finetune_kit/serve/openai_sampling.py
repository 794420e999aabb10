"""The OpenAI request fields shared by chat completions and completions that steer sampling.

``seed``, ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` become a
:class:`~finetune_kit.models.sampling.SamplingExtras` (their OpenAI meaning is stated there);
``response_format`` asks for a JSON object, which the server checks the reply against.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# imported only by the serve routes, after Server has checked the serve extra (which brings pydantic)
from pydantic import BaseModel, Field, field_validator

from finetune_kit.errors import RequestError
from finetune_kit.models.engine import Completion
from finetune_kit.models.sampling import SamplingExtras

MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries


class SamplingFields(BaseModel):
    """Mixed into a request model: the sampling extras and ``response_format``."""

    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens; got {len(value)}")
        for key, bias in value.items():
            if not (key.strip().isascii() and key.strip().isdigit()):
                raise ValueError(
                    f'logit_bias keys are token ids written as strings, e.g. {{"50256": -100}}; got {key!r}'
                )
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{key}] is {bias}; a bias must be from -100 to 100")
        return value

    def extras(self, vocab_size: int | None) -> SamplingExtras:
        """The sampling extras of this request; a token id outside the vocabulary is a 400."""
        bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if vocab_size is not None:
            for token in bias:
                if token >= vocab_size:
                    raise RequestError(
                        f"logit_bias names token {token}, but this model's vocabulary has {vocab_size} tokens "
                        f"(ids 0 to {vocab_size - 1})",
                        param="logit_bias",
                    )
        return SamplingExtras(
            seed=self.seed,
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
            logit_bias=bias,
        )

    def json_mode(self, prompt_text: str) -> bool:
        """Whether a JSON object is asked for; as OpenAI does, the prompt must then mention JSON."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return False
        if kind != "json_object":
            raise RequestError(
                f"response_format {kind!r} is not supported; use 'json_object' (describe the schema in the prompt) "
                "or 'text'",
                param="response_format",
            )
        if "json" not in prompt_text.lower():
            raise RequestError(
                "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                "'json_object'. Fix: ask for JSON in the system or user message",
                param="response_format",
            )
        return True


def check_json(done: Sequence[Completion]) -> None:
    """Each reply that ended by itself must be one JSON object (a reply cut by max_tokens may not be)."""
    for i, c in enumerate(done):
        if c.finish_reason != "stop":
            continue
        try:
            value = json.loads(c.text)
        except ValueError as exc:
            problem = f"is not valid JSON ({exc})"
        else:
            if isinstance(value, dict):
                continue
            problem = f"is JSON but not an object (a {type(value).__name__})"
        raise RequestError(
            f"response_format json_object was asked for, but reply {i} {problem}: {c.text[:200]!r}. The model "
            "did not follow the instruction; fine-tune it on JSON answers or say more clearly in the prompt "
            "what JSON to write",
            status=500,
            type="server_error",
            code="invalid_json_output",
        )
