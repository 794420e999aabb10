"""Environment on this CPU-only test machine: what it reports and what it refuses."""

from __future__ import annotations

import pytest
import torch

from finetune_kit.environment import Environment
from finetune_kit.errors import EnvironmentCheckError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these tests describe a CPU-only machine")


@pytest.fixture(scope="module")
def env() -> Environment:
    return Environment.detect()


def test_detect_sees_no_gpu_and_the_installed_torch(env):
    assert env.gpus == ()
    assert not env.has_gpu
    assert not env.bf16_supported
    assert env.torch == torch.__version__
    assert env.cpu_count >= 1
    assert env.version("torch") is not None
    assert env.version("definitely-not-a-package") is None


def test_report_mentions_torch_and_no_gpu(env):
    report = env.report()
    assert f"- PyTorch: {torch.__version__}" in report
    assert "GPU: none" in report
    assert f"- transformers: {env.version('transformers')}" in report


def test_repr_is_one_line(env):
    text = repr(env)
    assert "\n" not in text
    assert f"torch {torch.__version__}" in text
    assert "CPU only" in text


def test_require_gpu_raises_with_the_fix(env):
    with pytest.raises(EnvironmentCheckError) as err:
        env.require(gpu=True)
    assert isinstance(err.value, RuntimeError)
    assert "no usable GPU" in str(err.value)
    assert "Fix:" in str(err.value)


def test_require_bf16_raises_with_the_fix(env):
    with pytest.raises(EnvironmentCheckError, match="bf16") as err:
        env.require(bf16=True)
    assert "set bf16: false" in str(err.value)


def test_require_lists_every_problem_at_once(env):
    with pytest.raises(EnvironmentCheckError) as err:
        env.require(gpu=True, bf16=True, packages=("definitely-not-a-package",))
    message = str(err.value)
    assert message.count("\n  - ") == 3
    assert "pip install definitely-not-a-package" in message


def test_require_with_nothing_passes(env):
    assert env.require() is env
    assert env.require(packages=("torch",)) is env
