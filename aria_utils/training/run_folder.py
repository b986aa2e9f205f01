"""OUTPUT_DIR belongs to one run at a time, and only what this project wrote there is ever deleted.

- Ownership: a run marks its folder (`.aria-distill-run.json`). `--overwrite_output_dir` deletes an
  earlier run's outputs (the names in `RUN_OUTPUTS`, checkpoints, and TensorBoard event files under a
  logging folder inside OUTPUT_DIR) and nothing else: not a logging folder elsewhere, not a user's
  files. A folder holding a diffusers pipeline that this project did not write (the teacher, say) is
  never offered for overwrite. Folders written before the marker existed are recognised by their
  `training_args.json` or checkpoints.
- One run per folder: `OutputFolderLock` holds a POSIX record lock (`fcntl.lockf`) on
  `.aria-distill.lock`. The kernel releases it however the holder ends (kill -9 included), so a lock
  is never stale; on NFS the lock goes through the NFS lock manager (NLM for v3, the protocol itself
  for v4) and a crashed client's lock is freed when its lease expires. The file names the holder's
  host and PID for the message a second run gets.
"""

import errno
import json
import os
import re
import shutil
import socket
import time

from aria_utils.training.checkpointing import CHECKPOINT_PATTERN, TEMPORARY_PREFIX, complete_checkpoints
from aria_utils.files import apply_umask, apply_umask_tree, write_json_atomically

MARKER_FILE = ".aria-distill-run.json"
LOCK_FILE = ".aria-distill.lock"
# Where the run's console output goes once the launcher holding its stdout/stderr pipe is gone.
BROKEN_PIPE_LOG = "output-after-broken-pipe.log"
# What a finished (or checkpointed) run leaves in OUTPUT_DIR besides checkpoints; caches keyed by
# fingerprints (regions/, latent_cache/, teacher_diffusers/) are not a run's work and are kept.
RUN_OUTPUTS = ("model_index.json", "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
               "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "feature_extractor", "safety_checker", "pytorch_lora_weights.safetensors", "README.md",
               "training_args.json", "train_summary.json", "aria_regions.json", "aria_regions.png", "validation",
               "eval", "process_states", BROKEN_PIPE_LOG)
# What a diffusers pipeline folder holds: a folder with these that is not ours belongs to someone else.
PIPELINE_CONTENT = ("model_index.json", "unet", "transformer", "vae", "text_encoder", "scheduler")
TENSORBOARD_EVENTS = re.compile(r"^events\.out\.tfevents\.")


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def is_project_folder(output_dir):
    """True when this project has written runs into `output_dir` (the marker, or an older run's traces)."""
    if not os.path.isdir(output_dir):
        return False
    return (os.path.isfile(os.path.join(output_dir, MARKER_FILE))
            or os.path.isfile(os.path.join(output_dir, "training_args.json"))
            or bool(complete_checkpoints(output_dir))
            or any(name.startswith(TEMPORARY_PREFIX) for name in os.listdir(output_dir)))


def foreign_pipeline_content(output_dir):
    """Names of a diffusers pipeline in `output_dir` that this project did not write ([] when none or ours)."""
    if not os.path.isdir(output_dir) or is_project_folder(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if name in PIPELINE_CONTENT)


def previous_run_outputs(output_dir):
    """Names in `output_dir` that belong to an earlier run (checkpoints, a final pipeline, reports)."""
    if not os.path.isdir(output_dir) or not is_project_folder(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if CHECKPOINT_PATTERN.match(name) or name.startswith(TEMPORARY_PREFIX) or name in RUN_OUTPUTS)


def same_folder_problem(output_dir, inputs):
    """A message when OUTPUT_DIR is one of the run's inputs (`inputs`: {flag: path}), else None."""
    for flag, path in inputs.items():
        if path and os.path.isdir(path) and os.path.realpath(path) == os.path.realpath(output_dir):
            return (f"--output_dir {output_dir!r} is the folder of {flag}: the run would write its checkpoints and "
                    "pipeline into it. Choose another --output_dir.")
    return None


def remove_previous_run(output_dir, logging_dir=None):
    """--overwrite_output_dir: delete an earlier run's checkpoints, outputs and TensorBoard events; returns the names.

    A logging folder outside OUTPUT_DIR is never touched; inside it, only TensorBoard event files go (and
    the folders they leave empty), so anything else kept there stays.
    """
    names = previous_run_outputs(output_dir)
    for name in names:
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    logs = os.path.join(output_dir, logging_dir) if logging_dir else None
    if logs and os.path.isdir(logs) and _inside(logs, output_dir) and os.path.realpath(logs) != os.path.realpath(output_dir):
        removed_events = False
        for folder, _, files in os.walk(logs, topdown=False):
            for name in files:
                if TENSORBOARD_EVENTS.match(name):
                    os.remove(os.path.join(folder, name))
                    removed_events = True
            if folder != logs and not os.listdir(folder):
                os.rmdir(folder)
        if removed_events:
            names.append(f"{logging_dir} (TensorBoard events)")
    return names


def mark_as_project_folder(output_dir):
    path = os.path.join(output_dir, MARKER_FILE)
    if not os.path.isfile(path):
        write_json_atomically(path, {"written_by": "aria-distill train_aria_distill.py",
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def apply_umask_to_outputs(output_dir):
    """The umask's permissions for what the run wrote (safetensors writes 0600 files; others on the cluster
    must read them), and only that: a user's files and the folder itself keep their modes."""
    for name in RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            apply_umask_tree(path)
        elif os.path.isfile(path) and not os.path.islink(path):
            apply_umask(path)


class OutputFolderLock:
    """One run per OUTPUT_DIR. `acquire()` returns None, or a message naming the holder when it is taken."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.handle = None

    def acquire(self):
        import fcntl

        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                handle.close()
                if error.errno == errno.ENOLCK:  # e.g. NFS mounted with nolock: locking is impossible there
                    return None
                raise
            handle.seek(0)
            holder = self._describe(handle.read())
            handle.close()
            return (f"--output_dir {os.path.dirname(self.path)!r} is in use by another run ({holder}). Wait for it "
                    "to finish or stop it, or choose another --output_dir. (The lock is released whenever that "
                    "process ends, even if it is killed.)")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        handle.flush()
        apply_umask(self.path)
        self.handle = handle  # kept open: closing any descriptor of the file would release the lock
        return None

    @staticmethod
    def _describe(text):
        try:
            holder = json.loads(text)
            return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
        except (ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class OutputFolderClaim:
    """What `claim_output_dir` did: the lock held (main process) and what --overwrite_output_dir deleted."""

    def __init__(self, output_dir):
        self.lock = OutputFolderLock(output_dir)
        self.removed = []

    def release(self):
        self.lock.release()


def claim_output_dir(accelerator, output_dir, overwrite=False, logging_dir=None):
    """Create and lock OUTPUT_DIR (main process), then delete an earlier run's outputs with --overwrite_output_dir
    and mark the folder as this project's. Every process stops together when the folder is taken."""
    from aria_utils.cli import storage_problem
    from aria_utils.training.distillation_step import all_processes_agree

    problem, claim = None, OutputFolderClaim(output_dir)
    if accelerator.is_main_process:
        try:
            os.makedirs(output_dir, exist_ok=True)
            problem = claim.lock.acquire()
            if problem is None:
                if overwrite:
                    claim.removed = remove_previous_run(output_dir, logging_dir)
                mark_as_project_folder(output_dir)
        except OSError as error:
            problem = storage_problem(error, output_dir) or f"--output_dir {output_dir!r}: {error}"
    if not all_processes_agree(accelerator, problem is None):
        raise SystemExit(f"error: {problem or 'the main process could not claim --output_dir (its message says why).'}")
    return claim
