"""Keys that pick what a ``train`` run does (LLaMA-Factory's do_* switches; the stage is a MethodConfig key)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune_kit.config.base import StageConfig, option


@dataclass(frozen=True, repr=False)
class RunConfig(StageConfig):
    """What ``finetune-kit train`` should do (LLaMA-Factory's do_* switches)."""

    section = "run"

    do_train: bool = option(False, "Train an adapter.")
    do_eval: bool = option(False, "Compute eval loss on eval_dataset or the val_size split.")
    do_predict: bool = option(False, "Generate on eval_dataset and score ROUGE/BLEU (needs predict_with_generate).")
    predict_with_generate: bool = option(False, "Generate text at prediction time (LLaMA-Factory requires it).")

    def _check(self) -> list[str]:
        problems = []
        if self.do_predict and not self.predict_with_generate:
            problems.append(
                "do_predict needs predict_with_generate: true (as in LLaMA-Factory). Fix: add "
                "predict_with_generate: true"
            )
        if not (self.do_train or self.do_eval or self.do_predict):
            problems.append("nothing to do: set do_train: true (or do_predict: true with predict_with_generate: true)")
        if self.do_eval and not self.do_train:
            problems.append(
                "do_eval without do_train is not supported yet (eval loss is computed during training). "
                "Fix: add do_train: true with val_size or eval_dataset, or use do_predict for ROUGE/BLEU"
            )
        return problems
