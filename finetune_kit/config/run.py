"""Keys that pick what a ``train`` run does, and LLaMA-Factory keys accepted for compatibility."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finetune_kit.config.base import StageConfig, option


@dataclass(frozen=True, repr=False)
class RunConfig(StageConfig):
    """What ``finetune-kit train`` should do (LLaMA-Factory's stage and do_* switches)."""

    section = "run"

    stage: Literal["sft"] = option("sft", "Training stage; sft for now (pt, dpo, rm, ppo, kto are planned).")
    do_train: bool = option(False, "Train an adapter.")
    do_eval: bool = option(False, "Compute eval loss on eval_dataset or the val_size split.")
    do_predict: bool = option(False, "Generate on eval_dataset and score ROUGE/BLEU (needs predict_with_generate).")
    predict_with_generate: bool = option(False, "Generate text at prediction time (LLaMA-Factory requires it).")
    # Accepted so LLaMA-Factory YAMLs run unchanged; they do not change what finetune_kit does.
    ddp_timeout: int = option(1800, "Accepted for compatibility (distributed timeout in seconds).")
    include_num_input_tokens_seen: bool = option(True, "Accepted for compatibility; token counts are always logged.")
    include_effective_tokens_per_second: bool = option(False, "Accepted for compatibility.")
    use_fast_tokenizer: bool = option(True, "Accepted for compatibility; fast tokenizers are always used.")
    low_cpu_mem_usage: bool = option(True, "Accepted for compatibility.")
    logging_dir: str | None = option(None, "Accepted for compatibility (tracker log folder).")
    save_only_model: bool = option(False, "Accepted for compatibility; checkpoints stay resumable.")

    def _check(self) -> list[str]:
        problems = []
        if self.do_predict and not self.predict_with_generate:
            problems.append("do_predict needs predict_with_generate: true (as in LLaMA-Factory). Fix: add "
                            "predict_with_generate: true")
        if not (self.do_train or self.do_eval or self.do_predict):
            problems.append("nothing to do: set do_train: true (or do_predict: true with predict_with_generate: true)")
        if self.do_eval and not self.do_train:
            problems.append("do_eval without do_train is not supported yet (eval loss is computed during training). "
                            "Fix: add do_train: true with val_size or eval_dataset, or use do_predict for ROUGE/BLEU")
        return problems


# LLaMA-Factory keys we know but do not support yet, with what to do instead.
UNSUPPORTED: dict[str, str] = {
    **{k: "QLoRA is planned" for k in ("quantization_bit", "quantization_method", "quantization_type",
                                       "double_quantization", "quantization_device_map")},
    **{k: "DeepSpeed/FSDP are planned; for several GPUs run `accelerate launch -m finetune_kit.cli.main train ...`"
       for k in ("deepspeed", "fsdp", "fsdp_config")},
    **{k: "DPO and other preference stages are planned" for k in ("pref_beta", "pref_loss", "pref_ftx", "ref_model",
                                                                   "ref_model_adapters", "dpo_label_smoothing",
                                                                   "simpo_gamma", "reward_model", "ppo_epochs")},
    **{k: "MMLU/CMMLU/C-Eval evaluation is planned" for k in ("task", "task_dir", "n_shot", "lang", "save_dir",
                                                                          "batch_size")},
    **{k: "this adapter variant is planned" for k in ("use_dora", "pissa_init", "pissa_iter", "pissa_convert",
                                                      "loraplus_lr_ratio", "loraplus_lr_embedding", "create_new_adapter",
                                                      "use_llama_pro", "oft_rank", "oft_block_size", "oft_target")},
    **{k: "full/freeze tuning and memory-saving optimizers are planned" for k in (
        "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules", "use_galore", "use_apollo",
        "use_badam", "use_adam_mini", "use_muon", "pure_bf16")},
    **{k: "speed kernels are planned" for k in ("enable_liger_kernel", "use_unsloth", "use_unsloth_gc", "shift_attn",
                                                 "rope_scaling", "neat_packing", "mixture_of_depths")},
    **{k: "GGUF/quantized export is planned" for k in ("export_quantization_bit", "export_quantization_dataset",
                                                        "export_quantization_nsamples", "export_quantization_maxlen",
                                                        "export_hub_model_id")},
    **{k: "only the huggingface inference backend exists" for k in ("infer_backend", "vllm_maxlen", "vllm_gpu_util",
                                                                     "vllm_enforce_eager", "vllm_max_lora_rank")},
    **{k: "not supported yet" for k in ("tokenized_path", "mix_strategy", "interleave_probs", "buffer_size",
                                        "resize_vocab", "tool_format", "enable_thinking", "media_dir",
                                        "image_max_pixels", "freeze_vision_tower", "eval_on_each_dataset",
                                        "compute_accuracy", "use_swanlab", "ray_num_workers", "hf_hub_token_file")},
}
