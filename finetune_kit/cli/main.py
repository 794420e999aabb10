"""``finetune-kit``: env, train, eval, export, api, chat, quickstart, data check.

``train/eval/export/api/chat`` take YAML files, ``key=value`` overrides and ``--key value``
flags with LLaMA-Factory's key names, so ``llamafactory-cli`` YAMLs run unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from finetune_kit.cli.commands import COMMANDS, configure_logging, usage
from finetune_kit.errors import FinetuneKitError, did_you_mean


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"finetune-kit: unknown command '{command}'.{did_you_mean(command, COMMANDS)}\n\n{usage()}", file=sys.stderr
        )
        return 2
    configure_logging()
    try:
        return COMMANDS[command].run(rest) or 0
    except (FinetuneKitError, OSError) as exc:  # OSError: e.g. a busy API port or an unwritable output folder
        if os.environ.get("FINETUNE_KIT_TRACEBACK"):
            raise
        print(f"finetune-kit {command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))  # 130/143 after SIGINT/SIGTERM saved a checkpoint
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
