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
leaves a folder that `latest` would pick. `training_state.json` also records the size of every file
of the checkpoint, so a file damaged later (a full disk, a copy cut short) is found before resuming,
and `latest` falls back to the newest intact checkpoint.

This module also guards OUTPUT_DIR: a fresh run never silently replaces another run's work.
"""

import json
import logging
import os
import re
import shutil
import zipfile

from aria_utils.files import apply_umask_tree, write_json_atomically

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
TEMPORARY_PREFIX = ".incomplete-"
# What a finished (or checkpointed) run leaves in OUTPUT_DIR besides checkpoints; caches keyed by
# fingerprints (regions/, latent_cache/, teacher_diffusers/) are not a run's work and are kept.
RUN_OUTPUTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor",
               "safety_checker", "pytorch_lora_weights.safetensors", "README.md", "training_args.json",
               "train_summary.json", "aria_regions.json", "aria_regions.png", "validation", "eval", "process_states")


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


def read_training_state(path):
    with open(os.path.join(path, TRAINING_STATE_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def _safetensors_problem(path):
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if not 0 < header_length <= size - 8:
            return "its header is cut off"
        header = json.loads(handle.read(header_length))
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_length + data_end > size:
        return f"it is truncated ({size} bytes, its header promises {8 + header_length + data_end})"
    return None


def checkpoint_problem(path):
    """None when checkpoint `path` looks intact, else what is wrong with which file."""
    try:
        state = read_training_state(path)
    except FileNotFoundError:
        return f"{TRAINING_STATE_FILE} is missing (the checkpoint was never finished)"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"{TRAINING_STATE_FILE} is not valid JSON ({error})"
    for relative, size in state.get("files", {}).items():
        file_path = os.path.join(path, relative)
        if not os.path.isfile(file_path):
            return f"{relative} is missing"
        if os.path.getsize(file_path) != size:
            return f"{relative} has {os.path.getsize(file_path)} bytes, {size} were written"
    for folder, _, names in os.walk(path):  # checkpoints written before sizes were recorded: check the formats
        for name in names:
            file_path = os.path.join(folder, name)
            relative = os.path.relpath(file_path, path)
            try:
                if name.endswith(".safetensors"):
                    problem = _safetensors_problem(file_path)
                    if problem:
                        return f"{relative}: {problem}"
                elif name.endswith((".bin", ".pkl")) and not zipfile.is_zipfile(file_path):
                    return f"{relative} is not a complete torch file (truncated?)"
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
                return f"{relative} cannot be read ({type(error).__name__}: {error})"
    return None


def resolve_resume_checkpoint(output_dir, resume_from_checkpoint, warn=True):
    """Path to resume from, or None to start fresh ("latest" with no checkpoint yet).

    "latest" is the newest intact checkpoint: damaged newer ones are skipped with a warning. An
    explicit path must be intact.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        for step, path in reversed(complete_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if warn:
                logger.warning("Skipping damaged checkpoint %s (%s); trying the one before it.", path, problem)
        return None
    if not os.path.isdir(resume_from_checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist; pass a "
                                "checkpoint-<step> folder or 'latest'.")
    problem = checkpoint_problem(resume_from_checkpoint)
    if problem:
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} cannot be resumed: {problem}. "
                                "Pass an earlier checkpoint-<step> folder or 'latest' (the newest intact one).")
    return resume_from_checkpoint


# Arguments that decide the shapes of what a checkpoint holds: resuming with others cannot work.
STATE_DEFINING_ARGS = ("student_config", "student_model_name_or_path", "use_lora", "lora_rank",
                       "lora_target_modules", "use_ema", "aria_allocation")  # the tracker state belongs to its rule


def resume_mismatches(checkpoint_args, args):
    """["--flag X (checkpoint) vs Y (now)"] for the state-defining flags that differ."""
    return [f"--{name} {checkpoint_args[name]!r} in the checkpoint, {getattr(args, name)!r} now"
            for name in STATE_DEFINING_ARGS if name in checkpoint_args and checkpoint_args[name] != getattr(args, name)]


def previous_run_outputs(output_dir):
    """Names in `output_dir` that belong to an earlier run (checkpoints, a final pipeline, reports)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if CHECKPOINT_PATTERN.match(name) or name.startswith(TEMPORARY_PREFIX) or name in RUN_OUTPUTS)


def remove_previous_run(output_dir, logging_dir=None):
    """--overwrite_output_dir: delete an earlier run's checkpoints, outputs and logs (caches are kept)."""
    names = previous_run_outputs(output_dir)
    if logging_dir and os.path.isdir(os.path.join(output_dir, logging_dir)):
        names.append(logging_dir)
    for name in names:
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return names


def _file_sizes(folder):
    return {os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(folder) for name in names}


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
        # Written last: its presence marks the checkpoint complete, and it records every file's size.
        training_state = dict(training_state, files=_file_sizes(temporary_path))
        write_json_atomically(os.path.join(temporary_path, TRAINING_STATE_FILE), training_state)
        apply_umask_tree(temporary_path)
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


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored; the message names it and what to do."""


def load_checkpoint(accelerator, path):
    """Restore Accelerate's state (models via the load hook) and return training_state.json's content."""
    try:
        accelerator.load_state(path)
    except Exception as error:  # whatever the damage, the user needs the folder and the way out
        raise CheckpointError(f"Could not restore {path} ({type(error).__name__}: {error}). The checkpoint is damaged "
                              "or from another configuration: resume from an earlier checkpoint-<step> folder.") from None
    return read_training_state(path)


PARAMETER_EMA_DIR = "unet_lora_ema"


def save_parameter_ema(ema_model, directory):
    """An EMAModel over a parameter list (no model class): shadow tensors in safetensors, counters in JSON."""
    from aria_utils.files import save_safetensors_atomically

    os.makedirs(directory, exist_ok=True)
    state = ema_model.state_dict()
    shadow = state.pop("shadow_params")
    save_safetensors_atomically({f"shadow.{index}": tensor.detach() for index, tensor in enumerate(shadow)},
                                os.path.join(directory, "ema.safetensors"))
    write_json_atomically(os.path.join(directory, "ema_state.json"), state)


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
