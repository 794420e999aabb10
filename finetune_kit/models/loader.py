"""Loading a model: one :class:`LoadPlan` decides every ``from_pretrained`` argument before weights are read.

Inference (``ModelSource.load``) and training (``LoraTrainer.train`` with a ``ModelSource``)
go through :func:`plan_load` and :func:`load_model`; ``ModelSource.explain()`` and
``LoraTrainer.explain()`` print the plan. Dtype, placement, attention kernel and (later)
quantization and kernel patching are decided here and nowhere else.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finetune_kit._artifacts import saved_template
from finetune_kit.data.template import ChatTemplate
from finetune_kit.data.templates import get_template
from finetune_kit.errors import FinetuneKitWarning
from finetune_kit.models.adapters import apply_adapters
from finetune_kit.models.bundled import BUNDLED
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.loaded import LoadedModel
from finetune_kit.models.quantize import bnb_config, check_quantization

if TYPE_CHECKING:
    from finetune_kit.models.source import ModelSource

Purpose = Literal["inference", "training"]
_ATTENTION = {"auto": None, "sdpa": "sdpa", "disabled": "eager", "eager": "eager", "fa2": "flash_attention_2"}


@dataclass(frozen=True)
class LoadPlan:
    """How a model will be loaded: the resolved ``from_pretrained`` arguments and what is applied after.

    ``device`` is where the weights are placed at load time (``cuda:N`` under ``accelerate
    launch`` is the process's own GPU); ``template``/``default_system`` are the chat template
    chosen for the tokenizer (explicit, else the adapter's recorded one, else the bundled model's).
    """

    model: str
    purpose: Purpose
    dtype: str
    device: str
    attn_implementation: str | None
    template: str | None
    default_system: str | None
    adapters: tuple[str, ...]
    trust_remote_code: bool
    quantization_bit: int | None = None
    quantization_type: str = "nf4"
    double_quantization: bool = True
    merge_all_adapters: bool = False

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoModelForCausalLM.from_pretrained``."""
        import torch

        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype), "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.quantization_bit is not None:
            cfg = ModelConfig(
                quantization_bit=self.quantization_bit,
                quantization_type=self.quantization_type,  # type: ignore[arg-type]
                double_quantization=self.double_quantization,
            )
            kwargs["quantization_config"] = bnb_config(cfg, self.dtype)
        if self.device.startswith("cuda") and not _zero3():
            kwargs["device_map"] = {"": self.device}  # straight onto this process's GPU, no CPU copy first
        return kwargs

    def explain(self) -> str:
        adapters = ", ".join(self.adapters) if self.adapters else "none"
        if self.merge_all_adapters and self.adapters:
            adapters += " (all merged at load time; a new adapter is trained)"
        elif len(self.adapters) > 1:
            adapters += " (all but the last merged at load time)"
        quant = "none"
        if self.quantization_bit == 4:
            quant = f"bitsandbytes 4-bit {self.quantization_type}" + (", double" if self.double_quantization else "")
        elif self.quantization_bit == 8:
            quant = "bitsandbytes 8-bit (LLM.int8)"
        return "\n".join(
            [
                f"load:             {self.model} for {self.purpose}",
                f"  dtype:          {self.dtype}" + (f" (compute; weights {quant})" if self.quantization_bit else ""),
                f"  device:         {self.device}",
                f"  attention:      {self.attn_implementation or 'transformers default (sdpa where supported)'}",
                f"  template:       {self.template or 'the chat template of the tokenizer'}",
                f"  adapters:       {adapters}",
            ]
        )


def _zero3() -> bool:
    """True while DeepSpeed ZeRO-3 is configured (its training arguments exist): weights then load
    partitioned across the processes (``zero.Init``), never whole onto one GPU."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def local_device(requested: str = "auto") -> str:
    """The device this process should use: ``cpu``, or its own CUDA device (``LOCAL_RANK`` under a launcher)."""
    import torch

    if requested == "cpu" or not torch.cuda.is_available():
        return "cpu"
    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{int(rank) if rank is not None else torch.cuda.current_device()}"


def training_dtype(infer_dtype: str, *, bf16: bool, fp16: bool) -> str:
    """LLaMA-Factory's rule: weights in the mixed-precision dtype (bf16/fp16) when enabled, else float32."""
    if infer_dtype != "auto":
        return infer_dtype
    return "bfloat16" if bf16 else "float16" if fp16 else "float32"


def plan_load(
    source: ModelSource,
    *,
    purpose: Purpose = "inference",
    bf16: bool = False,
    fp16: bool = False,
    merge_all_adapters: bool = False,
) -> LoadPlan:
    """Decide how ``source`` will be loaded (nothing is read but small JSON records).

    Raises now, with the fix, when the machine cannot load it as asked (QLoRA without CUDA, a
    GPTQ/AWQ model without its kernel package). ``merge_all_adapters`` merges every adapter
    (training a new one on top: ``create_new_adapter``) instead of keeping the last one live.
    """
    import torch

    cfg = source.config
    check_quantization(cfg, path=source.local_path())
    adapters = tuple(cfg.adapter_name_or_path or ())
    template, system = cfg.template, cfg.default_system
    if template is None and adapters:
        template, saved_system = saved_template(adapters)
        system = system if system is not None else saved_system
    if template is None and source.kind == "bundled":
        template = BUNDLED[source.location].template
    device = local_device(cfg.device)
    if purpose == "training":
        dtype = training_dtype(cfg.infer_dtype, bf16=bf16, fp16=fp16)
    elif cfg.infer_dtype != "auto":
        dtype = cfg.infer_dtype
    elif device.startswith("cuda"):
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        dtype = "float32"
    return LoadPlan(
        model=source.display_name,
        purpose=purpose,
        dtype=dtype,
        device=device,
        attn_implementation=_ATTENTION[cfg.flash_attn],
        template=template,
        default_system=system,
        adapters=adapters,
        trust_remote_code=cfg.trust_remote_code,
        quantization_bit=cfg.quantization_bit,
        quantization_type=cfg.quantization_type,
        double_quantization=cfg.double_quantization,
        merge_all_adapters=merge_all_adapters,
    )


def load_tokenizer(source: ModelSource, path: Path, plan: LoadPlan) -> tuple[Any, ChatTemplate]:
    """Load the tokenizer and fit it to the plan's template (EOS = the first stop word, pad set)."""
    from transformers import AutoTokenizer

    cfg = source.config
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, token=cfg.hf_hub_token)
    template = get_template(plan.template, tokenizer, default_system=plan.default_system).with_options(
        tool_format=cfg.tool_format, enable_thinking=cfg.enable_thinking
    )
    mismatch = template.check_against(tokenizer)
    if mismatch:
        warnings.warn(mismatch, FinetuneKitWarning, stacklevel=3)
    template.fit_tokenizer(tokenizer)  # LLaMA-Factory's fix-up: EOS = the template's stop word, pad set
    return tokenizer, template


def load_model(source: ModelSource, plan: LoadPlan | None = None) -> LoadedModel:
    """Resolve ``source`` and load tokenizer, template, weights and adapters as ``plan`` says."""
    from transformers import AutoModelForCausalLM

    plan = plan or plan_load(source)
    path = source.resolve()
    check_quantization(source.config, path=path)
    tokenizer, template = load_tokenizer(source, path, plan)
    model = AutoModelForCausalLM.from_pretrained(path, **plan.from_pretrained_kwargs())
    if plan.adapters:
        model = apply_adapters(
            model, plan.adapters, trainable=plan.purpose == "training", merge_all=plan.merge_all_adapters
        )
    resolved = source.with_config(template=plan.template, default_system=plan.default_system)
    return LoadedModel(source=resolved, model=model, tokenizer=tokenizer, template=template, adapters=plan.adapters)
