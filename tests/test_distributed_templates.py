"""The DeepSpeed and FSDP templates, as far as they can be checked without a GPU.

Accelerate only runs DeepSpeed and FSDP on an accelerator (on CPU it falls back to plain DDP), so
these templates are checked here for what the script relies on; README "Scaling out" lists what ran.
"""

import os
import types

import pytest
import yaml

from conftest import REPO_ROOT

TEMPLATES = os.path.join(REPO_ROOT, "examples", "accelerate_configs")


def fake_accelerator(plugin, mixed_precision):
    state = types.SimpleNamespace(deepspeed_plugin=plugin)
    return types.SimpleNamespace(state=state, mixed_precision=mixed_precision, gradient_accumulation_steps=1)


def flags(**overrides):
    values = dict(train_batch_size=6, gradient_accumulation_steps=3, max_grad_norm=0.5, on_nonfinite="stop")
    return types.SimpleNamespace(**{**values, **overrides})


def deepspeed_plugin_from_template():
    from accelerate.utils import DeepSpeedPlugin

    config = yaml.safe_load(open(os.path.join(TEMPLATES, "deepspeed_zero2.yaml")))
    deepspeed = config["deepspeed_config"]
    # What the template may not hold: the script's flags decide these.
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(deepspeed)
    return DeepSpeedPlugin(zero_stage=deepspeed["zero_stage"], offload_optimizer_device=deepspeed["offload_optimizer_device"],
                           offload_param_device=deepspeed["offload_param_device"]), config


def test_deepspeed_config_follows_the_flags():
    from train_aria_distill import configure_deepspeed

    plugin, template = deepspeed_plugin_from_template()
    accelerator = fake_accelerator(plugin, template["mixed_precision"])
    assert configure_deepspeed(accelerator, flags(on_nonfinite="skip"))  # fp16: DeepSpeed's scaler skips
    config = plugin.deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 6 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5 and config["zero_optimization"]["stage"] == 2
    assert accelerator.gradient_accumulation_steps == 3


def test_deepspeed_refuses_a_skip_it_cannot_do():
    from train_aria_distill import configure_deepspeed

    plugin, _ = deepspeed_plugin_from_template()
    with pytest.raises(SystemExit, match="--on_nonfinite stop"):
        configure_deepspeed(fake_accelerator(plugin, "bf16"), flags(on_nonfinite="skip"))
    assert configure_deepspeed(fake_accelerator(plugin, "bf16"), flags(on_nonfinite="stop"))
    assert not configure_deepspeed(fake_accelerator(None, "bf16"), flags(on_nonfinite="skip"))  # not DeepSpeed


def test_fsdp_template_holds_what_the_checkpoint_hook_needs():
    # accelerate refuses to build this plugin on a CPU (sync_module_states needs an accelerator), so only
    # the template is checked: the save hook gathers a full state dict, and LoRA/EMA need the original
    # parameters.
    config = yaml.safe_load(open(os.path.join(TEMPLATES, "fsdp.yaml")))
    assert config["distributed_type"] == "FSDP"
    assert config["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert config["fsdp_config"]["fsdp_use_orig_params"] is True
