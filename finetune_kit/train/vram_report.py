"""The GPU memory plan as a result: :class:`MemoryPlan` (parts, total, ``fits``, ``render``) and the
search for the cheapest setting changes that make a run fit (:func:`finetune_kit.train.vram.suggest`).

The planner itself (shape, settings, the calibrated constants) lives in :mod:`finetune_kit.train.vram`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_kit.train.vram import MemoryInputs, ModelShape

GIB = 2**30
PARTS = ("weights", "trainable_weights", "gradients", "optimizer", "activations", "logits", "overhead")
_NOTES = {
    "weights": "frozen weights as stored (+ bf16 autocast copies, ZeRO-3 gathered layers)",
    "trainable_weights": "weights the optimizer updates",
    "gradients": "their gradients that exist at the peak",
    "optimizer": "optimizer states (+ step temporaries)",
    "activations": "kept by the forward pass for backward",
    "logits": "float32 logits / log-softmax work of the loss",
    "overhead": "CUDA context, allocator fragmentation",
}


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak GPU memory of one GPU, by part, at the moment of the peak (``peak_phase``:
    ``backward start`` when activations and logits peak, ``optimizer step`` when gradients do).

    Parts (bytes): ``weights`` frozen weights as stored, plus autocast's bf16 copies of float32
    weights and ZeRO-3's gathered layers; ``trainable_weights`` the weights the optimizer updates;
    ``gradients`` their gradients that exist at that moment (none at backward start without
    accumulation: the trainer frees them after each step); ``optimizer`` its states (and the step's
    temporaries); ``activations`` what the forward pass keeps for backward; ``logits`` the loss's
    float32 logits work; ``overhead`` the CUDA context and allocator fragmentation.
    ``allocated`` compares with ``torch.cuda.max_memory_allocated()``, ``total`` with the GPU's size.
    """

    shape: ModelShape
    inputs: MemoryInputs
    breakdown: dict[str, int] = field(default_factory=dict)
    peak_phase: str = "backward start"

    def __repr__(self) -> str:
        return f"MemoryPlan({self.gib:.1f} GiB per GPU at {self.peak_phase}: {self.inputs.describe()})"

    @property
    def allocated(self) -> int:
        """Bytes in PyTorch tensors at the peak (what ``torch.cuda.max_memory_allocated()`` reports)."""
        return sum(v for k, v in self.breakdown.items() if k != "overhead")

    @property
    def total(self) -> int:
        """Bytes of GPU memory the run needs per GPU, overhead included."""
        return sum(self.breakdown.values())

    @property
    def gib(self) -> float:
        """:attr:`total` in GiB (2**30 bytes)."""
        return self.total / GIB

    def fits(self, gpu_bytes: int, headroom: float = 0.9) -> bool:
        """True when the peak stays within ``headroom`` (a share) of a GPU of ``gpu_bytes``."""
        return self.total <= headroom * gpu_bytes

    def render(self) -> str:
        """A readable summary: one line per part, then the total per GPU."""
        lines = [f"GPU memory plan: {self.inputs.describe()}"]
        lines += [f"  {k:<18}{self.breakdown.get(k, 0) / GIB:8.2f} GiB  {_NOTES[k]}" for k in PARTS]
        lines.append(f"  {'total':<18}{self.gib:8.2f} GiB per GPU (peak at {self.peak_phase})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: the settings, the parts and totals in GiB."""
        return {
            "inputs": {k: getattr(self.inputs, k) for k in self.inputs.__dataclass_fields__},
            "peak_phase": self.peak_phase,
            "parts_gib": {k: round(v / GIB, 3) for k, v in self.breakdown.items()},
            "allocated_gib": round(self.allocated / GIB, 3),
            "total_gib": round(self.gib, 3),
        }


def cheaper_changes(
    plan: Callable[[MemoryInputs], MemoryPlan], inputs: MemoryInputs, gpu_bytes: int, headroom: float = 0.9
) -> list[tuple[str, MemoryPlan]]:
    """The changes to ``inputs`` that make ``plan(inputs)`` fit, best first (see ``vram.suggest``)."""
    if plan(inputs).fits(gpu_bytes, headroom):
        return []
    levers: list[list[dict[str, Any]]] = []  # groups of alternatives: the first one that fits counts
    if not inputs.gradient_checkpointing:
        levers.append([{"gradient_checkpointing": True}])
    levers.append([{}])  # a smaller micro-batch alone
    if inputs.method == "lora":
        levers.append([{"method": "qlora", "quantization_bit": 4}])
    if inputs.zero_stage != 3 and inputs.n_gpus > 1:
        levers.append([{"zero_stage": 3}])
    if inputs.zero_stage != 3 or inputs.n_gpus == 1:
        levers.append([{"zero_stage": 3, "n_gpus": n} for n in (2, 4, 8) if n > inputs.n_gpus])
    if not inputs.offload_param:
        levers.append([{"zero_stage": 3, "offload_optimizer": True, "offload_param": True}])
    found: list[tuple[str, MemoryPlan]] = []
    enough: list[set[str]] = []  # the settings each found change touches: a superset would not be cheaper
    for group in levers:
        for lever in group:
            result = _cheapest(plan, inputs, lever, gpu_bytes, headroom, enough)
            if result is not None:
                enough.append(_changed(inputs, result.inputs))
                found.append((describe_change(inputs, result.inputs), result))
                break
    return found


def _cheapest(
    plan: Callable[[MemoryInputs], MemoryPlan],
    inputs: MemoryInputs,
    lever: dict[str, Any],
    gpu_bytes: int,
    headroom: float,
    enough: list[set[str]],
) -> MemoryPlan | None:
    """``lever`` alone, then with gradient checkpointing, then with the largest smaller micro-batch
    (same global batch through gradient accumulation), then both: the first plan that fits and
    changes no superset of the settings of a change already ``enough``."""
    checkpointing = [] if inputs.gradient_checkpointing else [{"gradient_checkpointing": True}]
    tries = [lever, *({**lever, **gc} for gc in checkpointing)] if lever else []
    mb, acc = inputs.micro_batch, inputs.gradient_accumulation_steps
    smaller = [
        {"micro_batch": d, "gradient_accumulation_steps": acc * mb // d} for d in range(mb - 1, 0, -1) if mb % d == 0
    ]
    tries += [{**lever, **b} for b in smaller] + [{**lever, **gc, **b} for gc in checkpointing for b in smaller]
    for changes in tries:
        candidate = plan(inputs.with_(**changes))
        if any(_changed(inputs, candidate.inputs) >= keys for keys in enough):
            continue
        if candidate.fits(gpu_bytes, headroom):
            return candidate
    return None


def describe_change(old: MemoryInputs, new: MemoryInputs) -> str:
    """The change from ``old`` to ``new`` as LLaMA-Factory YAML keys, e.g.
    ``gradient_checkpointing: true, per_device_train_batch_size: 2, gradient_accumulation_steps: 4``."""
    parts = []
    if new.gradient_checkpointing != old.gradient_checkpointing:
        parts.append(f"gradient_checkpointing: {str(new.gradient_checkpointing).lower()}")
    if new.micro_batch != old.micro_batch:
        parts.append(
            f"per_device_train_batch_size: {new.micro_batch}, "
            f"gradient_accumulation_steps: {new.gradient_accumulation_steps}"
        )
    if new.method != old.method and new.method == "qlora":
        parts.append(f"quantization_bit: {new.quantization_bit}")
    if (new.zero_stage, new.offload_param, new.offload_optimizer) != (
        old.zero_stage,
        old.offload_param,
        old.offload_optimizer,
    ):
        name = f"ds_z{new.zero_stage}" + ("_offload" if new.offload_param or new.offload_optimizer else "")
        parts.append(f"deepspeed: {name}" + (f" on {new.n_gpus} GPUs" if new.n_gpus != old.n_gpus else ""))
    return ", ".join(parts)


def _changed(old: MemoryInputs, new: MemoryInputs) -> set[str]:
    return {k for k in old.__dataclass_fields__ if getattr(old, k) != getattr(new, k)}
