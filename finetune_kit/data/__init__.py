"""Dataset registry, formats, chat templates and tokenization."""
