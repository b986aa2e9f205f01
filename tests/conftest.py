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
    from aria_utils.demo_corpus import write_demo_corpus
    from aria_utils.generate_teacher_data import main as generate_teacher_data
    from aria_utils.tiny_teacher import save_tiny_teacher

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
    return {"root": root, "teacher": teacher, "prompts": prompts, "teacher_data": teacher_data}


def training_command(assets, output_dir, *extra, sampling="random", steps=6):
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
        *extra,
    ]


def run(command, expect_success=True, env=None, timeout=600):
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "2")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=full_env, timeout=timeout)
    if expect_success and result.returncode != 0:
        raise AssertionError(f"Command failed ({result.returncode}): {' '.join(command)}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result
