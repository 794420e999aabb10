"""The board's interface text in English and Chinese, and how an error is shown.

Every label, button and heading is a key of :data:`TEXTS`; ``<key>.info`` keys hold the hint
under a field. A test checks that every key has both languages.
"""

from __future__ import annotations

from typing import Literal

from finetune_kit.errors import FinetuneKitError

Lang = Literal["en", "zh"]
LANGS: tuple[Lang, ...] = ("en", "zh")

TEXTS: dict[str, tuple[str, str]] = {
    "title": ("# finetune_kit board", "# finetune_kit 训练面板"),
    "lang": ("Language", "语言"),
    "model": ("Model", "模型"),
    "model.info": (
        "bundled:smollm2-135m-instruct (offline), a local folder, a merged export, or a hub id in the local cache",
        "bundled:smollm2-135m-instruct（离线内置）、本地目录、合并导出的目录，或本地缓存中的 Hub 模型 ID",
    ),
    "template": ("Chat template", "对话模板"),
    "template.info": ("empty: the model's or adapter's own", "留空：使用模型或适配器自带的模板"),
    "adapter": ("Adapter (checkpoint path)", "适配器（检查点路径）"),
    "adapter.info": (
        "a training output_dir; empty = the model alone (Evaluate, Export, Chat)",
        "训练的 output_dir；留空即只用模型本身（评估、导出、对话）",
    ),
    "tab.train": ("Train", "训练"),
    "tab.eval": ("Evaluate", "评估"),
    "tab.export": ("Export", "导出"),
    "tab.chat": ("Chat", "对话"),
    # train: data
    "stage": ("Stage", "训练阶段"),
    "finetuning_type": ("Fine-tuning method", "微调方法"),
    "dataset_dir": ("Data folder (dataset_dir)", "数据目录 (dataset_dir)"),
    "dataset": ("Datasets", "数据集"),
    "preview": ("Preview rows", "预览数据"),
    "check_data": ("Check data (bad rows, token lengths)", "检查数据（坏行、token 长度）"),
    "data_out": ("Data", "数据"),
    # train: hyperparameters
    "learning_rate": ("Learning rate", "学习率"),
    "num_train_epochs": ("Epochs", "训练轮数"),
    "max_steps": ("Max steps", "最大步数"),
    "max_steps.info": ("-1: use the epochs", "-1：按训练轮数"),
    "per_device_train_batch_size": ("Batch size per device", "每设备批大小"),
    "gradient_accumulation_steps": ("Gradient accumulation", "梯度累积"),
    "cutoff_len": ("Cutoff length (tokens)", "截断长度（token）"),
    "max_samples": ("Max samples per dataset", "每个数据集最大样本数"),
    "max_samples.info": ("0 or empty: all rows", "0 或留空：全部"),
    "val_size": ("Validation share", "验证集比例"),
    "lr_scheduler_type": ("LR schedule", "学习率调度"),
    "warmup_ratio": ("Warm-up ratio", "预热比例"),
    "compute_type": ("Precision", "计算精度"),
    "compute_type.info": ("bf16/fp16 need a GPU", "bf16/fp16 需要 GPU"),
    "seed": ("Seed", "随机种子"),
    "logging_steps": ("Logging steps", "日志间隔步数"),
    "save_steps": ("Checkpoint every N steps", "每 N 步保存检查点"),
    "lora_rank": ("LoRA rank", "LoRA 秩"),
    "lora_alpha": ("LoRA alpha", "LoRA alpha"),
    "lora_dropout": ("LoRA dropout", "LoRA dropout"),
    "lora_target": ("LoRA target modules", "LoRA 作用模块"),
    "lora_target.info": ("all, or names such as q_proj,v_proj", "all，或模块名如 q_proj,v_proj"),
    "extra": ("Other keys (YAML)", "其他参数（YAML）"),
    "extra.info": (
        "any finetune-kit train key, e.g. weight_decay: 0.01",
        "任意 finetune-kit train 参数，如 weight_decay: 0.01",
    ),
    "hyper": ("Hyperparameters", "超参数"),
    "lora": ("LoRA", "LoRA"),
    # train: output and run
    "output_dir": ("Output dir", "输出目录"),
    "overwrite_output_dir": ("Overwrite output dir", "覆盖输出目录"),
    "resume_from_checkpoint": ("Resume from checkpoint", "从检查点恢复"),
    "resume_from_checkpoint.info": (
        "empty: start fresh; latest: the last checkpoint",
        "留空：重新开始；latest：最后一个检查点",
    ),
    "refresh": ("Refresh", "刷新"),
    "config_path": ("Config file", "配置文件"),
    "save": ("Save YAML", "保存 YAML"),
    "load": ("Load YAML", "加载 YAML"),
    "overwrite_file": ("Overwrite file", "覆盖文件"),
    "preview_cmd": ("Preview YAML and command", "预览 YAML 与命令"),
    "yaml_out": ("YAML (what finetune-kit train runs)", "YAML（finetune-kit train 运行的内容）"),
    "start": ("Start", "开始"),
    "stop": ("Stop", "停止"),
    "status": ("Status", "状态"),
    "loss_plot": ("Loss", "损失"),
    "log": ("Log", "日志"),
    # run states
    "state.idle": ("Ready.", "就绪。"),
    "state.running": ("Training", "训练中"),
    "state.stopping": ("Stopping: saving a checkpoint at the end of this step", "正在停止：本步结束时保存检查点"),
    "state.finished": ("Finished.", "训练完成。"),
    "state.stopped": (
        "Stopped; a checkpoint was saved: choose Resume to continue.",
        "已停止，检查点已保存：选择恢复即可继续。",
    ),
    "state.failed": ("Failed (exit code {code}); see the log.", "失败（退出码 {code}），请查看日志。"),
    "state.loading": ("loading the model and data", "正在加载模型和数据"),
    "eta": ("elapsed {elapsed}, ETA {remaining}", "已用 {elapsed}，预计剩余 {remaining}"),
    "saved": ("Saved {path}. Run it with:", "已保存 {path}。运行命令："),
    "loaded": ("Loaded {path}.", "已加载 {path}。"),
    "adapter_set": ("The adapter field now points at {path}.", "适配器字段已指向 {path}。"),
    # evaluate
    "predict_head": ("### Predict: ROUGE / BLEU", "### 预测：ROUGE / BLEU"),
    "eval_dataset": ("Test datasets", "测试数据集"),
    "max_new_tokens": ("Max new tokens", "最大生成长度"),
    "batch_size": ("Batch size", "批大小"),
    "predict_dir": ("Predictions folder (optional)", "预测结果目录（可选）"),
    "compare": ("Compare with the base model (before/after)", "与基座模型对比（微调前后）"),
    "run_predict": ("Predict and score", "预测并评分"),
    "bench_head": ("### Benchmark: MMLU / CMMLU / C-Eval", "### 基准测试：MMLU / CMMLU / C-Eval"),
    "task": ("Benchmark", "基准"),
    "task_dir": ("Benchmark folder (task_dir)", "基准数据目录 (task_dir)"),
    "n_shot": ("Shots", "示例数 (shot)"),
    "subjects": ("Subjects (empty: all)", "科目（留空：全部）"),
    "scoring": ("Scoring", "评分方式"),
    "save_dir": ("Results folder (optional)", "结果目录（可选）"),
    "run_bench": ("Run benchmark", "运行基准测试"),
    "results": ("Results", "结果"),
    "working": ("Working...", "处理中..."),
    # export
    "export_dir": ("Export dir", "导出目录"),
    "export_size": ("Shard size (GB)", "分片大小 (GB)"),
    "gguf": ("GGUF files", "GGUF 文件"),
    "gguf.info": ("needs the gguf extra (llama.cpp)", "需要 gguf 扩展（llama.cpp）"),
    "parity": ("Check parity with llama.cpp", "用 llama.cpp 校验一致性"),
    "ollama": ("Ollama name (optional)", "Ollama 名称（可选）"),
    "overwrite_export": ("Overwrite export dir", "覆盖导出目录"),
    "run_export": ("Merge and export", "合并并导出"),
    "use_export": ("Chat with the export", "与导出模型对话"),
    # chat
    "load_model": ("Load model", "加载模型"),
    "unload_model": ("Unload", "卸载"),
    "model_info": ("Loaded model", "已加载模型"),
    "no_model": ("No model loaded.", "尚未加载模型。"),
    "system": ("System prompt", "系统提示词"),
    "message": ("Message", "消息"),
    "send": ("Send", "发送"),
    "clear": ("Clear", "清空"),
    "chatbot": ("Chat", "对话"),
    "do_sample": ("Sample (off: greedy)", "采样（关闭：贪心）"),
    "temperature": ("Temperature", "温度"),
    "top_p": ("Top-p", "Top-p"),
    "top_k": ("Top-k", "Top-k"),
    "repetition_penalty": ("Repetition penalty", "重复惩罚"),
    "generation": ("Generation settings", "生成参数"),
    # errors
    "error": ("Error", "错误"),
    "unexpected": ("Unexpected error (the terminal has the traceback)", "意外错误（终端中有完整报错）"),
}


def text(key: str, lang: str) -> str:
    """The text of ``key`` in ``lang`` (English for an unknown language)."""
    en, zh = TEXTS[key]
    return zh if lang == "zh" else en


def info(key: str, lang: str) -> str | None:
    """The hint under field ``key``, if it has one."""
    return text(f"{key}.info", lang) if f"{key}.info" in TEXTS else None


def error_text(exc: BaseException, lang: str) -> str:
    """An error as Markdown: the library's own message (what, where, fix) under a heading naming its type."""
    if isinstance(exc, (FinetuneKitError, OSError)):
        head = f"**{text('error', lang)}: {type(exc).__name__}**"
    else:
        head = f"**{text('unexpected', lang)}: {type(exc).__name__}**"
    return f"{head}\n\n```text\n{exc}\n```"
