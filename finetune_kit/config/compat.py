"""LLaMA-Factory compatibility policy in one place: keys we accept and ignore, and keys we refuse (yet).

``config.parse.build`` consults both tables: an :data:`IGNORED` key is dropped with a note (it
changes nothing here), an :data:`UNSUPPORTED` key is an error naming what to do instead, and a
:data:`ONLY_FALSE` key is ignored when false and refused when true.
"""

from __future__ import annotations

# Accepted so LLaMA-Factory YAMLs run unchanged; they do not change what finetune_kit does.
IGNORED: dict[str, str] = {
    "include_num_input_tokens_seen": "token counts are always logged",
    "include_effective_tokens_per_second": "throughput is logged in trainer_log.jsonl",
    "use_fast_tokenizer": "fast tokenizers are always used",
    "low_cpu_mem_usage": "weights are always loaded without a CPU copy",
    "logging_dir": "trackers log under output_dir",
    "save_only_model": "checkpoints always keep the optimizer state, so they stay resumable",
    "quantization_device_map": "quantized weights are always placed on this process's own GPU",
    "download_mode": "benchmarks are read from task_dir; nothing is downloaded",
    # encoding keys matter to `train` only; eval/export/api/chat YAMLs often carry them too
    "preprocessing_num_workers": "only training encodes examples",
    "overwrite_cache": "only training encodes examples",
    "tokenized_path": "only training encodes examples",
    "cutoff_len": "only training encodes examples",
    "train_on_prompt": "only training encodes examples",
    "mask_history": "only training encodes examples",
    "packing": "only training encodes examples",
    "neat_packing": "only training encodes examples",
}

# LLaMA-Factory's negated switches: key -> the finetune_kit key it sets to the opposite value
# (only when that key is not given itself).
NEGATED: dict[str, str] = {
    "disable_gradient_checkpointing": "gradient_checkpointing",
}

# Accepted when false (or unset); refused when true, with the reason.
ONLY_FALSE: dict[str, str] = {}

# LLaMA-Factory keys we know but do not support yet, with what to do instead.
UNSUPPORTED: dict[str, str] = {
    "ref_model": "the DPO/KTO reference is the base model with the adapter switched off (no second copy); "
    "for full fine-tuning a frozen copy of the starting weights",
    "ref_model_adapters": "the DPO/KTO reference is the base model with the trained adapter switched off",
    **{
        k: "reward-model and PPO stages are not supported; use stage: dpo or kto"
        for k in ("reward_model", "ppo_epochs")
    },
    **{
        k: "this adapter variant is not supported; LoRA (with DoRA, rsLoRA, PiSSA, LoRA+), freeze and full are"
        for k in ("use_llama_pro", "oft_rank", "oft_block_size", "oft_target")
    },
    **{
        k: "memory-saving optimizers are not supported; use LoRA or QLoRA (quantization_bit: 4) to save memory"
        for k in (
            "use_galore",
            "use_apollo",
            "use_badam",
            "use_adam_mini",
            "use_muon",
            "pure_bf16",
        )
    },
    **{
        k: "speed kernels are planned"
        for k in (
            "use_unsloth",
            "use_unsloth_gc",
            "shift_attn",
            "rope_scaling",
            "mixture_of_depths",
        )
    },
    **{
        k: "GPTQ quantization at export is not supported; for a quantized model use export_gguf: q4_K_M "
        "(GGUF for llama.cpp and Ollama, quantized by llama.cpp)"
        for k in (
            "export_quantization_bit",
            "export_quantization_dataset",
            "export_quantization_nsamples",
            "export_quantization_maxlen",
        )
    },
    **{
        k: "only the huggingface inference backend exists"
        for k in ("infer_backend", "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank")
    },
    **{
        k: "not supported yet"
        for k in (
            "resize_vocab",
            "media_dir",
            "image_max_pixels",
            "freeze_vision_tower",
            "eval_on_each_dataset",
            "compute_accuracy",
            "use_swanlab",
            "ray_num_workers",
            "hf_hub_token_file",
        )
    },
}
