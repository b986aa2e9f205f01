"""Publishing to the Hugging Face Hub: early checks, and the one upload call.

The token is passed through, never printed, logged or saved (see `SECRET_ARGS` in the script).
"""

import os

# Never uploaded: resumable state, caches, the converted single-file teacher and per-process debugging files.
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".incomplete-*", ".incomplete-*/**", "latent_cache/**",
                          "process_states/**", "regions/embeddings.safetensors", "*.tmp",
                          "teacher_diffusers/**", "teacher_diffusers.incomplete/**"]


class HubError(RuntimeError):
    pass


def check_hub_access(token=None, api=None):
    """Fail before training when the Hub cannot be reached or the token is not valid."""
    from huggingface_hub import HfApi

    if hub_offline():
        raise HubError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; unset it, or drop "
                       "--push_to_hub and upload OUTPUT_DIR later with `hf upload`.")
    api = api or HfApi()
    try:
        return api.whoami(token=token)
    except Exception as error:  # network or auth: the message of either is what the user needs
        raise HubError(f"--push_to_hub: the Hub could not be reached or the token was refused "
                       f"({type(error).__name__}); check the network and --hub_token / `hf auth login`.") from None


def looks_like_local_path(name):
    """True when `name` cannot be a hub id (org/name), so it must exist on disk.

    `dir/name` where `dir` is a local folder is taken for a (misspelled) local path too: otherwise a
    typo costs a minute of network retries and ends in an error about huggingface.co.
    """
    if name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.sep in name.replace("/", "", 1):
        return True
    return os.path.isdir(name.split("/")[0])


def hub_offline():
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(getattr(constants, "HF_HUB_OFFLINE", False))


# What a diffusers Stable Diffusion pipeline folder of any family must hold for this toolkit (besides its denoiser,
# unet/ or transformer/).
PIPELINE_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "scheduler")


def pretrained_source_problem(name, flag, required_files=(), revision=None):
    """A message naming `flag` and the fix when `name` is neither a usable local folder nor a reachable hub id.

    `required_files` are paths inside the folder (e.g. "unet/config.json"); only configs are looked
    at, nothing is loaded. Offline, a hub id must be in the local cache.
    """
    if os.path.isdir(name):
        missing = [path for path in required_files if not os.path.exists(os.path.join(name, path))]
        if missing:
            return (f"{flag} {name!r} is a folder but lacks {', '.join(missing)}: pass a diffusers folder (as written "
                    "by save_pretrained) or its parent.")
        return None
    if os.path.exists(name):
        return f"{flag} {name!r} is a file, not a diffusers folder or hub id."
    if looks_like_local_path(name):
        return f"{flag} {name!r} does not exist (and is not a hub id of the form org/name)."
    if hub_offline():
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(name, revision=revision, local_files_only=True,
                              allow_patterns=[path for path in required_files] or ["*.json"])
        except Exception:  # not cached: the only thing the user needs to know
            return (f"{flag} {name!r} is not a local folder, and HF_HUB_OFFLINE is set while the Hub's copy is not "
                    "in the local cache: download it first, unset HF_HUB_OFFLINE, or pass a local folder.")
    return None


def default_repo_id(output_dir, hub_model_id=None):
    return hub_model_id or os.path.basename(os.path.normpath(output_dir))


def push_output_folder(api, output_dir, repo_id, token=None, private=None, commit_message="Upload distilled student"):
    """Create the repo (if needed) and upload OUTPUT_DIR without checkpoints and caches."""
    repo = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo.repo_id if hasattr(repo, "repo_id") else repo_id, folder_path=output_dir,
                             commit_message=commit_message, ignore_patterns=UPLOAD_IGNORE_PATTERNS, token=token)


class CheckpointPusher:
    """--hub_push_checkpoints: upload each checkpoint's student in the background, and account for it.

    Uploads run as huggingface_hub futures so training does not wait on the network; `finish()` waits
    for all of them at the end and returns the failures, so none is lost silently.
    """

    def __init__(self, api, repo_id, token=None):
        self.api, self.repo_id, self.token = api, repo_id, token
        self.pending = []

    def push(self, student_folder, path_in_repo, step):
        future = self.api.upload_folder(repo_id=self.repo_id, folder_path=student_folder, path_in_repo=path_in_repo,
                                        commit_message=f"Student at step {step}", token=self.token,
                                        run_as_future=True)
        self.pending.append((step, future))
        return future

    def finish(self):
        failures = []
        for step, future in self.pending:
            try:
                future.result()
            except Exception as error:  # reported to the user; the local checkpoint is unaffected
                failures.append(f"step {step}: {type(error).__name__}: {error}")
        self.pending = []
        return failures
