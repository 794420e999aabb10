"""The models the board holds in its own process, for the Evaluate, Export and Chat tabs.

Training runs in a child process; evaluating, exporting and chatting use a
:class:`~finetune_kit.models.loaded.LoadedModel` loaded here, once, and kept until another one is
asked for (at most :data:`KEPT` at a time: a base model and its tuned version for a before/after
comparison).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from finetune_kit.errors import ConfigError
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.loaded import LoadedModel
from finetune_kit.models.source import ModelSource

KEPT = 2


@dataclass(frozen=True)
class ModelChoice:
    """What the board's model row names: a model, adapters on top (comma separated) and a template."""

    model: str
    adapters: str = ""
    template: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", (self.model or "").strip())
        object.__setattr__(self, "adapters", ",".join(a.strip() for a in (self.adapters or "").split(",") if a.strip()))
        object.__setattr__(self, "template", (self.template or "").strip())
        if not self.model:
            raise ConfigError(
                "no model chosen. Fix: pick bundled:smollm2-135m-instruct, a local model folder, a merged export "
                "or a hub id in the local cache",
                header="Cannot load a model",
            )

    @property
    def base(self) -> ModelChoice:
        """The same model without adapters."""
        return ModelChoice(self.model, "", self.template)

    def describe(self) -> str:
        return self.model + (f" + {self.adapters}" if self.adapters else "")

    def source(self) -> ModelSource:
        """The :class:`ModelSource` these settings name (checked like the CLI's keys)."""
        return ModelSource.from_config(
            ModelConfig(
                model_name_or_path=self.model,
                adapter_name_or_path=tuple(self.adapters.split(",")) if self.adapters else None,
                template=self.template or None,
            )
        )


class ModelCache:
    """Loads models on request and keeps the last :data:`KEPT`; thread-safe (gradio calls from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: OrderedDict[ModelChoice, LoadedModel] = OrderedDict()

    def __repr__(self) -> str:
        return f"ModelCache({[c.describe() for c in self._models]})"

    def get(self, choice: ModelChoice) -> LoadedModel:
        """The loaded model for ``choice`` (loaded now unless held)."""
        with self._lock:
            if choice in self._models:
                self._models.move_to_end(choice)
                return self._models[choice]
            while len(self._models) >= KEPT:
                self._models.popitem(last=False)
            model = choice.source().load()
            self._models[choice] = model
            return model

    def base_of(self, choice: ModelChoice, tuned: LoadedModel) -> LoadedModel:
        """The base model of ``choice`` with ``tuned``'s chat template, so a before/after prompts both alike."""
        return self.get(ModelChoice(choice.model, "", choice.template or tuned.template.name))

    def held(self) -> list[str]:
        return [c.describe() for c in self._models]

    def clear(self) -> None:
        """Let go of every model (their memory is freed once nothing else holds them)."""
        with self._lock:
            self._models.clear()
