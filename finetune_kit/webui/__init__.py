"""``finetune-kit webui``: a browser board over the library, in the manner of LLaMA Board.

Train (model, data preview and report, method and hyperparameters, YAML preview/save/load, start,
stop, live loss, ETA and log, resume), Evaluate (ROUGE/BLEU and benchmarks, before/after), Export
(merge, GGUF, parity, Modelfile) and Chat (streaming), in English and Chinese. Built with gradio
(``pip install "finetune-kit[webui]"``), which is imported only when the board starts. Example::

    from finetune_kit.webui import launch
    launch()                 # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT / GRADIO_SHARE)
"""

from __future__ import annotations

from finetune_kit.webui.app import BoardServer, build_app, launch

__all__ = ["BoardServer", "build_app", "launch"]
