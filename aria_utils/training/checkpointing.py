"""Resumable checkpoints: atomic, rotated, and restoring everything a step depends on.

A checkpoint folder `checkpoint-<step>` holds
- Accelerate's `save_state` output (optimizer, lr scheduler, grad scaler, RNG), written by every
  process so DeepSpeed/FSDP shards are saved too; Accelerate reads it back with torch's
  `weights_only` loader;
- `unet/` or `transformer/` (and `unet_ema/` / `transformer_ema/`, or `unet_lora/` and `unet_lora_ema/` for LoRA): the
  student in safetensors, written by the
  save hook below instead of Accelerate's generic model file, so a checkpoint's student can be loaded
  on its own with `UNet2DConditionModel.from_pretrained`;
- `training_state.json`: step, tracker and the rest of this project's state, written last.

It is written under a temporary name and renamed when complete, so a run killed mid-write never
leaves a folder that `latest` would pick. `training_state.json` also records the size of every file
of the checkpoint, so a file damaged later (a full disk, a copy cut short) is found before resuming,
and `latest` falls back to the newest intact checkpoint.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field

from aria_utils.cli import UserInputError
from aria_utils.files import apply_umask_tree, read_safetensors_header, write_json_atomically

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


@dataclass
class TrainingState:
    """What `training_state.json` holds: where the run stands, what it ran with, and the checkpoint's files.

    Written by `save_checkpoint` (last, so its presence marks the checkpoint complete) and read back by
    `read_training_state`; fields a checkpoint of an older version lacks take their defaults.
    """

    global_step: int = 0
    nonfinite_skipped: int = 0  # updates skipped after a non-finite loss
    tracker: dict = None  # RegionTracker.state_dict()
    region_history: list = field(default_factory=list)  # [(step, estimates, probabilities)] for the heat map
    args: dict = field(default_factory=dict)  # the flags (secrets left out)
    run: dict = field(default_factory=dict)  # RESUME_REFUSED_FACTS of the run
    resume_history: list = field(default_factory=list)  # [{"step", "changed": {flag: [before, after]}}]
    region_fingerprint: dict = None  # what the tracked regions were built from
    files: dict = field(default_factory=dict)  # relative path -> size, of every file the checkpoint holds

    @classmethod
    def from_json(cls, content):
        known = {name: content[name] for name in cls.__dataclass_fields__ if content.get(name) is not None}
        return cls(**known)

    def to_json(self):
        return asdict(self)


def read_training_state(path):
    """The TrainingState of checkpoint `path`."""
    with open(os.path.join(path, TRAINING_STATE_FILE), encoding="utf-8") as handle:
        content = json.load(handle)
    if not isinstance(content, dict):
        raise json.JSONDecodeError(f"{TRAINING_STATE_FILE} holds no JSON object", "", 0)
    return TrainingState.from_json(content)


def _safetensors_problem(path):
    try:
        header, data_start, size = read_safetensors_header(path)
    except json.JSONDecodeError:
        raise  # reported by the caller with the file's name and the decoder's words
    except ValueError as error:
        return str(error)
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if data_start + data_end > size:
        return f"it is truncated ({size} bytes, its header promises {data_start + data_end})"
    return None


def checkpoint_problem(path):
    """None when checkpoint `path` looks intact, else what is wrong with which file."""
    try:
        state = read_training_state(path)
    except FileNotFoundError:
        return f"{TRAINING_STATE_FILE} is missing (the checkpoint was never finished)"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"{TRAINING_STATE_FILE} is not valid JSON ({error})"
    for relative, size in state.files.items():
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
    if not os.path.isdir(resume_from_checkpoint) and os.path.isdir(os.path.join(output_dir, resume_from_checkpoint)):
        resume_from_checkpoint = os.path.join(output_dir, resume_from_checkpoint)  # a bare name: in OUTPUT_DIR
    if not os.path.isdir(resume_from_checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist (in the working "
                                f"folder or in --output_dir {output_dir!r}); pass a checkpoint-<step> folder or "
                                "'latest'.")
    problem = checkpoint_problem(resume_from_checkpoint)
    if problem:
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} cannot be resumed: {problem}. "
                                "Pass an earlier checkpoint-<step> folder or 'latest' (the newest intact one).")
    return resume_from_checkpoint


# What resuming with another value of a flag would mean. Refused: the checkpoint's state has another
# shape or meaning (student, optimizer, EMA, tracker), or the data a step sees follows from the flag, so
# the run would be recorded as one value and trained with another. Every other flag is honoured from the
# resuming command (`apply_resumed_flags` re-applies those the restored state would otherwise override).
RESUME_REFUSED = {
    "student_config": "the student's architecture", "student_model_name_or_path": "the student's architecture",
    "use_lora": "what is trained", "lora_rank": "the adapter's shape", "lora_target_modules": "the adapter's shape",
    "use_ema": "the EMA state", "use_8bit_adam": "the optimizer state's format",
    "condition_sampling": "the tracker state", "track_regions": "the tracker state",
    "aria_allocation": "the tracker state", "aria_normalize_timesteps": "the tracker's timestep buckets",
    "aria_timestep_buckets": "the tracker's timestep buckets",
    "train_batch_size": "the data order and the batch of every step",
    "gradient_accumulation_steps": "the data order and the batch of every step",
    "seed": "the data order, noise and conditions of every step",
    "max_train_samples": "the data order",
}
# Facts of the run rather than flags, refused for the same reasons; recorded in training_state.json.
RESUME_REFUSED_FACTS = {
    "num_processes": "the data order and the batch of every step",
    "mixed_precision": "the gradient scaler state (fp16) and the weights' precision",
    "corpus_sha256": "the prompts random conditions are drawn from (the condition corpus)",
    "paired_set": "the paired latents and their order (--train_data_dir / --dataset_name)",
}
# Flags that only name where things are or what to do next: never reported as a change.
RESUME_NOT_A_CHANGE = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir", "train_data_dir", "prompt_file",
                       "logging_dir", "cache_dir", "region_cache_dir", "push_to_hub", "hub_model_id", "hub_private",
                       "hub_push_checkpoints", "debug_process_states", "report_to")


def resume_mismatches(checkpoint_state, flags, run_facts, region_fingerprint=None):
    """Every reason checkpoint state `checkpoint_state` (a TrainingState) does not fit this run, each
    naming both values: ["--flag X in the checkpoint, Y now (it defines ...)", ...].

    `flags` are this run's flag values ({name: value}); `run_facts` its values of RESUME_REFUSED_FACTS
    (those not known yet may be left out: checked again once they are); `region_fingerprint` what this
    run's region index is built from (`region_index.region_fingerprint`), when it tracks regions.
    """
    from aria_utils.method.region_index import fingerprint_differences

    checkpoint_args, recorded = checkpoint_state.args, checkpoint_state.run
    mismatches = [f"--{name} {checkpoint_args[name]!r} in the checkpoint, {flags[name]!r} now (it defines "
                  f"{reason})" for name, reason in RESUME_REFUSED.items()
                  if name in checkpoint_args and name in flags and checkpoint_args[name] != flags[name]]
    mismatches += [f"{name.replace('_', ' ')} {recorded[name]!r} in the checkpoint, {run_facts[name]!r} now (it "
                   f"defines {reason})" for name, reason in RESUME_REFUSED_FACTS.items()
                   if name in recorded and name in run_facts and recorded[name] != run_facts[name]]
    if region_fingerprint is not None and checkpoint_state.region_fingerprint:
        # The tracker's estimates belong to the regions it was trained with: the same K is not enough.
        changed = fingerprint_differences(checkpoint_state.region_fingerprint, region_fingerprint)
        if changed:
            mismatches.append(f"it tracked other regions: the region index's {' and '.join(changed)} changed since (resume "
                              "with the same corpus, --region_embedding_model, --num_regions and --region_seed)")
    return mismatches


def honoured_changes(checkpoint_args, flags):
    """{flag: (checkpoint value, new value)} of the flags that changed and are honoured from now on."""
    return {name: (checkpoint_args[name], value) for name, value in flags.items()
            if name in checkpoint_args and checkpoint_args[name] != value and name not in RESUME_REFUSED
            and name not in RESUME_NOT_A_CHANGE}


def apply_resumed_flags(optimizer, lr_scheduler, ema_model, learning_rate, betas, weight_decay, epsilon, ema_decay):
    """After restoring a checkpoint, make the optimizer, lr schedule and EMA follow this run's flags.

    Restoring puts back the hyperparameters the checkpoint was written with (the optimizer's param
    groups, the schedule's base rates, the EMA's decay); with unchanged flags this changes nothing.
    The schedules here are LambdaLR (diffusers' `get_scheduler`), so the current rate is the new base
    rate times the schedule's factor at the restored step.
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # Accelerate wraps it
    for group in optimizer.param_groups:
        group.update(initial_lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=epsilon)
    scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
    factors = [factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors):
        group["lr"] = learning_rate * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if ema_model is not None:
        ema_model.decay = ema_decay


def _file_sizes(folder):
    return {os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(folder) for name in names}


def checkpoint_bytes(path):
    """Bytes of a complete checkpoint (from the sizes it recorded)."""
    try:
        return sum(read_training_state(path).files.values())
    except (OSError, ValueError):
        return 0


def state_bytes(accelerator):
    """Bytes of the models' parameters and the optimizers' state tensors: what a first checkpoint takes, roughly
    (read in place: no state dict is built, which would copy or, under FSDP, gather the weights)."""
    import torch

    total = 0
    for model in accelerator._models:
        total += sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    for optimizer in accelerator._optimizers:
        for state in optimizer.state.values():
            total += sum(value.numel() * value.element_size() for value in state.values() if torch.is_tensor(value))
    return total


def make_room(output_dir, total_limit, needed_bytes):
    """With --checkpoints_total_limit, delete the checkpoints the new one will push out *before* writing it
    when the disk lacks room for it, but never the newest intact one: if the write then fails, that one
    is still there to resume from. (With a limit of 1 nothing can go early: the folder needs room for two.)"""
    if total_limit is None:
        return
    checkpoints = complete_checkpoints(output_dir)
    leaving = checkpoints[: max(0, min(len(checkpoints) + 1 - total_limit, len(checkpoints) - 1))]
    for _, path in leaving:
        if shutil.disk_usage(output_dir).free >= needed_bytes * 1.05:
            return
        logger.warning("Removing %s before writing the next checkpoint: the disk has room for no more, and "
                       "--checkpoints_total_limit %d would remove it after.", path, total_limit)
        shutil.rmtree(path)


def save_checkpoint(accelerator, output_dir, step, training_state, total_limit=None):
    """Write checkpoint-<step> atomically on all processes; prune to `total_limit` afterwards.

    A write that fails (a full disk, a read-only folder) leaves nothing behind and raises
    CheckpointError naming the folder, the free space and the size needed; the checkpoints written
    before stay as they were.
    """
    from aria_utils.training.distillation_step import all_processes_agree

    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    temporary_path = os.path.join(output_dir, f"{TEMPORARY_PREFIX}checkpoint-{step}")
    previous = complete_checkpoints(output_dir)
    needed = checkpoint_bytes(previous[-1][1]) if previous else state_bytes(accelerator)
    failure = None
    if accelerator.is_main_process:
        try:
            remove_leftovers(output_dir)  # of a run killed while writing
            make_room(output_dir, total_limit, needed)
        except OSError as error:
            failure = error
    accelerator.wait_for_everyone()
    if failure is None:
        try:
            accelerator.save_state(temporary_path)  # every process: DeepSpeed/FSDP shards need all of them
        except (OSError, RuntimeError) as error:  # torch's zip writer reports a full disk as a RuntimeError
            failure = error
    if all_processes_agree(accelerator, failure is None) and accelerator.is_main_process:
        try:
            # Written last: its presence marks the checkpoint complete, and it records every file's size.
            training_state = dataclasses.replace(training_state, files=_file_sizes(temporary_path))
            write_json_atomically(os.path.join(temporary_path, TRAINING_STATE_FILE), training_state.to_json())
            apply_umask_tree(temporary_path)
            replaced = None
            if os.path.exists(final_path):  # same step written again after a resume from an older checkpoint
                replaced = os.path.join(output_dir, f"{TEMPORARY_PREFIX}replaced-checkpoint-{step}")
                os.replace(final_path, replaced)
            os.replace(temporary_path, final_path)
            if replaced:
                shutil.rmtree(replaced)
            prune_checkpoints(output_dir, total_limit)
            logger.info("Saved checkpoint %s", final_path)
        except OSError as error:
            failure = error
    if not all_processes_agree(accelerator, failure is None):
        if accelerator.is_main_process:
            shutil.rmtree(temporary_path, ignore_errors=True)
        raise CheckpointError(_write_failure_message(output_dir, step, failure, needed, previous))
    return final_path


def _write_failure_message(output_dir, step, failure, needed_bytes, previous):
    from aria_utils.cli import DISK_FULL_ERRNOS, NOT_WRITABLE_ERRNOS, free_space_text

    free = shutil.disk_usage(output_dir).free if os.path.isdir(output_dir) else 0
    code = getattr(failure, "errno", None)
    if code in DISK_FULL_ERRNOS or (failure is not None and free < needed_bytes * 1.05):
        reason = "the disk is full"
    elif code in NOT_WRITABLE_ERRNOS:
        reason = f"the folder cannot be written ({os.strerror(code).lower()})"
    elif failure is None:
        reason = "another process failed to write its part (its message says why)"
    else:
        reason = f"{type(failure).__name__}: {failure}"
    intact = (f"{os.path.basename(previous[-1][1])} is intact" if previous else "no earlier checkpoint exists")
    return (f"could not write checkpoint-{step} in {output_dir}: {reason} ({free_space_text(output_dir)}, a "
            f"checkpoint takes about {needed_bytes / 1024 ** 3:.2f} GiB). Nothing of it was kept and {intact}. Free space (or choose a "
            "folder on a larger disk), then resume with --resume_from_checkpoint latest.")


def remove_leftovers(output_dir):
    """Half-written checkpoints of runs killed while writing: never resumable, only taking space."""
    for name in os.listdir(output_dir):
        if name.startswith(TEMPORARY_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def prune_checkpoints(output_dir, total_limit):
    """Keep the newest `total_limit` complete checkpoints; also drop leftovers of interrupted writes."""
    remove_leftovers(output_dir)
    if total_limit is None:
        return
    checkpoints = complete_checkpoints(output_dir)
    for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        logger.info("Removing old checkpoint %s (--checkpoints_total_limit %d)", path, total_limit)
        shutil.rmtree(path)


class CheckpointError(UserInputError):
    """A checkpoint could not be restored; the message names it and what to do."""


def load_checkpoint(accelerator, path):
    """Restore Accelerate's state: models (via the load hook), optimizer, schedule, EMA and RNG states. The
    project's own state is the checkpoint's TrainingState, read at start-up (`read_training_state`)."""
    try:
        accelerator.load_state(path)
    except Exception as error:  # whatever the damage, the user needs the folder and the way out
        raise CheckpointError(f"Could not restore {path} ({type(error).__name__}: {error}). The checkpoint is damaged "
                              "or from another configuration: resume from an earlier checkpoint-<step> folder.") from None


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

    def __init__(self, accelerator, student_class, ema_model=None, student_folder="unet"):
        self.accelerator = accelerator
        self.student_class = student_class
        self.ema_model = ema_model
        self.student_folder = student_folder  # the family's denoiser folder: unet/ or transformer/
        self.ema_folder = f"{student_folder}_ema"

    def register(self):
        self.accelerator.register_save_state_pre_hook(self.save_model_hook)
        self.accelerator.register_load_state_pre_hook(self.load_model_hook)

    def save_model_hook(self, models, weights, output_dir):
        from safetensors.torch import save_file

        from aria_utils.training.feature_projectors import FeatureProjectors, save_feature_projectors
        from aria_utils.training.lora import has_lora, save_adapter_checkpoint

        for model in models:
            unwrapped = self.accelerator.unwrap_model(model)
            if isinstance(unwrapped, FeatureProjectors):  # trained with a channel-reduced student
                if self.accelerator.is_main_process:
                    save_feature_projectors(unwrapped, output_dir)
                continue
            if has_lora(unwrapped):
                # The frozen base is rebuilt deterministically on resume; only the adapter is state.
                if self.accelerator.is_main_process:
                    save_adapter_checkpoint(unwrapped, output_dir)
                continue
            # A collective under FSDP / DeepSpeed ZeRO-3 (the full state dict is gathered), so every
            # process calls it; only the main process writes.
            state_dict = self.accelerator.get_state_dict(model)
            if self.accelerator.is_main_process:
                directory = os.path.join(output_dir, self.student_folder)
                self.accelerator.unwrap_model(model).save_config(directory)
                save_file({key: value.contiguous() for key, value in state_dict.items()},
                          os.path.join(directory, "diffusion_pytorch_model.safetensors"))
        if self.accelerator.is_main_process and self.ema_model is not None:
            if self.ema_model.model_cls is None:  # LoRA: an EMA of the adapter parameters only
                save_parameter_ema(self.ema_model, os.path.join(output_dir, PARAMETER_EMA_DIR))
            else:
                self.ema_model.save_pretrained(os.path.join(output_dir, self.ema_folder))
        # Accelerate must not also write its own copy of the weights.
        while weights:
            weights.pop()

    def load_model_hook(self, models, input_dir):
        if self.ema_model is not None and self.ema_model.model_cls is None:
            load_parameter_ema(self.ema_model, os.path.join(input_dir, PARAMETER_EMA_DIR))
            self.ema_model.to(self.accelerator.device)
        elif self.ema_model is not None:
            from diffusers.training_utils import EMAModel

            loaded = EMAModel.from_pretrained(os.path.join(input_dir, self.ema_folder), self.student_class)
            self.ema_model.load_state_dict(loaded.state_dict())
            self.ema_model.to(self.accelerator.device)
            del loaded
        from aria_utils.training.feature_projectors import FeatureProjectors, load_feature_projectors
        from aria_utils.training.lora import has_lora, load_adapter_checkpoint

        while models:
            model = self.accelerator.unwrap_model(models.pop())
            if isinstance(model, FeatureProjectors):
                load_feature_projectors(model, input_dir)
                continue
            if has_lora(model):
                load_adapter_checkpoint(model, input_dir)
                continue
            loaded = self.student_class.from_pretrained(input_dir, subfolder=self.student_folder)
            model.load_state_dict(loaded.state_dict())
            del loaded
