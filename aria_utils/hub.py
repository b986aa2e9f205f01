"""Publishing to the Hugging Face Hub: early checks, and the one upload call.

The token is passed through, never printed, logged or saved (see `SECRET_ARGS` in the script).
"""

import os

# Never uploaded: resumable state, caches and per-process debugging files.
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".incomplete-*", ".incomplete-*/**", "latent_cache/**",
                          "process_states/**", "regions/embeddings.safetensors", "*.tmp"]


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


def default_repo_id(output_dir, hub_model_id=None):
    return hub_model_id or os.path.basename(os.path.normpath(output_dir))


def push_output_folder(api, output_dir, repo_id, token=None, private=None, commit_message="Upload distilled student",
                       run_as_future=False):
    """Create the repo (if needed) and upload OUTPUT_DIR without checkpoints and caches."""
    repo = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo.repo_id if hasattr(repo, "repo_id") else repo_id, folder_path=output_dir,
                             commit_message=commit_message, ignore_patterns=UPLOAD_IGNORE_PATTERNS, token=token,
                             run_as_future=run_as_future)
