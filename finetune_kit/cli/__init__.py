"""The ``finetune-kit`` command line (mirrors ``llamafactory-cli``)."""
