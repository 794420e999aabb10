"""``finetune-kit``: env, train, eval, export, api, chat, quickstart, data check.

``train/eval/export/api/chat`` take YAML files, ``key=value`` overrides and ``--key value``
flags with LLaMA-Factory's key names, so ``llamafactory-cli`` YAMLs run unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

USAGE = """usage: finetune-kit <command> [config.yaml] [key=value ...] [--key value ...]

commands:
  env          print Python, torch, CUDA, GPUs and library versions
  train        LoRA SFT (and do_predict) from an LLaMA-Factory-style YAML
  eval         generate on eval_dataset and score ROUGE/BLEU (predict)
  export       merge a LoRA adapter into its base model (export_dir, export_size)
  api          serve an OpenAI-compatible API (API_HOST, API_PORT, API_KEY)
  chat         chat in the terminal (type 'clear' to reset, 'exit' to quit)
  quickstart   the whole workflow offline on the bundled model
  data check   check every row of the datasets in a dataset_dir
  version      print the version

`finetune-kit <command> --help` lists the keys a command accepts."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    from finetune_kit.cli import commands
    from finetune_kit.errors import FinetuneKitError

    handlers = {"env": commands.env, "train": commands.train, "eval": commands.evaluate,
                "export": commands.export, "api": commands.api, "chat": commands.chat,
                "quickstart": commands.quickstart, "data": commands.data, "version": commands.version}
    if command not in handlers:
        from finetune_kit.errors import did_you_mean

        print(f"finetune-kit: unknown command '{command}'.{did_you_mean(command, handlers)}\n\n{USAGE}",
              file=sys.stderr)
        return 2
    try:
        return handlers[command](rest) or 0
    except FinetuneKitError as exc:
        if os.environ.get("FINETUNE_KIT_TRACEBACK"):
            raise
        print(f"finetune-kit {command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a busy API port or an unwritable output folder
        if os.environ.get("FINETUNE_KIT_TRACEBACK"):
            raise
        print(f"finetune-kit {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
