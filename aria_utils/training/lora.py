"""LoRA students: a low-rank adapter on the student UNet (peft through diffusers' `add_adapter`).

Use cases: adapting an already-small UNet (a published BK-SDM, `--student_model_name_or_path`)
towards a new teacher, and quick low-memory runs. The frozen base may run in fp16/bf16; the
adapter's trainable parameters stay fp32 so mixed-precision gradient unscaling works.
"""

import os

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_CHECKPOINT_DIR = "unet_lora"
ADAPTER_CHECKPOINT_FILE = "adapter_model.safetensors"


def add_lora_adapter(unet, rank, alpha, target_modules, base_dtype=torch.float32):
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.to(dtype=base_dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))
    cast_training_params(unet, dtype=torch.float32)
    return unet


def has_lora(unet):
    return bool(getattr(unet, "peft_config", None))


def save_adapter_checkpoint(unet, directory):
    from peft.utils import get_peft_model_state_dict

    from aria_utils.files import save_safetensors_atomically

    os.makedirs(os.path.join(directory, ADAPTER_CHECKPOINT_DIR), exist_ok=True)
    state = {key: value.detach() for key, value in get_peft_model_state_dict(unet).items()}
    save_safetensors_atomically(state, os.path.join(directory, ADAPTER_CHECKPOINT_DIR, ADAPTER_CHECKPOINT_FILE))


def load_adapter_checkpoint(unet, directory):
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(directory, ADAPTER_CHECKPOINT_DIR, ADAPTER_CHECKPOINT_FILE))
    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"Adapter checkpoint has keys this model lacks: {unexpected[:5]}")


def lora_layers_in_diffusers_format(unet):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def trainable_parameters(model):
    return [parameter for parameter in model.parameters() if parameter.requires_grad]
