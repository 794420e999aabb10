"""Exporter: merge a trained adapter into its base model and save it for transformers, vLLM or llama.cpp."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finetune_kit._artifacts import provenance
from finetune_kit.errors import ConfigError
from finetune_kit.export._write import prepare_target, write_export
from finetune_kit.export.config import ExportConfig
from finetune_kit.export.gguf_set import write_gguf_set
from finetune_kit.export.hub import push_to_hub
from finetune_kit.export.result import ExportedModel, GgufExport
from finetune_kit.models.adapters import is_peft, merged_clone
from finetune_kit.models.loaded import LoadedModel
from finetune_kit.models.quantize import is_quantized, prequantized_method, saved_dtype
from finetune_kit.models.source import ModelSource


@dataclass(frozen=True)
class Exporter:
    """Merge LoRA weights into the base and write sharded safetensors with tokenizer and chat template.

    ``model`` is what to export: a ``TrainResult`` (its trained model is taken from memory), a
    :class:`LoadedModel` (base plus adapters, as held), or a :class:`ModelSource` whose config
    names adapters (loaded here, on the device ``export_device`` says). A model held in memory is
    never changed: the layers an adapter touches are merged in a copy. Example::

        exported = Exporter(result).with_config(export_size=2).merge("merged-model")
    """

    model: Any
    config: ExportConfig = ExportConfig()

    def __post_init__(self) -> None:
        if not (isinstance(self.model, (LoadedModel, ModelSource)) or callable(getattr(self.model, "load", None))):
            raise TypeError(
                f"Exporter needs a TrainResult, a LoadedModel or a ModelSource, got "
                f"{type(self.model).__name__}. Fix: Exporter(trainer.train(data))"
            )

    def __repr__(self) -> str:
        return f"Exporter({self.model!r}, export_size={self.config.export_size}GB)"

    def with_config(self, **changes: Any) -> Exporter:
        return replace(self, config=self.config.with_(**changes))

    def _resolve(self) -> tuple[LoadedModel, bool]:
        """The model to merge, and whether this Exporter owns it (then it may be merged in place)."""
        if isinstance(self.model, LoadedModel):
            return self.model, False
        held = getattr(self.model, "model", None)  # a TrainResult that still holds its trained model
        if isinstance(held, LoadedModel) and not is_quantized(held.model):
            return held, False
        # "auto": the load plan's rule (this process's GPU if there is one, else the CPU). A quantized
        # (QLoRA) model is merged into the base loaded again in 16 bits, never into 4/8-bit weights.
        changes: dict[str, Any] = {"device": "auto" if self.config.export_device == "auto" else "cpu"}
        base = getattr(self.model, "base", self.model)
        if isinstance(held, LoadedModel) or base.config.quantization_bit is not None:
            changes["quantization_bit"] = None
        if base.config.infer_dtype == "auto":  # merge in the dtype the base was saved in (not float32 on a CPU)
            dtype = saved_dtype(base.resolve())
            if dtype in ("bfloat16", "float16"):
                changes["infer_dtype"] = dtype
        return self.model.load(**changes), True

    def merge(self, export_dir: str | Path | None = None) -> ExportedModel:
        """Merge and write to ``export_dir`` (or the config's); returns the :class:`ExportedModel`.

        The folder is written under a temporary name and renamed at the end: an interrupted
        export leaves nothing half-written, and an existing folder is kept until the new one is complete.
        """
        target = export_dir if export_dir is not None else self.config.export_dir
        if not target:
            raise ConfigError("export_dir is required. Fix: pass export_dir='merged-model' (or --export_dir)")
        target = Path(target)
        prepare_target(target, self.config.overwrite_export_dir)
        self._refuse_prequantized()
        model, owned = self._resolve()
        if owned:
            merged = model.model.merge_and_unload() if is_peft(model.model) else model.model
        else:
            merged = merged_clone(model.model)
        template = None if model.template.is_native else model.template.name
        info = provenance(
            "export",
            model=model.source.display_name,
            adapters=model.adapters,
            template=model.template.name,
            config={
                "export": self.config.with_(export_dir=str(target)).to_dict(),
                "model": model.source.config.with_(template=template).to_saved_dict(),
            },
        )
        exported = write_export(
            model,
            merged,
            target,
            shard_gb=self.config.export_size,
            legacy=self.config.export_legacy_format,
            info=info,
            metrics=getattr(self.model, "metrics", None),
        )
        if self.config.export_gguf:
            reference = model if not owned else replace(model, model=merged, adapters=())
            ggufs = write_gguf_set(exported.export_dir, exported.export_dir, reference, self.config)
            exported = replace(exported, files=tuple(sorted(p.name for p in exported.export_dir.iterdir())), gguf=ggufs)
        if self.config.export_hub_model_id:
            token = model.source.config.hf_hub_token
            url = push_to_hub(exported.export_dir, self.config.export_hub_model_id, token=token)
            exported = replace(exported, hub_url=url)
        return exported

    def to_gguf(
        self,
        path: str | Path,
        outtype: str | Sequence[str] = "f16",
        *,
        parity: bool = True,
        ollama: str | None = None,
        num_ctx: int | None = None,
        probes: Sequence[str] | None = None,
    ) -> GgufExport:
        """Write GGUF file(s) for llama.cpp and Ollama into the folder ``path``, with a ``Modelfile``.

        ``outtype``: f32, f16, bf16, q8_0 (llama.cpp's converter) or q4_K_M, q5_K_M, q6_K (llama.cpp's
        quantizer), or several. With ``parity`` each file is checked with llama.cpp against this
        model (greedy replies to probe prompts, the chat template, stopping) and ``parity.json`` is
        written beside it. ``ollama`` names the model for ``ollama create`` when Ollama is installed;
        ``num_ctx`` overrides the Modelfile's context (default: the training cutoff_len); ``probes`` are
        the parity prompts (default: a fixed mix of English and Chinese questions). Example::

            gguf = Exporter(result).to_gguf("gguf/shop", "q4_K_M")
            print(gguf.parity[0].summary())
        """
        types = (outtype,) if isinstance(outtype, str) else tuple(outtype)
        config = self.config.with_(export_gguf=types, gguf_parity=parity, export_ollama=ollama, ollama_num_ctx=num_ctx)
        folder = Path(path).resolve()
        if folder.suffix == ".gguf":
            raise ConfigError(
                f"to_gguf takes a folder, got the file name {folder.name}. "
                f"Fix: to_gguf('{folder.parent / folder.stem}') (files are named <folder>-<type>.gguf)"
            )
        folder_source = self._merged_folder()
        if folder_source is not None:
            return write_gguf_set(folder_source, folder, self._reference(), config, probes=probes)
        model, _ = self._resolve()
        staging = folder.parent / f".{folder.name}.merging"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            # a LoadedModel is merged in a copy, so ``model`` keeps its live adapter: it is the reference
            Exporter(model, self.config.with_(export_gguf=())).merge(staging)
            return write_gguf_set(staging, folder, model, config, probes=probes)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _refuse_prequantized(self) -> None:
        """A base saved quantized (GPTQ, AWQ, ...) cannot take merged weights: say what to do instead."""
        held = self.model if isinstance(self.model, LoadedModel) else getattr(self.model, "model", None)
        method = None
        if isinstance(held, LoadedModel):
            quant = getattr(getattr(held.model, "config", None), "quantization_config", None)
            method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
            method = str(getattr(method, "value", method)).lower() if method else None
        if method is None:
            base = getattr(self.model, "base", self.model)
            local = base.local_path() if isinstance(base, ModelSource) else None
            method = prequantized_method(local) if local is not None and local.is_dir() else None
        if method and method != "bitsandbytes":
            raise ConfigError(
                f"the base model's weights are saved {method.upper()}-quantized, and an adapter cannot be merged "
                "into quantized weights. Fix: merge into the 16-bit model it was quantized from (model_name_or_path: "
                "that model, same adapter_name_or_path), then export_gguf: q4_K_M for a quantized file; or serve "
                "the base with the adapter unmerged (finetune-kit api ... --adapter_name_or_path ...)"
            )

    def _merged_folder(self) -> Path | None:
        """A folder already holding a plain merged model (an export, or a local model without adapters)."""
        if isinstance(self.model, ExportedModel):
            return self.model.export_dir
        if isinstance(self.model, ModelSource) and not self.model.config.adapter_name_or_path:
            local = self.model.local_path()
            if local is not None and local.is_dir() and (local / "config.json").is_file():
                return local
        return None

    def _reference(self) -> LoadedModel:
        """The model the GGUF files are checked against (and whose template the Modelfile writes)."""
        if isinstance(self.model, ExportedModel):
            return self.model.load()
        model, _ = self._resolve()
        return model
