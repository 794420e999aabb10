"""How a trainer encodes its data: the stage's encoding, cached, remembered per ``Conversations``, checked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_kit.data.cache import tokenize_cached
from finetune_kit.data.conversations import Conversations, ConversationStream
from finetune_kit.data.stream import tokenize_stream
from finetune_kit.data.tokenize import TokenizedDataset
from finetune_kit.errors import ConfigError
from finetune_kit.train.distributed import main_process_first
from finetune_kit.train.stages import check_stage

if TYPE_CHECKING:
    from finetune_kit.train.trainer import LoraTrainer

Data = Conversations | ConversationStream | TokenizedDataset


def tokenize_for(trainer: LoraTrainer, data: Data, *, keep: bool) -> TokenizedDataset:
    """:meth:`tokenize`; ``keep`` says whether ``tokenized_path`` (the training data's folder) applies."""
    if isinstance(data, TokenizedDataset):
        check_encoding(trainer, data)
        return data
    if not isinstance(data, (Conversations, ConversationStream)):
        raise TypeError(
            "expected Conversations (DatasetRegistry.load(...)), a ConversationStream "
            f"(DatasetRegistry.stream(...)) or a TokenizedDataset, got {type(data).__name__}"
        )
    cached = trainer._tokenized.get(id(data))
    if cached is not None and cached[0] is data:
        return cached[1]
    tokenizer, template = trainer._tokenizer()
    e = trainer.encoding
    options: dict[str, Any] = dict(
        cutoff_len=e.cutoff_len,
        train_on_prompt=e.train_on_prompt,
        mask_history=e.mask_history,
        stage=trainer.method.stage,  # each training stage is a data-layer stage of the same name
    )
    if (e.packing or e.neat_packing) and trainer.method.stage not in ("sft", "pt"):
        raise ConfigError(
            f"packing and neat_packing apply to stage sft and pt; stage {trainer.method.stage} trains whole "
            "pairs. Fix: remove packing/neat_packing"
        )
    if e.packing is not None:
        options["packing"] = e.packing
    if e.neat_packing:
        options["neat_packing"] = True
    if isinstance(data, ConversationStream):
        if packs(trainer):
            raise ConfigError(
                "packing of streamed data is not supported: packs are filled from the whole data. Fix: set "
                "streaming: false, or packing: false and neat_packing: false"
            )
        if trainer.training.max_steps <= 0:
            raise ConfigError(
                "streamed data has no length to count epochs by. Fix: set max_steps (as LLaMA-Factory requires)"
            )
        if trainer.training.group_by_length:
            raise ConfigError("group_by_length needs every example up front. Fix: turn it off for streamed data")
        check_stage(trainer.method, per_device_train_batch_size=2, streaming=True)
        stream = tokenize_stream(data, tokenizer, template, **options)
        trainer._tokenized[id(data)] = (data, stream)
        return stream
    with main_process_first():  # launched: rank 0 fills the cache, the others read it
        done = tokenize_cached(
            data,
            tokenizer,
            template,
            **options,
            num_workers=e.preprocessing_num_workers or 1,
            cache=not e.overwrite_cache,
            tokenized_path=e.tokenized_path if keep else None,
        )
    trainer._tokenized[id(data)] = (data, done)
    return done


def packs(trainer: LoraTrainer) -> bool:
    """True when the trainer's encoding makes packed rows (several examples each, restarting positions)."""
    e, stage = trainer.encoding, trainer.method.stage
    if stage == "sft":
        return bool(e.packing or e.neat_packing)
    return stage == "pt" and e.neat_packing


def check_encoding(trainer: LoraTrainer, data: TokenizedDataset) -> None:
    stage = trainer.method.stage
    if data.stage != stage:
        raise ConfigError(
            f"this TokenizedDataset was encoded for stage {data.stage}, but the trainer trains stage "
            f"{trainer.method.stage}. Fix: tokenize with this trainer: trainer.tokenize(conversations)"
        )
    e, template = trainer.encoding, trainer._template_name()
    made = (data.cutoff_len, data.train_on_prompt, data.mask_history)
    if made != (e.cutoff_len, e.train_on_prompt, e.mask_history) or (
        data.template and template and data.template != template and not template.startswith("the ")
    ):
        raise ConfigError(
            f"this TokenizedDataset was encoded with template={data.template}, cutoff_len={data.cutoff_len}, "
            f"train_on_prompt={data.train_on_prompt}, mask_history={data.mask_history}, but the trainer uses "
            f"template={template}, cutoff_len={e.cutoff_len}, train_on_prompt={e.train_on_prompt}, "
            f"mask_history={e.mask_history}. Fix: tokenize with this trainer: trainer.tokenize(conversations)"
        )
    if not data.streaming and data.packed != packs(trainer):
        made_as, wanted = ("packed", "unpacked") if data.packed else ("unpacked", "packed")
        raise ConfigError(
            f"this TokenizedDataset was encoded {made_as}, but the trainer's encoding is {wanted} (packing: "
            f"{e.packing}, neat_packing: {e.neat_packing}). Fix: tokenize with this trainer: "
            "trainer.tokenize(conversations)"
        )
