"""GPU memory planner: the peak memory per GPU of a training run, from the model's config alone.

Nothing is loaded: :meth:`ModelShape.from_config` reads sizes from a transformers config (or its
dict), :class:`MemoryInputs` holds the run's settings, and :func:`plan_memory` adds up what our
trainer keeps on each GPU at its peak moment. Example::

    shape = ModelShape.from_config(AutoConfig.from_pretrained("Qwen/Qwen2.5-0.5B"))
    plan = plan_memory(shape, MemoryInputs(method="lora", micro_batch=16, seq_len=1024))
    print(plan.render())                      # one line per part, in GiB
    plan.fits(80 * 2**30)                     # within 90% of an 80 GiB GPU?

The estimate follows how our trainer runs (weights loaded in bf16, trained weights and LoRA
in float32, autocast, SDPA attention, the loss upcasting logits to float32) and is checked against
``torch.cuda.max_memory_allocated()`` by ``benchmarks/vram_plan.py``. Every constant it uses sits in
the calibration block below, so re-calibrating changes only that block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from finetune_kit.errors import ConfigError
from finetune_kit.train.loss import chunk_tokens
from finetune_kit.train.vram_report import GIB, MemoryPlan, cheaper_changes

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Method = Literal["lora", "qlora", "full", "freeze"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]

# ----- calibration: every constant of the estimate (first principles, calibrated on H100/H200 measurements) -----


@dataclass(frozen=True)
class LayerBytes:
    """Bytes autograd keeps per token per decoder layer until the backward pass:
    ``hidden * A + intermediate * B + (q_dim + kv_dim) * C``; ``checkpoint`` bytes per hidden feature
    are all a layer keeps under gradient checkpointing (its input)."""

    hidden: float  # A: RMSNorm's float32 input, the inputs the linears save, autocast copies
    intermediate: float  # B: gate and up outputs, SiLU output, down_proj's input
    attention: float  # C: SDPA keeps q, k, v and its output (q_dim = heads * head_dim, kv_dim = kv heads * head_dim)
    checkpoint: float  # the residual stream's dtype size


# Which tensors each regime keeps (bf16 = 2 bytes, fp32 = 4), per decoder layer:
ACTIVATIONS: dict[str, LayerBytes] = {
    # frozen 16-bit weights (LoRA's base; freeze's frozen layers after a trained one). First principles
    # gave hidden 12 (two RMSNorm fp32 inputs, the shared bf16 input of q/k/v and of gate/up) and
    # intermediate 8 (MLP 4 x 2 bytes); 6 LoRA runs without checkpointing on H200 (0.5B and 8B shapes,
    # 2k-8k tokens per micro-batch) kept 0.82-0.86 of that: the LoRA inputs counted below are partly
    # the very tensors the base layers keep (down_proj's input above all). Fitted: 8.5 and 6.
    "frozen16": LayerBytes(hidden=8.5, intermediate=6, attention=4, checkpoint=2),
    # 4/8-bit base (QLoRA): peft upcasts embeddings and norms to fp32, so the residual stream, the
    # MLP's gate/up/SiLU outputs are fp32; bitsandbytes' matmul keeps no input
    "quantized": LayerBytes(hidden=8, intermediate=12, attention=4, checkpoint=4),
    # full fine-tuning: fp32 weights under autocast, fp32 residual; each RMSNorm keeps its input and
    # normalised output (4+4) and every q/k/v, gate/up call casts the fp32 norm output to bf16 (2 each)
    "full": LayerBytes(hidden=26, intermediate=8, attention=4, checkpoint=4),
    # freeze tuning's trained layers: fp32 weights on a bf16 residual stream
    "freeze": LayerBytes(hidden=22, intermediate=8, attention=4, checkpoint=2),
    # full/freeze under DeepSpeed (zero_stage >= 1): the engine casts the module to bf16, no autocast
    "deepspeed": LayerBytes(hidden=16, intermediate=8, attention=4, checkpoint=2),
}
LORA_INPUT_BYTES = 2.0  # per input feature of each LoRA-wrapped linear: the bf16 copy its lora_A saves
LORA_RANK_BYTES = 2.0  # per rank per LoRA-wrapped linear: lora_B's saved input
SDPA_LSE_BYTES = 4.0  # per attention head: SDPA's float32 logsumexp
HEAD_BYTES = 6.0  # per hidden feature after the last layer: final norm's fp32 input + lm_head's bf16 input
LOGITS_BYTES = 12.0  # per logit (token x vocab) at the start of backward: the saved fp32 log-softmax,
# the fp32 gradient nll_loss writes and log-softmax's fp32 input gradient (the bf16 logits are gone)
FP32_ACTIVATION_SCALE = 2.0  # dtype: float32 (no mixed precision) roughly doubles the 16-bit figures
GC_LAYER_WORKSPACE = 1.5  # gradient checkpointing: one layer recomputed + its gradients, in layers' worth
AUTOCAST_COPY_BYTES = 2.0  # per fp32 weight a matmul uses under autocast: the bf16 copy kept for backward
QUANT_BYTES = {4: 0.5, 8: 1.0}  # per quantized linear weight
QUANT_ABSMAX = {(4, False): 4 / 64, (4, True): 1 / 64 + 4 / (64 * 256), (8, False): 0.0, (8, True): 0.0}
QUANT_KEPT_BYTES = 4.0  # embeddings, head, norms, biases of a quantized model (peft upcasts them to fp32)
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0}  # states per trained parameter
OPTIMIZER_STEP_BYTES = {"adamw": 4.0, "adamw_8bit": 0.0, "paged_adamw_8bit": 0.0}  # foreach temporaries
MASTER_BYTES = 4.0  # DeepSpeed: the fp32 master copy of each trained parameter (in its optimizer)
DDP_BUCKET_BYTES = 4.0  # plain DDP on several GPUs: gradient buckets, per trained parameter
ZERO12_BUCKET_ELEMENTS = 5e8  # ds_z2/ds_z1: reduce/allgather bucket size (elements)
ZERO12_BUCKET_BYTES = 4.0  # two bf16 buckets (overlap_comm)
ZERO3_LIVE_LAYERS = 2.0  # ZeRO-3: decoder layers gathered at once (current + prefetched), bf16
ZERO3_SUB_GROUP = 1e9  # ds_z3: sub_group_size (elements) the optimizer steps at once
ZERO3_BUCKET_BYTES = 6.0  # per hidden^2 element: fp32 reduce bucket + bf16 prefetch bucket ("auto" sizes)
CUDA_CONTEXT_BYTES = 0.5 * GIB  # CUDA context and kernels: outside torch's allocator
ALLOCATOR_FRAGMENTATION = 0.05  # reserved-but-unused share of what the caching allocator holds


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama/Qwen2-style decoder, enough to count parameters and activations."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v have biases
    o_bias: bool = False  # Llama's attention_bias: o_proj too
    mlp_bias: bool = False
    model_type: str = ""

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a transformers config object (``AutoConfig``) or its dict (``config.json``)."""

        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        text = get("text_config")
        if get("hidden_size") is None and text is not None:
            return cls.from_config(text)
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in required if not isinstance(get(k), int)]
        if missing:
            raise ConfigError(f"the model config lacks {missing}; the planner needs a Llama/Qwen2-style config")
        model_type = str(get("model_type") or "")
        bias = bool(get("attention_bias") or False)
        return cls(
            hidden_size=get("hidden_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            head_dim=get("head_dim") or 0,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=bias or model_type.startswith("qwen2"),
            o_bias=bias and not model_type.startswith("qwen2"),
            mlp_bias=bool(get("mlp_bias") or False),
            model_type=model_type,
        )

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def projection(self, name: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of one linear layer of a decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        sizes.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        return sizes[name]

    @property
    def linear_weights_per_layer(self) -> int:
        """Weights of the seven projections of one layer (what 4-bit quantization packs)."""
        return sum(a * b for a, b in map(self.projection, PROJECTIONS))

    @property
    def layer_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        biases = (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + h * self.o_bias + (2 * i + h) * self.mlp_bias
        return self.linear_weights_per_layer + biases + 2 * h  # + the two RMSNorms

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> int:
        """Every parameter: layers, final norm, embeddings and (unless tied) the output head."""
        head = 0 if self.tie_word_embeddings else self.embedding_parameters
        return self.num_hidden_layers * self.layer_parameters + self.hidden_size + self.embedding_parameters + head

    def lora_parameters(self, rank: int, targets: tuple[str, ...] = ("all",)) -> int:
        """Parameters LoRA adds: ``rank * (in + out)`` for each targeted projection of every layer."""
        return self.num_hidden_layers * sum(rank * sum(self.projection(t)) for t in _targets(targets))


def _targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    return PROJECTIONS if tuple(targets) == ("all",) else tuple(targets)


@dataclass(frozen=True)
class MemoryInputs:
    """The settings that decide GPU memory (LLaMA-Factory's names in the comments)."""

    method: Method = "lora"  # finetuning_type; qlora = lora + quantization_bit
    lora_rank: int = 8
    lora_target: tuple[str, ...] = ("all",)  # "all" = the seven projections of every layer
    freeze_trainable_layers: int = 2  # n > 0: the last n layers train; n < 0: the first |n|
    quantization_bit: Literal[4, 8] | None = 4  # qlora only (None elsewhere is fine)
    double_quantization: bool = True
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # bf16/fp16 mixed precision, or none
    micro_batch: int = 1  # per_device_train_batch_size
    seq_len: int = 1024  # tokens per row after padding (worst case: cutoff_len)
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    checkpoint_layers: int | None = None  # with checkpointing: only the first n decoder layers (None: all)
    zero_stage: Literal[0, 1, 2, 3] = 0  # 0: single GPU or plain DDP; 1-3: DeepSpeed ZeRO
    offload_optimizer: bool = False  # ZeRO: optimizer states (and master weights) in CPU memory
    offload_param: bool = False  # ZeRO-3: 16-bit weights in CPU memory too
    n_gpus: int = 1
    optimizer: Optimizer = "adamw"  # adamw: 8 bytes of fp32 states per trained parameter; *_8bit: 2
    chunked_loss: bool = False  # the loss over the head a chunk at a time (or Liger's fused one): one chunk's logits

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_target", tuple(self.lora_target))
        targets_ok = self.lora_target == ("all",) or (self.lora_target and set(self.lora_target) <= set(PROJECTIONS))
        checks = [
            (
                self.method in ("lora", "qlora", "full", "freeze"),
                f"method: got {self.method!r}; expected lora, qlora, full or freeze",
            ),
            (targets_ok, f"lora_target: got {list(self.lora_target)}; expected 'all' or names from {PROJECTIONS}"),
            *[
                (getattr(self, k) >= 1, f"{k}: got {getattr(self, k)}; expected a positive integer")
                for k in ("lora_rank", "micro_batch", "seq_len", "gradient_accumulation_steps", "n_gpus")
                + (("checkpoint_layers",) if self.checkpoint_layers is not None else ())
            ],
            (
                self.freeze_trainable_layers != 0,
                "freeze_trainable_layers: got 0; expected a positive (last n) or negative (first n) count",
            ),
            (
                self.quantization_bit in (4, 8) or (self.method != "qlora" and self.quantization_bit is None),
                f"quantization_bit: got {self.quantization_bit}; expected 4 or 8",
            ),
            (
                self.dtype in ("bfloat16", "float16", "float32"),
                f"dtype: got {self.dtype!r}; expected bfloat16, float16 or float32",
            ),
            (self.zero_stage in (0, 1, 2, 3), f"zero_stage: got {self.zero_stage}; expected 0 (no DeepSpeed) to 3"),
            (not self.offload_optimizer or self.zero_stage > 0, "offload_optimizer needs zero_stage 1-3 (DeepSpeed)"),
            (not self.offload_param or self.zero_stage == 3, "offload_param needs zero_stage 3 (ds_z3_offload)"),
            (
                self.optimizer in OPTIMIZER_BYTES,
                f"optimizer: got {self.optimizer!r}; expected one of {sorted(OPTIMIZER_BYTES)}",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError(problems, header="Invalid MemoryInputs")

    def with_(self, **changes: Any) -> MemoryInputs:
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes)

    def describe(self) -> str:
        """One line: method, precision, batch, checkpointing, ZeRO."""
        what = {"lora": f"LoRA r{self.lora_rank}", "qlora": f"QLoRA {self.quantization_bit}-bit r{self.lora_rank}"}
        method = what.get(self.method, "full" if self.method == "full" else f"freeze {self.freeze_trainable_layers}")
        parts = [method, self.dtype, f"batch {self.micro_batch} x {self.seq_len} tokens"]
        if self.gradient_accumulation_steps > 1:
            parts.append(f"accumulation {self.gradient_accumulation_steps}")
        layers = f" ({self.checkpoint_layers} layers)" if self.checkpoint_layers else ""
        parts.append(f"gradient checkpointing{layers}" if self.gradient_checkpointing else "no gradient checkpointing")
        if self.zero_stage:
            off = " + offload" if self.offload_optimizer or self.offload_param else ""
            parts.append(f"ZeRO-{self.zero_stage}{off}")
        parts.append(f"{self.n_gpus} GPU" + ("s" if self.n_gpus > 1 else ""))
        return ", ".join(parts)


def plan_memory(shape: ModelShape, inputs: MemoryInputs) -> MemoryPlan:
    """The estimated peak GPU memory per GPU of training ``shape`` with ``inputs`` (see :class:`MemoryPlan`)."""
    s, x = shape, inputs
    L, h, V = s.num_hidden_layers, s.hidden_size, s.vocab_size
    half = x.dtype != "float32"
    w16 = 2.0 if half else 4.0
    ds, n, z = x.zero_stage >= 1, x.n_gpus, x.zero_stage
    adapters = x.method in ("lora", "qlora")
    k = min(abs(x.freeze_trainable_layers), L)
    trained_layers = range(L - k, L) if x.freeze_trainable_layers > 0 else range(k)
    if adapters:
        trainable = s.lora_parameters(x.lora_rank, x.lora_target)
    elif x.method == "freeze":
        trainable = k * s.layer_parameters
    else:
        trainable = s.parameters
    base = s.parameters - (0 if adapters else trainable)  # frozen weights as stored

    # weights: frozen storage, autocast copies of fp32 weights, ZeRO-3's gathered layers
    if x.method == "qlora":
        packed = L * s.linear_weights_per_layer
        bits = x.quantization_bit or 4
        per = QUANT_BYTES[bits] + QUANT_ABSMAX[(bits, x.double_quantization)]
        frozen = packed * per + (base - packed) * QUANT_KEPT_BYTES
        copies = s.embedding_parameters * AUTOCAST_COPY_BYTES if half else 0.0  # the fp32 head's bf16 copy
    else:
        frozen = base * w16
        copies = 0.0
        if half and not ds and x.method == "full":
            copies = (L * s.linear_weights_per_layer + s.embedding_parameters) * AUTOCAST_COPY_BYTES
        elif half and not ds and x.method == "freeze":
            copies = k * s.linear_weights_per_layer * AUTOCAST_COPY_BYTES
    states_on_cpu = x.offload_optimizer
    if ds:
        trained = trainable * w16 / (n if z == 3 else 1)
        master = 0.0 if states_on_cpu else trainable * (MASTER_BYTES + OPTIMIZER_BYTES[x.optimizer]) / n
        grads = 0.0 if states_on_cpu and z >= 2 else trainable * w16 / (n if z >= 2 else 1)
        grads += min(trainable, ZERO12_BUCKET_ELEMENTS) * ZERO12_BUCKET_BYTES if z in (1, 2) else 0.0
        # the step: an fp32 copy of the gradient partition (ZeRO-3: one sub-group at a time) + temporaries
        fp32_grads = min(trainable / n, ZERO3_SUB_GROUP) if z == 3 else trainable / n
        step = 0.0 if states_on_cpu else (trainable / n * OPTIMIZER_STEP_BYTES[x.optimizer] + 4.0 * fp32_grads)
        persistent_grads, peak_grads = grads, 0.0
        optimizer = master
    else:
        trained = trainable * 4.0
        optimizer = trainable * OPTIMIZER_BYTES[x.optimizer]
        step = trainable * OPTIMIZER_STEP_BYTES[x.optimizer]
        persistent_grads = trainable * DDP_BUCKET_BYTES if n > 1 else 0.0
        peak_grads = trainable * 4.0  # allocated during backward, freed after the step (set_to_none)
        if x.gradient_accumulation_steps > 1:  # kept between micro-batches
            persistent_grads, peak_grads = persistent_grads + peak_grads, 0.0
    if z == 3:
        # frozen weights count whole: LoRA, 8B shape, 2 GPUs measured 34.3 GiB = whole + gathered, not 1/n (26.8)
        frozen = 0.0 if x.offload_param else frozen
        largest = max(ZERO3_LIVE_LAYERS * s.layer_parameters, s.embedding_parameters)
        frozen += largest * w16 + ZERO3_BUCKET_BYTES * h * h
        trained = 0.0 if x.offload_param else trained

    # activations: which regime each layer is in, and whether it keeps anything
    tokens = x.micro_batch * x.seq_len
    lora_extra = 0.0
    if adapters:
        ins = sum(s.projection(t)[0] for t in _targets(x.lora_target))
        lora_extra = LORA_INPUT_BYTES * ins + LORA_RANK_BYTES * x.lora_rank * len(_targets(x.lora_target))
    trained_regime = "deepspeed" if ds else x.method if x.method in ("full", "freeze") else ""
    regimes: list[tuple[str, bool]] = []  # (regime, keeps its activations without checkpointing)
    for layer in range(L):
        if adapters:
            regimes.append(("quantized" if x.method == "qlora" else "frozen16", True))
        elif x.method == "full" or layer in trained_layers:
            regimes.append((trained_regime, True))
        else:  # a frozen layer keeps activations only when a trained layer comes before it
            regimes.append(("frozen16", layer > min(trained_layers)))
    scale = 1.0 if half else FP32_ACTIVATION_SCALE

    def layer_bytes(regime: str) -> float:
        c = ACTIVATIONS[regime]
        extra = lora_extra if adapters else 0.0
        per = c.hidden * h + c.intermediate * s.intermediate_size + c.attention * (s.q_dim + s.kv_dim)
        return (per + SDPA_LSE_BYTES * s.num_attention_heads + extra) * scale * tokens

    logits = LOGITS_BYTES * (min(tokens, chunk_tokens(V)) if x.chunked_loss else tokens) * V
    head = HEAD_BYTES * h * tokens * scale
    if x.gradient_checkpointing:  # the first c layers keep only their input; the others all they need
        c = min(x.checkpoint_layers or L, L)
        kept = sum(ACTIVATIONS[r].checkpoint * h * tokens * scale for r, _ in regimes[:c]) + head
        kept += sum(layer_bytes(r) for r, keeps in regimes[c:] if keeps)
        workspace = GC_LAYER_WORKSPACE * max(layer_bytes(r) for r, _ in regimes[:c])
        activations, logits = (kept + workspace, 0.0) if workspace > logits else (kept, logits)
    else:
        activations = sum(layer_bytes(r) for r, keeps in regimes if keeps) + head

    # the peak: backward start (activations + logits) or the optimizer step (gradients + temporaries)
    if peak_grads + step > activations + logits + copies:  # autocast's copies are gone after backward
        phase, activations, logits, copies = "optimizer step", 0.0, 0.0, 0.0
        grads_now, optimizer = peak_grads, optimizer + step
    else:
        phase, grads_now = "backward start", 0.0
    parts = {
        "weights": frozen + copies,
        "trainable_weights": trained,
        "gradients": persistent_grads + grads_now,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits,
    }
    parts["overhead"] = CUDA_CONTEXT_BYTES + ALLOCATOR_FRAGMENTATION * sum(parts.values())
    return MemoryPlan(shape, inputs, {k: round(v) for k, v in parts.items()}, phase)


def checkpointed_layers_needed(shape: ModelShape, inputs: MemoryInputs, gpu_bytes: int, headroom: float = 0.9) -> int:
    """How many decoder layers must recompute their activations for the run to fit ``headroom`` of
    the GPU: 0 when it fits without, all of them when even that is not enough (``gradient_checkpointing:
    auto`` checkpoints this many: the fewer, the faster)."""
    plans = (
        plan_memory(shape, inputs.with_(gradient_checkpointing=k > 0, checkpoint_layers=k or None))
        for k in range(shape.num_hidden_layers)
    )
    return next((k for k, plan in enumerate(plans) if plan.fits(gpu_bytes, headroom)), shape.num_hidden_layers)


def suggest(
    shape: ModelShape, inputs: MemoryInputs, gpu_bytes: int, headroom: float = 0.9
) -> list[tuple[str, MemoryPlan]]:
    """When ``inputs`` do not fit ``headroom`` of a GPU of ``gpu_bytes``: the cheapest changes that do,
    each as LLaMA-Factory YAML keys with its plan, in this order of preference: gradient checkpointing;
    a smaller micro-batch with more gradient accumulation (same global batch); QLoRA (for LoRA);
    ZeRO-3 (``deepspeed: ds_z3``) on these or more GPUs; ZeRO-3 with CPU offload. A change that is
    not enough alone comes combined with checkpointing and/or a smaller micro-batch. Empty when the
    run fits already: ``for change, plan in suggest(shape, inputs, 80 * 2**30): print(change, plan.gib)``.
    """
    return cheaper_changes(lambda x: plan_memory(shape, x), inputs, gpu_bytes, headroom)
