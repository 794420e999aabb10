"""Several processes on CPU (gloo): the self-launching CLI, two simulated nodes, a Python script under
``accelerate launch``, ``notebook_launcher``, and a checkpoint of 2 processes resumed by 1 — each
must give the per-step losses of one process with the same global batch. Plus the launch rules,
the shipped DeepSpeed configs and the resume checks, without processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_kit import ConfigError, EnvironmentCheckError, LoraTrainer, ModelSource, TrainingConfig
from finetune_kit.cli.main import main
from finetune_kit.train.distributed import (
    LAUNCH_RECORD,
    SHIPPED_DEEPSPEED,
    deepspeed_config,
    free_port,
    offloads,
    plan_launch,
    zero_stage,
)
from finetune_kit.train.outputs import check_resume

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "finetune_kit" / "data" / "demo"
SCRIPT = Path(__file__).with_name("_dist_train.py")


# ----- launch rules ----------------------------------------------------------------------------------
def test_one_gpu_or_none_trains_in_this_process():
    assert plan_launch({}, gpus=0) is None
    assert plan_launch({}, gpus=1) is None


def test_several_gpus_launch_one_process_each():
    launch = plan_launch({}, gpus=4)
    assert launch is not None and launch.nproc_per_node == 4 and launch.world_size == 4
    cmd = launch.command(["run.yaml", "learning_rate=1e-4"])
    assert "--nproc_per_node=4" in cmd and "--nnodes=1" in cmd
    assert cmd[-4:] == ["finetune_kit.cli.main", "train", "run.yaml", "learning_rate=1e-4"]


def test_force_torchrun_and_its_off_switch():
    forced = plan_launch({"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, gpus=0)
    assert forced is not None and forced.nproc_per_node == 2
    assert plan_launch({"FORCE_TORCHRUN": "0"}, gpus=8) is None


def test_a_launched_process_does_not_launch_again():
    assert plan_launch({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, gpus=2) is None


def test_multi_node_variables_map_to_torchrun():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29555"}
    launch = plan_launch(env, gpus=8)
    assert launch is not None
    cmd = launch.command(["x.yaml"])
    for arg in ("--nnodes=2", "--node_rank=1", "--nproc_per_node=8", "--master_addr=10.0.0.5", "--master_port=29555"):
        assert arg in cmd
    assert launch.world_size == 16


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"NNODES": "2", "NODE_RANK": "0"}, ["MASTER_ADDR", "MASTER_PORT"]),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, ["NODE_RANK=2"]),
        ({"NNODES": "two"}, ["NNODES='two'"]),
        ({"FORCE_TORCHRUN": "maybe"}, ["FORCE_TORCHRUN"]),
        ({"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "0"}, ["NPROC_PER_NODE='0'"]),
    ],
)
def test_bad_launch_variables_are_named(env, names):
    with pytest.raises(ConfigError) as err:
        plan_launch(env, gpus=2)
    for name in names:
        assert name in str(err.value)


# ----- DeepSpeed configs and resume checks ------------------------------------------------------------
def test_shipped_deepspeed_configs():
    stages = {name: zero_stage(deepspeed_config(name)) for name in SHIPPED_DEEPSPEED}
    assert stages == {"ds_z0": 0, "ds_z2": 2, "ds_z2_offload": 2, "ds_z3": 3, "ds_z3_offload": 3}
    assert offloads(deepspeed_config("ds_z3_offload")) == (True, True)
    assert offloads(deepspeed_config("ds_z2_offload")) == (True, False)
    assert offloads(deepspeed_config("ds_z3")) == (False, False)
    z3 = json.loads(Path(deepspeed_config("ds_z3")).read_text())
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # saves a usable model
    assert z3["train_micro_batch_size_per_gpu"] == "auto"  # the YAML's batch keys fill it in
    assert deepspeed_config("ds_z2_config.json") == deepspeed_config("ds_z2")  # LLaMA-Factory's file names


def test_deepspeed_key_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="ds_z3_offload"):
        deepspeed_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(str(bad))


def test_deepspeed_and_fsdp_without_cuda_fail_before_loading(tiny_llama_dir: Path, tmp_path: Path, capsys):
    for changes in ({"deepspeed": "ds_z3"}, {"fsdp": "full_shard auto_wrap"}):
        trainer = LoraTrainer(ModelSource.local(tiny_llama_dir), training=TrainingConfig(**changes))
        with pytest.raises(EnvironmentCheckError, match="Fix"):
            trainer.train("not even data")  # type: ignore[arg-type]  # refused before the data is looked at
    argv = ["train", "--do_train", "true", "--model_name_or_path", str(tiny_llama_dir), "--template", "smollm2"]
    argv += ["--dataset", "missing", "--dataset_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    assert main([*argv, "--deepspeed", "ds_z3"]) != 0
    assert "deepspeed" in capsys.readouterr().err
    # planning a ZeRO-3 run needs no GPU and no DeepSpeed: only config.json
    assert main([*argv, "--deepspeed", "ds_z3", "--plan"]) == 0
    assert "ZeRO-3" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="pick one"):
        TrainingConfig(deepspeed="ds_z2", fsdp="full_shard")


def test_a_deepspeed_checkpoint_resumes_only_on_its_own_process_count(tmp_path: Path):
    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "global_step4").mkdir(parents=True)
    for rank in (0, 1):
        (checkpoint / "global_step4" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="2 processes") as err:
        check_resume(str(checkpoint), TrainingConfig(deepspeed="ds_z3"), processes=1)
    assert "adapter_name_or_path" in str(err.value)
    with pytest.raises(ConfigError, match="cannot re-shard"):
        check_resume(str(checkpoint), TrainingConfig(), processes=2)
    check_resume(str(checkpoint), TrainingConfig(deepspeed="ds_z3"), processes=2)  # the same launch: fine


def test_a_changed_global_batch_is_warned_with_the_fix(tmp_path: Path):
    record = {"world_size": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}
    (tmp_path / LAUNCH_RECORD).write_text(json.dumps({**record, "global_batch_size": 4}))
    with pytest.warns(UserWarning, match="gradient_accumulation_steps: 2"):
        check_resume(str(tmp_path), TrainingConfig(per_device_train_batch_size=2), processes=1)
    check_resume(str(tmp_path), TrainingConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2), 1)


# ----- real processes (gloo on CPU) --------------------------------------------------------------------
_YAML = """\
model_name_or_path: {model}
template: smollm2
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
lora_dropout: 0
dataset: shop_alpaca
dataset_dir: {demo}
cutoff_len: 64
max_samples: 64
preprocessing_num_workers: 1
logging_steps: 1
save_steps: 2
per_device_train_batch_size: 4
learning_rate: 1.0e-2
max_steps: 4
lr_scheduler_type: constant
report_to: none
seed: 0
disable_tqdm: true
"""


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    path = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def _run(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("dist") / "run.yaml"
    path.write_text(_YAML.format(model=tiny_llama_dir, demo=DEMO))
    return path


@pytest.fixture(scope="module")
def one_process(run_yaml: Path) -> tuple[Path, list[float]]:
    """The reference: one process, batch 4."""
    out = run_yaml.parent / "one"
    assert main(["train", str(run_yaml), f"output_dir={out}"]) == 0
    losses = _losses(out)
    assert len(losses) == 4 and losses[0] - losses[-1] > 0.01  # it learns: the comparison can tell runs apart
    return out, losses


@pytest.fixture(scope="module")
def two_processes(run_yaml: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``finetune-kit train`` launching itself on 2 processes (FORCE_TORCHRUN), batch 2 each."""
    out = run_yaml.parent / "two"
    cmd = [sys.executable, "-m", "finetune_kit.cli.main", "train", str(run_yaml), f"output_dir={out}"]
    done = _run([*cmd, "per_device_train_batch_size=2"], _env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2"))
    return out, done


def test_cli_launches_itself_and_matches_one_process(one_process, two_processes):
    out, done = two_processes
    assert "Launching 2 processes per node" in done.stderr
    assert "2 per device x 1 accumulation x 2 device(s) = 4 per step" in done.stdout
    assert done.stdout.count("Training finished") == 1  # rank 0 alone speaks
    assert _losses(out) == pytest.approx(one_process[1], rel=1e-5, abs=1e-5)
    record = json.loads((out / "checkpoint-2" / LAUNCH_RECORD).read_text())
    assert record["world_size"] == 2 and record["global_batch_size"] == 4
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    saved = json.loads((out / "finetune_kit_config.json").read_text())["config"]["training"]
    assert saved["gradient_checkpointing"] is False  # auto, resolved: no GPU, nothing to fit


def test_a_two_process_checkpoint_resumes_on_one_process(one_process, two_processes, tmp_path: Path):
    out = tmp_path / "resumed"
    out.mkdir()
    subprocess.run(["cp", "-r", str(two_processes[0] / "checkpoint-2"), str(out)], check=True)
    yaml = two_processes[0].parent / "run.yaml"
    argv = ["train", str(yaml), f"output_dir={out}", "per_device_train_batch_size=2", "gradient_accumulation_steps=2"]
    with pytest.warns(UserWarning, match="Resuming training from"):
        assert main(argv) == 0
    assert _losses(out) == pytest.approx(one_process[1][2:], rel=1e-5, abs=1e-5)  # steps 3 and 4


def test_two_simulated_nodes_match_one_process(one_process, run_yaml: Path):
    out = run_yaml.parent / "nodes"
    cmd = [sys.executable, "-m", "finetune_kit.cli.main", "train", str(run_yaml), f"output_dir={out}"]
    cmd.append("per_device_train_batch_size=2")
    common = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    second = subprocess.Popen(
        cmd, env=_env(**common, NODE_RANK="1"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        first = _run(cmd, _env(**common, NODE_RANK="0"))
    finally:
        tail = second.communicate(timeout=300)[0]
    assert second.returncode == 0, tail[-3000:]
    assert "2 nodes (this is node 0)" in first.stderr
    assert _losses(out) == pytest.approx(one_process[1], rel=1e-5, abs=1e-5)


def _script_losses(out: Path) -> tuple[list[float], str | None]:
    saved = json.loads((out / "losses.json").read_text())
    return [loss for _, loss in saved["losses"]], saved["world_size"]


@pytest.fixture(scope="module")
def script_one_process(run_yaml: Path, tiny_llama_dir: Path) -> list[float]:
    out = run_yaml.parent / "script-one"
    _run([sys.executable, str(SCRIPT), str(tiny_llama_dir), str(out)], _env())
    losses, world = _script_losses(out)
    assert world is None
    return losses


def test_a_python_script_under_accelerate_launch(script_one_process, run_yaml: Path, tiny_llama_dir: Path):
    out = run_yaml.parent / "script-accelerate"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    _run([*launch, "--main_process_port", str(free_port()), str(SCRIPT), str(tiny_llama_dir), str(out)], _env())
    losses, world = _script_losses(out)
    assert world == "2"
    assert losses == pytest.approx(script_one_process, rel=1e-5, abs=1e-5)


def test_notebook_launcher(script_one_process, run_yaml: Path, tiny_llama_dir: Path):
    out = run_yaml.parent / "script-notebook"
    _run([sys.executable, str(SCRIPT), str(tiny_llama_dir), str(out), "--notebook-launcher", "2"], _env())
    losses, world = _script_losses(out)
    assert world == "2"
    assert losses == pytest.approx(script_one_process, rel=1e-5, abs=1e-5)


def test_a_two_process_checkpoint_merges_and_exports(two_processes, tiny_llama_dir: Path, tmp_path: Path):
    out, _ = two_processes
    merged = tmp_path / "merged"
    argv = ["export", "--model_name_or_path", str(tiny_llama_dir), "--template", "smollm2"]
    argv += ["--adapter_name_or_path", str(out / "checkpoint-2"), "--export_dir", str(merged)]
    assert main(argv) == 0
    model = ModelSource.local(merged).load()
    assert model.adapters == () and any(merged.glob("*.safetensors"))
