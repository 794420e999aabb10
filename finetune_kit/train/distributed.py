"""Several processes: who this process is, when ``finetune-kit train`` launches itself, and DeepSpeed/FSDP.

``finetune-kit train`` started by hand on a machine with several visible GPUs re-runs itself
under ``torchrun`` with one process per GPU (LLaMA-Factory's behaviour; ``CUDA_VISIBLE_DEVICES``
selects the GPUs). The same variables LLaMA-Factory reads shape the launch: ``FORCE_TORCHRUN``
(launch even with one GPU or none; ``0`` turns the self-launch off), ``NPROC_PER_NODE``,
``NNODES``, ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Started by ``torchrun``,
``accelerate launch`` or ``notebook_launcher`` instead, it runs as the rank it was given.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from finetune_kit.errors import ConfigError, EnvironmentCheckError, MissingDependencyError

LAUNCH_VARIABLES = ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
# the DeepSpeed configurations shipped with finetune_kit, by the short names `deepspeed:` accepts
SHIPPED_DEEPSPEED = ("ds_z0", "ds_z2", "ds_z2_offload", "ds_z3", "ds_z3_offload")
_TRUE, _FALSE = ("1", "true", "yes", "on", "y"), ("0", "false", "no", "off", "n")


def world_size() -> int:
    """How many processes train together (1 when not launched by torchrun/accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_launched(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by torchrun, ``accelerate launch`` or ``notebook_launcher``."""
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a launch (only rank 0 prints and writes)."""
    return os.environ.get("RANK", "0") == "0"


@dataclass(frozen=True)
class Launch:
    """How ``finetune-kit train`` re-runs itself: ``torchrun`` over this node's processes."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def command(self, argv: Sequence[str]) -> list[str]:
        """The command line running ``finetune-kit train argv`` under torchrun (``torch.distributed.run``)."""
        return [
            sys.executable,
            "-m",
            "finetune_kit.train.distributed",  # torchrun, with its workers' exit status and without its traceback
            f"--nnodes={self.nnodes}",
            f"--node_rank={self.node_rank}",
            f"--nproc_per_node={self.nproc_per_node}",
            f"--master_addr={self.master_addr}",
            f"--master_port={self.master_port}",
            "-m",
            "finetune_kit.cli.main",
            "train",
            *argv,
        ]

    def describe(self) -> str:
        nodes = f" x {self.nnodes} nodes (this is node {self.node_rank})" if self.nnodes > 1 else ""
        return (
            f"Launching {self.nproc_per_node} process{'es' if self.nproc_per_node > 1 else ''} per node{nodes}, "
            f"{self.world_size} in all, through torchrun (rendezvous {self.master_addr}:{self.master_port})"
        )


def run_launch(launch: Launch, argv: Sequence[str]) -> int:
    """Run ``finetune-kit train argv`` under ``launch`` and return its exit status.

    Ctrl-C reaches every process of the terminal's group, so the workers save a checkpoint and
    stop by themselves; this process waits for them rather than dying first. SIGTERM (a job
    scheduler's stop) is passed on to torchrun, which passes it to the workers.
    """
    print(launch.describe(), file=sys.stderr, flush=True)
    proc = subprocess.Popen(launch.command(argv))

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def plan_launch(environ: Mapping[str, str] | None = None, gpus: int | None = None) -> Launch | None:
    """The launch ``finetune-kit train`` should make, or None to train in this process.

    None inside a launched process, with ``FORCE_TORCHRUN=0``, and on one node with at most one
    visible GPU unless ``FORCE_TORCHRUN`` is set. Raises :class:`ConfigError` naming the variable
    when one of them is malformed. Example: ``plan_launch({"FORCE_TORCHRUN": "1", "NPROC_PER_NODE":
    "2"}, gpus=0).nproc_per_node == 2``.
    """
    env = os.environ if environ is None else environ
    if is_launched(env):
        return None
    force = env.get("FORCE_TORCHRUN", "").strip().lower()
    if force and force not in _TRUE + _FALSE:
        raise ConfigError(f"FORCE_TORCHRUN={env['FORCE_TORCHRUN']!r}: expected 1 or 0")
    if force in _FALSE and force:
        return None
    gpus = visible_gpus() if gpus is None else gpus
    nnodes = _positive(env, "NNODES", 1)
    if force not in _TRUE and nnodes == 1 and gpus <= 1:
        return None
    nproc = _positive(env, "NPROC_PER_NODE", max(gpus, 1))
    node_rank = _positive(env, "NODE_RANK", 0, minimum=0)
    problems = []
    if node_rank >= nnodes:
        problems.append(f"NODE_RANK={node_rank} with NNODES={nnodes}: node ranks go from 0 to {nnodes - 1}")
    if nnodes > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            problems.append(
                f"NNODES={nnodes} needs {' and '.join(missing)}: every node must name the same rendezvous. "
                "Fix: MASTER_ADDR=<node 0's address> MASTER_PORT=29500 on every node"
            )
    if problems:
        raise ConfigError(problems)
    port = _positive(env, "MASTER_PORT", 0) or free_port()
    return Launch(
        nproc_per_node=nproc,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=port,
    )


def visible_gpus() -> int:
    """CUDA GPUs this process can see (``CUDA_VISIBLE_DEVICES`` applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    """A TCP port free on this host right now (for a one-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _positive(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: expected an integer >= {minimum}")
    return value


def shared_state() -> Any:
    """Accelerate's process state (joining the process group) when launched, else None.

    ``TrainingArguments`` later re-creates it over the same process group, so this is safe to
    call before them (tokenizing, checking the output folder).
    """
    if world_size() <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. tokenizing into the cache), the others after it; a no-op alone."""
    state = shared_state()
    if state is None:
        yield
        return
    with state.main_process_first():
        yield


def wait_for_everyone() -> None:
    """A barrier across the launched processes (a no-op alone)."""
    state = shared_state()
    if state is not None:
        state.wait_for_everyone()


def deepspeed_config(value: str) -> str:
    """The JSON file the ``deepspeed:`` key names: a path, or a shipped name (``ds_z3``, ``ds_z3_offload``, ...).

    Raises :class:`ConfigError` when the file is missing or is not a JSON object.
    """
    name = value.removesuffix("_config.json").removesuffix(".json")
    if name in SHIPPED_DEEPSPEED and not Path(value).exists():
        return str(resources.files("finetune_kit.train").joinpath("deepspeed", f"{name}_config.json"))
    path = Path(value)
    if not path.is_file():
        raise ConfigError(
            f"deepspeed: {value!r} is not a file. Fix: a DeepSpeed JSON config path, or one of the shipped "
            f"configs: {', '.join(SHIPPED_DEEPSPEED)}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"deepspeed: {path} is not valid JSON ({exc}). Fix: correct the file") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed: {path} holds {type(data).__name__}; expected a JSON object")
    return str(path)


def check_sharding(t: Any) -> None:
    """Fail now, with the fix, when ``t`` asks for DeepSpeed/FSDP that this machine cannot run.

    DeepSpeed needs its package and CUDA GPUs (its CPU backend needs Intel's oneCCL, which it
    does not install); FSDP needs CUDA GPUs here. Plain data parallelism runs anywhere.
    """
    import torch

    if t.deepspeed:
        deepspeed_config(t.deepspeed)
    if (t.deepspeed or t.fsdp) and not torch.cuda.is_available():
        what = "deepspeed" if t.deepspeed else "fsdp"
        raise EnvironmentCheckError(
            f"{what}: {getattr(t, what)!r} needs CUDA GPUs, and none is visible. Fix: drop {what} to train with "
            "plain data parallelism (FORCE_TORCHRUN=1 NPROC_PER_NODE=N runs N processes on CPU too), or run on a "
            "GPU machine"
        )
    if t.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise MissingDependencyError("deepspeed", purpose="DeepSpeed ZeRO (the deepspeed key)", extra="deepspeed")


def _zero_section(config: str | None) -> dict[str, Any]:
    """The ``zero_optimization`` section of a resolved DeepSpeed config file ({} without DeepSpeed)."""
    if not config:
        return {}
    section = json.loads(Path(config).read_text(encoding="utf-8")).get("zero_optimization", {})
    return section if isinstance(section, dict) else {}


def zero_stage(config: str | None) -> int:
    """The ZeRO stage a resolved DeepSpeed config file asks for (0 without DeepSpeed)."""
    return int(_zero_section(config).get("stage", 0))


def offloads(config: str | None) -> tuple[bool, bool]:
    """Whether a DeepSpeed config offloads the optimizer states and the parameters to the CPU."""
    zero = _zero_section(config)

    def on(key: str) -> bool:
        return str(zero.get(key, {}).get("device", "none")).lower() in ("cpu", "nvme")

    return on("offload_optimizer"), on("offload_param")


def fsdp_config(value: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``fsdp_config:`` as transformers takes it: a mapping, or the JSON file a string names."""
    if value is None or isinstance(value, Mapping):
        return dict(value) if value is not None else None
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"fsdp_config: {value!r} is not a file. Fix: a JSON file of FSDP options, or omit it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"fsdp_config: {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"fsdp_config: {path} holds {type(data).__name__}; expected a JSON object")
    return data


def forget_zero3() -> None:
    """Undo what DeepSpeed ZeRO-3 training arguments set process-wide, so ``from_pretrained`` loads whole
    models again (transformers partitions every load while a ZeRO-3 config is registered)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def sharded(t: Any) -> bool:
    """True when the weights are split across processes while training (DeepSpeed ZeRO-3 or FSDP)."""
    if t.fsdp:
        return True
    return bool(t.deepspeed) and zero_stage(deepspeed_config(t.deepspeed)) == 3


LAUNCH_RECORD = "finetune_kit_launch.json"  # in each checkpoint: how many processes wrote it, with which batch


def launch_record(args: Any) -> dict[str, Any]:
    """What a checkpoint records about the launch that wrote it (``args``: the training arguments)."""
    world = int(getattr(args, "world_size", 1) or 1)
    per_device, accumulation = int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps)
    return {
        "world_size": world,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "global_batch_size": world * per_device * accumulation,
        "deepspeed_zero_stage": zero_stage(deepspeed_config(args.deepspeed)) if getattr(args, "deepspeed", None) else 0,
    }


def _torchrun(argv: Sequence[str]) -> int:
    """``torch.distributed.run`` on ``argv``; a failed worker's own exit status (1, or 130/143 after a
    signal) comes back instead of torchrun's traceback (each worker has printed its error already)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(list(argv))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode]
        return next((c for c in codes if c > 0), 1)
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun(sys.argv[1:]))
