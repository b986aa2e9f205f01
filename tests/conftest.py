"""Shared, session-scoped assets built offline: the tiny teacher, the demo corpus, teacher latents."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    from aria_utils.fixtures.demo_corpus import write_demo_corpus
    from aria_utils.generate_teacher_data import main as generate_teacher_data
    from aria_utils.fixtures.tiny_teacher import save_tiny_teacher

    root = tmp_path_factory.mktemp("assets")
    teacher = str(root / "tiny-teacher")
    save_tiny_teacher(teacher, seed=0)
    prompts = write_demo_corpus(str(root / "data"))
    teacher_data = str(root / "teacher-data")
    generate_teacher_data([
        "--pretrained_model_name_or_path", teacher, "--prompt_file", prompts, "--category_column", "category",
        "--num_prompts", "48", "--num_inference_steps", "2", "--batch_size", "8", "--shard_size", "16",
        "--output_dir", teacher_data,
    ])
    # One region cache for the session's training runs: the corpus is embedded once, each K clustered once.
    region_cache = str(root / "region-cache")
    return {"root": root, "teacher": teacher, "prompts": prompts, "teacher_data": teacher_data,
            "region_cache": region_cache}


def training_command(assets, output_dir, *extra, sampling="random", steps=6):
    """The training script's command on the session's assets; the region index comes from the session's cache
    unless `extra` names a `--region_cache_dir` (as a test of building the index does)."""
    region_cache = [] if "--region_cache_dir" in extra else ["--region_cache_dir", assets["region_cache"]]
    # The end-of-training timing costs seconds per run: only the tests of it ask for it.
    speed = [] if "--speed_report_repeats" in extra else ["--speed_report_repeats", "0"]
    return [
        sys.executable, os.path.join(REPO_ROOT, "train_aria_distill.py"),
        "--pretrained_model_name_or_path", assets["teacher"],
        "--train_data_dir", assets["teacher_data"],
        "--prompt_file", assets["prompts"],
        "--condition_sampling", sampling,
        "--student_config", "bk_small",
        "--train_batch_size", "4",
        "--max_train_steps", str(steps),
        "--learning_rate", "1e-3",
        "--report_to", "none",
        "--output_dir", str(output_dir),
        *region_cache,
        *speed,
        *extra,
    ]


def shared_region_index(assets, prompts, num_regions):
    """The folder of the session cache's index of `prompts` with `num_regions` regions (built on first use)."""
    from aria_utils.method.region_index import DEFAULT_EMBEDDING_MODEL, build_or_load_region_index, index_folder, \
        region_fingerprint

    build_or_load_region_index(prompts, assets["region_cache"], num_regions=num_regions, seed=0)
    return index_folder(assets["region_cache"], region_fingerprint(prompts, DEFAULT_EMBEDDING_MODEL, num_regions, 0))


TRAINING_SCRIPT = os.path.join(REPO_ROOT, "train_aria_distill.py")


def run(command, expect_success=True, env=None, timeout=600, in_process=None):
    """Run a command; the training script runs in this process (`run_training_in_process`) unless the test
    asks for a process (`in_process=False`) or for another environment. What a test checks there is the
    script's behaviour, not the launch; a Python start and its imports cost seconds per run."""
    if in_process is None:
        in_process = env is None and command[:2] == [sys.executable, TRAINING_SCRIPT]
    if in_process:
        result = run_training_in_process(command[2:])
    else:
        full_env = dict(os.environ, **(env or {}))
        full_env.setdefault("OMP_NUM_THREADS", "2")
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=full_env,
                                timeout=timeout)
    if expect_success and result.returncode != 0:
        raise AssertionError(f"Command failed ({result.returncode}): {' '.join(command)}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def run_training_in_process(argv):
    """train_aria_distill.py's `__main__` path (`run_cli` around `parse_args` and `main`) in this process.

    Returns what `subprocess.run` would: `returncode` (the exit status, 1 with the traceback in `stderr`
    for an exception that would have ended the process), `stdout`, and `stderr` (the script's log lines,
    progress bars and messages). Process-wide state the script sets is put back afterwards: Accelerate's
    singletons, signal handlers, the preemption flag, the thread count (a launched run gets 2 threads,
    as `run` gives its processes), the root logger's level and handlers.
    """
    import contextlib
    import io
    import logging
    import signal
    import traceback
    from types import SimpleNamespace

    import torch
    from accelerate.state import AcceleratorState, GradientState

    import train_aria_distill
    from aria_utils.training import preemption
    from aria_utils.cli import run_cli

    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s"))
    root = logging.getLogger()
    saved = {"level": root.level, "threads": torch.get_num_threads(), "cwd": os.getcwd(),
             "signals": {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}}
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    os.chdir(REPO_ROOT)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    returncode = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                run_cli(lambda given: train_aria_distill.main(train_aria_distill.parse_args(given)), list(argv))
            except SystemExit as exit_:
                if isinstance(exit_.code, str):
                    stderr.write(exit_.code + "\n")
                returncode = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:  # what a process would print before dying with status 1
                stderr.write(traceback.format_exc())
                returncode = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(saved["level"])
        torch.set_num_threads(saved["threads"])
        os.chdir(saved["cwd"])
        for signum, previous in saved["signals"].items():
            signal.signal(signum, previous)
        preemption._active_flag = None
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())
