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
    from huggingface_hub import HfApi, constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or getattr(constants, "HF_HUB_OFFLINE", False):
        raise HubError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; unset it, or drop "
                       "--push_to_hub and upload OUTPUT_DIR later with `hf upload`.")
    api = api or HfApi()
    try:
        return api.whoami(token=token)
    except Exception as error:  # network or auth: the message of either is what the user needs
        raise HubError(f"--push_to_hub: the Hub could not be reached or the token was refused "
                       f"({type(error).__name__}); check the network and --hub_token / `hf auth login`.") from None


def looks_like_local_path(name):
    """True when `name` cannot be a hub id (org/name), so it must exist on disk."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.sep in name.replace("/", "", 1)


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
