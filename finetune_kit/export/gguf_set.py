"""A folder of GGUF files for llama.cpp and Ollama: the files, their parity with the transformers model,
and a Modelfile (plus ``ollama create`` when Ollama is installed)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_kit._artifacts import RUN_RECORD, read_record
from finetune_kit.errors import FinetuneKitWarning
from finetune_kit.export.gguf import write_ggufs
from finetune_kit.export.ollama import modelfile, ollama_create, write_modelfile
from finetune_kit.export.parity import DEFAULT_PROBES, ParityReport, Reference, check_parity, write_parity
from finetune_kit.export.result import GgufExport

if TYPE_CHECKING:
    from finetune_kit.export.config import ExportConfig
    from finetune_kit.models.loaded import LoadedModel

DEFAULT_NUM_CTX = 4096  # when neither the training cutoff_len nor the model's context is known


def write_gguf_set(
    hf_dir: Path,
    folder: Path,
    reference: LoadedModel,
    config: ExportConfig,
    *,
    probes: Sequence[str] | None = None,
) -> GgufExport:
    """Write ``config.export_gguf`` files from the merged model in ``hf_dir`` into ``folder``; check each
    against ``reference`` on ``probes`` (unless ``gguf_parity`` is off), write the Modelfile and run
    ``ollama create``."""
    files = write_ggufs(hf_dir, folder, config.export_gguf, dtype=merged_dtype(hf_dir))
    reports: tuple[ParityReport, ...] = ()
    if config.gguf_parity:
        probe_ref = Reference.of(reference, probes or DEFAULT_PROBES)
        reports = tuple(check_parity(f.path, f.outtype, probe_ref) for f in files)
        write_parity(folder, reports, probe_ref)
        for report in reports:
            if not report.passed:
                warnings.warn(
                    f"GGUF parity: {report.summary()}. The replies are in {folder / 'parity.json'}",
                    FinetuneKitWarning,
                    stacklevel=3,
                )
    num_ctx = config.ollama_num_ctx or context_length(reference, hf_dir)
    text = modelfile(
        files[0].path.name,
        reference.template,
        reference.tokenizer,
        system=None,
        num_ctx=num_ctx,
        runtime_adds_bos=adds_bos(files[0].path),
    )
    path = write_modelfile(folder, text)
    registered = None
    if config.export_ollama:
        registered = ollama_create(config.export_ollama, path)
        if registered is None:
            warnings.warn(
                f"no `ollama` program on PATH, so the model was not registered. Where Ollama is installed, run: "
                f"ollama create {config.export_ollama} -f {path}",
                FinetuneKitWarning,
                stacklevel=3,
            )
    return GgufExport(folder=folder, files=tuple(files), parity=reports, modelfile=path, ollama=registered)


def adds_bos(path: Path) -> bool:
    """Whether llama.cpp and Ollama put a BOS before the prompt of this GGUF (a missing key counts as yes)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return True if field is None else bool(field.contents())


def merged_dtype(hf_dir: Path) -> str:
    """The torch dtype name the merged weights were saved in (float32 when config.json does not say)."""
    try:
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def context_length(model: LoadedModel, hf_dir: Path | None = None) -> int:
    """``num_ctx`` for Ollama: the training cutoff_len when a run record says it, else the model's context."""
    folders = [*reversed(model.adapters)]
    local = model.source.local_path()
    if local is not None:
        folders.append(str(local))
    for folder in folders:
        path = Path(folder) / RUN_RECORD
        if path.is_file():
            cutoff = read_record(path).get("config", {}).get("encoding", {}).get("cutoff_len")
            if isinstance(cutoff, int) and cutoff > 0:
                return cutoff
    positions = getattr(getattr(model.model, "config", None), "max_position_embeddings", None)
    return int(positions) if isinstance(positions, int) and positions > 0 else DEFAULT_NUM_CTX


def describe_gguf(gguf: GgufExport) -> str:
    """What was written, for a person: each file with its size and parity, the Modelfile, Ollama."""
    lines = [f"GGUF files in {gguf.folder}:"]
    by_file = {r.file: r for r in gguf.parity}
    for f in gguf.files:
        report = by_file.get(f.path.name)
        check = f" | parity: {report.summary().split(': ', 1)[1]}" if report else ""
        lines.append(f"  {f.path.name} ({f.size_mb:,.1f} MB, {f.seconds:.1f} s){check}")
    if gguf.modelfile is not None:
        lines.append(f"Modelfile: {gguf.modelfile}")
        if gguf.ollama:
            lines.append(f"Ollama: registered as {gguf.ollama}; try: ollama run {gguf.ollama}")
        else:
            lines.append(f"Ollama: ollama create NAME -f {gguf.modelfile}")
    return "\n".join(lines)
