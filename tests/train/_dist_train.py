"""A user's training script, run by the distributed tests under a launcher (or notebook_launcher).

    python -m torch.distributed.run --nproc_per_node 2 tests/train/_dist_train.py MODEL OUT
    accelerate launch --num_processes 2 tests/train/_dist_train.py MODEL OUT
    python tests/train/_dist_train.py MODEL OUT --notebook-launcher 2

It trains LoRA on the demo data for 4 steps with a global batch of 4 and, on rank 0, writes the
per-step losses to OUT/losses.json. Nothing in it knows about processes: LoraTrainer does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "finetune_kit" / "data" / "demo"


def train(model: str, out: str, per_device: int) -> None:
    from finetune_kit import DatasetRegistry, LoraTrainer, ModelSource

    data = DatasetRegistry.from_dir(DEMO).load("shop_alpaca", max_samples=64)
    trainer = (
        LoraTrainer(ModelSource.local(model).with_config(template="smollm2"))
        .with_lora(lora_rank=8, lora_target="all", lora_dropout=0.0)
        .with_data(cutoff_len=64)
        .with_training(
            output_dir=out,
            overwrite_output_dir=True,
            per_device_train_batch_size=per_device,
            learning_rate=1e-2,
            max_steps=4,
            logging_steps=1,
            save_steps=1000,
            lr_scheduler_type="constant",
            seed=0,
            disable_tqdm=True,
        )
    )
    result = trainer.train(data)
    if os.environ.get("RANK", "0") == "0":
        losses = [[step, loss] for step, loss in result.losses]
        Path(out, "losses.json").write_text(json.dumps({"losses": losses, "world_size": os.environ.get("WORLD_SIZE")}))


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    if "--notebook-launcher" in sys.argv:
        from accelerate import notebook_launcher

        from finetune_kit.train.distributed import free_port

        processes = int(sys.argv[sys.argv.index("--notebook-launcher") + 1])
        notebook_launcher(train, (model, out, 4 // processes), num_processes=processes, use_port=str(free_port()))
    else:
        train(model, out, 4 // int(os.environ.get("WORLD_SIZE", "1")))


if __name__ == "__main__":
    main()
