"""The accelerate config files under configs/accelerate/: each is read by accelerate's own loader and by
``accelerate launch``'s own argument handling, and says what its name promises (DDP, FSDP2 with full shard,
activation checkpointing and full state dicts, the offload variant, DeepSpeed ZeRO-2 and ZeRO-3).

DeepSpeed is not installed here: reading a ZeRO file must not need it (accelerate imports it only to launch).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import ComputeEnvironment, DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))

# file → (engine, FSDP settings or ZeRO stage)
EXPECTED = {
    "ddp.yaml": (DistributedType.MULTI_GPU, None),
    "fsdp2.yaml": (DistributedType.FSDP, {"fsdp_offload_params": False}),
    "fsdp2_offload.yaml": (DistributedType.FSDP, {"fsdp_offload_params": True}),
    "zero2.yaml": (DistributedType.DEEPSPEED, 2),
    "zero3.yaml": (DistributedType.DEEPSPEED, 3),
}


def test_the_shipped_files_are_the_expected_set():
    assert {p.name for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_file_parses_as_an_accelerate_cluster_config(path):
    cfg = load_config_from_file(str(path))
    engine, detail = EXPECTED[path.name]
    assert isinstance(cfg, ClusterConfig) and cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert cfg.distributed_type == engine and cfg.num_machines == 1 and cfg.num_processes > 1 and not cfg.use_cpu
    # The file's first lines say what it is for and that num_processes is to be edited.
    head = path.read_text().split("\ncompute_environment")[0]
    assert head.startswith("# ") and "num_processes" in head and f"configs/accelerate/{path.name}" in head
    if engine == DistributedType.FSDP:
        f = cfg.fsdp_config
        assert f["fsdp_version"] == 2 and f["fsdp_reshard_after_forward"] is True
        assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and f["fsdp_activation_checkpointing"] is True
        assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT" and f["fsdp_offload_params"] is detail["fsdp_offload_params"]
        assert not cfg.deepspeed_config
    elif engine == DistributedType.DEEPSPEED:
        d = cfg.deepspeed_config
        assert d["zero_stage"] == detail and not cfg.fsdp_config
        assert d.get("zero3_save_16bit_model", False) is (detail == 3)  # ZeRO-3 gathers 16-bit weights on save
    else:
        assert not cfg.fsdp_config and not cfg.deepspeed_config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_launch_takes_each_file_as_it_is(path, monkeypatch):
    """``accelerate launch --config_file FILE -m rlhfkit.cli run CONFIG``: the launcher's own validation picks the
    engine from the file; for FSDP the environment it gives the processes builds the plugin the file describes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "--main_process_port", "0", "-m", "rlhfkit.cli", "run", "pipeline.yaml"])
    args, _, _ = _validate_launch_command(args)
    engine, detail = EXPECTED[path.name]
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        engine == DistributedType.MULTI_GPU, engine == DistributedType.FSDP, engine == DistributedType.DEEPSPEED)
    if engine == DistributedType.DEEPSPEED:
        assert int(args.zero_stage) == detail
        return
    if engine != DistributedType.FSDP:
        return
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy

    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # as each launched process builds it
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and plugin.activation_checkpointing
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) is detail["fsdp_offload_params"]


def test_deepspeed_is_refused_with_a_clear_error():
    """The loops do not run under DeepSpeed yet: an accelerator that says DEEPSPEED is refused naming the way out;
    any other passes through unchanged."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rlhfkit.distributed import refuse_deepspeed

    with pytest.raises(NotImplementedError, match="fsdp2.yaml"):
        refuse_deepspeed(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    assert refuse_deepspeed(ddp) is ddp
