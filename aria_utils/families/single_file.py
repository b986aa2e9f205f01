"""Community checkpoints distributed as one `.safetensors` file (the original Stable Diffusion layout).

The file is converted once with the `from_single_file` of its family's diffusers pipeline (the family
recognised from the file's tensor names, `families.family_of_single_file`) into a diffusers folder
inside the run's output directory. Everything after that (training, resume, the
final pipeline, evaluation) reads the folder exactly as it would read a hub id, so there is one
loading path. The conversion is reused while the source file is unchanged.
"""

import json
import os
import shutil

from aria_utils.files import apply_umask_tree
from aria_utils.publishing.hub import hub_offline, looks_like_local_path

SAFE_SUFFIXES = (".safetensors",)
# Pickle-based formats: loading them can run arbitrary code, so this project refuses them.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONVERTED_FOLDER = "teacher_diffusers"
SOURCE_RECORD = "aria_single_file_source.json"


def is_single_file(name):
    return str(name).lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)


def is_url(name):
    return str(name).startswith(("https://", "http://"))


def single_file_problem(path, config=None, original_config=None, revision=None, variant=None):
    """A message naming the flag and the fix, or None when the single-file arguments are usable."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        return (f"--pretrained_model_name_or_path {path!r} is a pickle checkpoint; this toolkit never loads pickle "
                "files (they can run code). Convert it once to .safetensors (e.g. load it in a trusted session and "
                "save with safetensors.torch.save_file) and pass the .safetensors file.")
    if not is_url(path) and not os.path.isfile(path):
        return f"--pretrained_model_name_or_path {path!r} does not exist."
    if variant is not None:
        return "--variant selects weight files in a diffusers folder; a single-file checkpoint has one set of weights."
    if revision is not None and not is_url(path):
        return "--revision applies to hub checkpoints; drop it for a local single-file checkpoint."
    if config is not None and original_config is not None:
        return "Give --single_file_config or --original_config, not both (diffusers uses one of them)."
    if config is not None and not os.path.isdir(config) and looks_like_local_path(config):
        return f"--single_file_config {config!r} is neither a local diffusers folder nor a hub id of the form org/name."
    if original_config is not None and not is_url(original_config) and not os.path.isfile(original_config):
        return f"--original_config {original_config!r} does not exist (expected the LDM .yaml, e.g. v1-inference.yaml)."
    if hub_offline() and config is None:
        return ("Offline (HF_HUB_OFFLINE=1), diffusers cannot fetch the component configs of a single-file checkpoint. "
                "Pass --single_file_config with a local diffusers folder of the same architecture (its config files "
                "and tokenizer are enough, e.g. a copy of stable-diffusion-v1-5 without weights).")
    return None


def _source_record(path, config, original_config):
    record = {"source": path if is_url(path) else os.path.abspath(path), "config": config,
              "original_config": original_config}
    if not is_url(path):
        stat = os.stat(path)
        record.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return record


def converted_teacher_dir(output_dir):
    return os.path.join(output_dir, CONVERTED_FOLDER)


def convert_single_file_teacher(path, output_dir, config=None, original_config=None, cache_dir=None, revision=None):
    """Convert `path` into OUTPUT_DIR/teacher_diffusers (once) and return that folder.

    Written under a temporary name and renamed, so an interrupted conversion is never mistaken for a
    finished one.
    """
    target = converted_teacher_dir(output_dir)
    record = _source_record(path, config, original_config)
    record_path = os.path.join(target, SOURCE_RECORD)
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as handle:
            if json.load(handle) == record:
                return target
    from aria_utils.families import family_of_single_file

    cls, extra = family_of_single_file(path, config).pipeline_class()
    pipeline = cls.from_single_file(path, config=config, original_config=original_config, cache_dir=cache_dir,
                                    revision=revision, **extra)
    partial = target + ".incomplete"
    shutil.rmtree(partial, ignore_errors=True)
    pipeline.save_pretrained(partial, safe_serialization=True)
    apply_umask_tree(partial)
    with open(os.path.join(partial, SOURCE_RECORD), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target
