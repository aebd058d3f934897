"""agrivlm/configs/accelerate/*.yaml are what `accelerate launch --config_file` reads: every key known, env as
intended (in a clone also as configs/accelerate/, the link at the root)."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_multi_gpu_env

from agrivlm.resources import configs_dir

CONFIGS = configs_dir() / "accelerate"


@pytest.mark.parametrize(
    ("name", "kind"),
    [("ddp", DistributedType.MULTI_GPU), ("fsdp", DistributedType.FSDP), ("deepspeed", DistributedType.DEEPSPEED)],
)
def test_config_loads_with_known_keys(name: str, kind: DistributedType) -> None:
    path = CONFIGS / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(path)  # unknown top-level keys raise
    assert config.distributed_type == kind and config.mixed_precision == "bf16"
    options = {o for action in launch_command_parser()._actions for o in action.option_strings}
    nested = list(config.fsdp_config) + list(config.deepspeed_config)
    assert all(f"--{key}" in options for key in nested), nested  # accelerate turns them into launch options
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    if name == "deepspeed":
        assert args.use_deepspeed and args.zero_stage == 2 and args.gradient_clipping == 1.0


def test_fsdp_config_becomes_fsdp2_environment() -> None:
    path = CONFIGS / "fsdp.yaml"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
