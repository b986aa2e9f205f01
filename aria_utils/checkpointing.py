"""Resumable checkpoints: atomic, rotated, and restoring everything a step depends on.

A checkpoint folder `checkpoint-<step>` holds
- Accelerate's `save_state` output (optimizer, lr scheduler, grad scaler, RNG), written by every
  process so DeepSpeed/FSDP shards are saved too; Accelerate reads it back with torch's
  `weights_only` loader;
- `unet/` (and `unet_ema/`, or `unet_lora/` and `unet_lora_ema/` for LoRA): the student in safetensors, written by the
  save hook below instead of Accelerate's generic model file, so a checkpoint's student can be loaded
  on its own with `UNet2DConditionModel.from_pretrained`;
- `training_state.json`: step, tracker and the rest of this project's state, written last.

It is written under a temporary name and renamed when complete, so a run killed mid-write never
leaves a folder that `latest` would pick.
"""

import json
import logging
import os
import re
import shutil

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
TEMPORARY_PREFIX = ".incomplete-"


def complete_checkpoints(output_dir):
    """[(step, path)] of finished checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINING_STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_checkpoint(output_dir, resume_from_checkpoint):
    """Path to resume from, or None to start fresh ("latest" with no checkpoint yet)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINING_STATE_FILE)):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint folder "
            f"(no {TRAINING_STATE_FILE}); pass a checkpoint-<step> folder or 'latest'."
        )
    return resume_from_checkpoint


def _write_json_atomically(path, data):
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_checkpoint(accelerator, output_dir, step, training_state, total_limit=None):
    """Write checkpoint-<step> atomically on all processes; prune to `total_limit` afterwards."""
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    temporary_path = os.path.join(output_dir, f"{TEMPORARY_PREFIX}checkpoint-{step}")
    if accelerator.is_main_process and os.path.exists(temporary_path):
        shutil.rmtree(temporary_path)  # left over from a run killed while writing
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary_path)  # every process: DeepSpeed/FSDP shards need all of them
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomically(os.path.join(temporary_path, TRAINING_STATE_FILE), training_state)
        if os.path.exists(final_path):  # same step written again after a resume from an older checkpoint
            shutil.rmtree(final_path)
        os.replace(temporary_path, final_path)
        prune_checkpoints(output_dir, total_limit)
        logger.info("Saved checkpoint %s", final_path)
    accelerator.wait_for_everyone()
    return final_path


def prune_checkpoints(output_dir, total_limit):
    """Keep the newest `total_limit` complete checkpoints; also drop leftovers of interrupted writes."""
    for name in os.listdir(output_dir):
        if name.startswith(TEMPORARY_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if total_limit is None:
        return
    checkpoints = complete_checkpoints(output_dir)
    for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        logger.info("Removing old checkpoint %s (--checkpoints_total_limit %d)", path, total_limit)
        shutil.rmtree(path)


def load_checkpoint(accelerator, path):
    """Restore Accelerate's state (models via the load hook) and return training_state.json's content."""
    accelerator.load_state(path)
    with open(os.path.join(path, TRAINING_STATE_FILE), encoding="utf-8") as handle:
        return json.load(handle)


PARAMETER_EMA_DIR = "unet_lora_ema"


def save_parameter_ema(ema_model, directory):
    """An EMAModel over a parameter list (no model class): shadow tensors in safetensors, counters in JSON."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = ema_model.state_dict()
    shadow = state.pop("shadow_params")
    save_file({f"shadow.{index}": tensor.detach().contiguous() for index, tensor in enumerate(shadow)},
              os.path.join(directory, "ema.safetensors"))
    _write_json_atomically(os.path.join(directory, "ema_state.json"), state)


def load_parameter_ema(ema_model, directory):
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(directory, "ema.safetensors"))
    with open(os.path.join(directory, "ema_state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    state["shadow_params"] = [tensors[f"shadow.{index}"] for index in range(len(tensors))]
    ema_model.load_state_dict(state)


class StudentCheckpointHooks:
    """Accelerate save/load hooks writing the student (and its EMA) as diffusers folders in safetensors."""

    def __init__(self, accelerator, student_class, ema_model=None):
        self.accelerator = accelerator
        self.student_class = student_class
        self.ema_model = ema_model

    def register(self):
        self.accelerator.register_save_state_pre_hook(self.save_model_hook)
        self.accelerator.register_load_state_pre_hook(self.load_model_hook)

    def save_model_hook(self, models, weights, output_dir):
        from safetensors.torch import save_file

        from aria_utils.lora import has_lora, save_adapter_checkpoint

        for model in models:
            unwrapped = self.accelerator.unwrap_model(model)
            if has_lora(unwrapped):
                # The frozen base is rebuilt deterministically on resume; only the adapter is state.
                if self.accelerator.is_main_process:
                    save_adapter_checkpoint(unwrapped, output_dir)
                continue
            # A collective under FSDP / DeepSpeed ZeRO-3 (the full state dict is gathered), so every
            # process calls it; only the main process writes.
            state_dict = self.accelerator.get_state_dict(model)
            if self.accelerator.is_main_process:
                directory = os.path.join(output_dir, "unet")
                self.accelerator.unwrap_model(model).save_config(directory)
                save_file({key: value.contiguous() for key, value in state_dict.items()},
                          os.path.join(directory, "diffusion_pytorch_model.safetensors"))
        if self.accelerator.is_main_process and self.ema_model is not None:
            if self.ema_model.model_cls is None:  # LoRA: an EMA of the adapter parameters only
                save_parameter_ema(self.ema_model, os.path.join(output_dir, PARAMETER_EMA_DIR))
            else:
                self.ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
        # Accelerate must not also write its own copy of the weights.
        while weights:
            weights.pop()

    def load_model_hook(self, models, input_dir):
        if self.ema_model is not None and self.ema_model.model_cls is None:
            load_parameter_ema(self.ema_model, os.path.join(input_dir, PARAMETER_EMA_DIR))
            self.ema_model.to(self.accelerator.device)
        elif self.ema_model is not None:
            from diffusers.training_utils import EMAModel

            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), self.student_class)
            self.ema_model.load_state_dict(loaded.state_dict())
            self.ema_model.to(self.accelerator.device)
            del loaded
        from aria_utils.lora import has_lora, load_adapter_checkpoint

        while models:
            model = self.accelerator.unwrap_model(models.pop())
            if has_lora(model):
                load_adapter_checkpoint(model, input_dir)
                continue
            loaded = self.student_class.from_pretrained(input_dir, subfolder="unet")
            model.load_state_dict(loaded.state_dict())
            del loaded
