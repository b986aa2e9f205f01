"""OUTPUT_DIR: only what a run wrote is deleted, one run holds a folder at a time, resume is explicit."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from aria_utils.training import run_folder
from aria_utils.training.checkpointing import (
    TrainingState,
    honoured_changes,
    resolve_resume_checkpoint,
    resume_mismatches,
)
from conftest import REPO_ROOT


def make_finished_run(folder):
    """A folder as a finished run leaves it, plus a user's own files next to and inside it."""
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "training_state.json").write_text('{"global_step": 2}')
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w")
    (folder / "README.md").write_text("card")
    (folder / run_folder.MARKER_FILE).write_text("{}")
    (folder / "logs" / "aria-distill").mkdir(parents=True)
    (folder / "logs" / "aria-distill" / "events.out.tfevents.1.host").write_bytes(b"e")
    (folder / "logs" / "keep_me.txt").write_text("mine")
    (folder / "notes.txt").write_text("mine")
    (folder / ".env").write_text("SECRET=1")
    os.chmod(folder / ".env", 0o600)


def test_overwrite_deletes_only_what_the_run_wrote(tmp_path):
    output = tmp_path / "run"
    make_finished_run(output)
    elsewhere = tmp_path / "shared-logs"  # another project's TensorBoard logs, given as --logging_dir ../shared-logs
    (elsewhere / "other-project").mkdir(parents=True)
    (elsewhere / "other-project" / "events.out.tfevents.9.host").write_bytes(b"theirs")
    (elsewhere / "keep_me.txt").write_text("theirs")

    assert run_folder.remove_previous_run(str(output), "../shared-logs") == ["README.md", "checkpoint-2", "unet"]
    assert (elsewhere / "other-project" / "events.out.tfevents.9.host").read_bytes() == b"theirs"
    assert (elsewhere / "keep_me.txt").exists()
    assert (output / "logs" / "aria-distill" / "events.out.tfevents.1.host").exists()  # not this call's logging dir

    removed = run_folder.remove_previous_run(str(output), "logs")
    assert removed == ["logs (TensorBoard events)"]
    assert sorted(os.listdir(output / "logs")) == ["keep_me.txt"]  # the events' folder went, the user's file stayed
    assert sorted(os.listdir(output)) == sorted([".env", run_folder.MARKER_FILE, "logs", "notes.txt"])
    assert run_folder.remove_previous_run(str(output), str(elsewhere)) == []  # an absolute path elsewhere: untouched
    assert (elsewhere / "other-project" / "events.out.tfevents.9.host").exists()


def test_permissions_fixed_only_on_the_run_outputs(tmp_path):
    output = tmp_path / "run"
    make_finished_run(output)
    os.chmod(output, 0o700)
    os.chmod(output / "unet" / "diffusion_pytorch_model.safetensors", 0o600)  # as safetensors writes it
    mask = os.umask(0)
    os.umask(mask)
    run_folder.apply_umask_to_outputs(str(output))
    assert os.stat(output / "unet" / "diffusion_pytorch_model.safetensors").st_mode & 0o777 == 0o666 & ~mask
    assert os.stat(output / ".env").st_mode & 0o777 == 0o600
    assert os.stat(output).st_mode & 0o777 == 0o700


def test_a_pipeline_this_project_did_not_write_is_foreign(tmp_path, assets):
    import shutil

    teacher_copy = tmp_path / "teacher-copy"
    shutil.copytree(assets["teacher"], teacher_copy)
    assert run_folder.foreign_pipeline_content(str(teacher_copy)) == ["model_index.json", "scheduler", "text_encoder",
                                                                     "unet", "vae"]
    assert run_folder.previous_run_outputs(str(teacher_copy)) == []  # so --overwrite_output_dir has nothing to delete
    finished = tmp_path / "finished"
    make_finished_run(finished)
    assert run_folder.foreign_pipeline_content(str(finished)) == []


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from aria_utils.training.run_folder import OutputFolderLock
lock = OutputFolderLock({folder!r})
assert lock.acquire() is None
print("locked", flush=True)
time.sleep(600)
"""


def test_one_run_per_folder_and_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(root=REPO_ROOT, folder=str(tmp_path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        problem = run_folder.OutputFolderLock(str(tmp_path)).acquire()
        assert problem is not None and "in use by another run" in problem and f"pid {holder.pid}" in problem
        assert os.uname().nodename in problem
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up of its own: the kernel releases the lock
        holder.wait()
    lock = run_folder.OutputFolderLock(str(tmp_path))
    assert lock.acquire() is None
    assert json.loads(open(tmp_path / run_folder.LOCK_FILE).read())["pid"] == os.getpid()
    lock.release()


def test_a_bare_checkpoint_name_is_looked_up_in_the_output_dir(tmp_path):
    checkpoint = tmp_path / "out" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text('{"global_step": 4}')
    assert resolve_resume_checkpoint(str(tmp_path / "out"), "checkpoint-4") == str(checkpoint)
    with pytest.raises(FileNotFoundError, match="checkpoint-5.*in --output_dir"):
        resolve_resume_checkpoint(str(tmp_path / "out"), "checkpoint-5")


def test_resume_refuses_what_defines_the_state_and_honours_the_rest():
    args = SimpleNamespace(student_config="bk_small", train_batch_size=4, gradient_accumulation_steps=1, seed=0,
                           learning_rate=1e-4, lambda_kd_feat=1.0, output_dir="out", resume_from_checkpoint="latest")
    state = {"args": dict(vars(args), train_batch_size=8, learning_rate=1e-3, resume_from_checkpoint=None),
             "run": {"num_processes": 8, "mixed_precision": "bf16", "corpus_sha256": "a"}}
    state, flags = TrainingState.from_json(state), vars(args)
    mismatches = resume_mismatches(state, flags, {"num_processes": 2, "mixed_precision": "bf16", "corpus_sha256": "b"})
    assert mismatches[0].startswith("--train_batch_size 8 in the checkpoint, 4 now")
    assert any(m.startswith("num processes 8 in the checkpoint, 2 now") for m in mismatches)
    assert any(m.startswith("corpus sha256 'a' in the checkpoint, 'b' now") for m in mismatches)
    assert len(mismatches) == 3
    assert honoured_changes(state.args, flags) == {"learning_rate": (1e-3, 1e-4)}
    # A fact not known yet (the corpus before it is read) is checked later, not taken for a change.
    assert resume_mismatches(state, flags, {"num_processes": 8, "mixed_precision": "bf16"}) == [
        "--train_batch_size 8 in the checkpoint, 4 now (it defines the data order and the batch of every step)"]


def test_every_flag_is_either_refused_or_honoured_on_resume_and_the_readme_says_which():
    import train_aria_distill
    from aria_utils.training.checkpointing import RESUME_NOT_A_CHANGE, RESUME_REFUSED, RESUME_REFUSED_FACTS

    flags = {action.dest for action in train_aria_distill.build_parser()._actions if action.dest != "help"}
    assert set(RESUME_REFUSED) <= flags and set(RESUME_NOT_A_CHANGE) <= flags
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    table = readme[readme.index("<!-- resume:start -->"): readme.index("<!-- resume:end -->")]
    for name in RESUME_REFUSED:
        assert f"`--{name}`" in table, name
    for fact in ("number of processes", "mixed precision", "condition corpus", "paired set"):
        assert fact in table, fact
    assert set(RESUME_REFUSED_FACTS) == {"num_processes", "mixed_precision", "corpus_sha256", "paired_set"}
    assert "`--learning_rate`" in table.split("honoured", 1)[1]


def test_interrupted_command_line_ends_without_a_traceback(capsys):
    from aria_utils.cli import run_cli

    def interrupted(argv):
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(interrupted, [])
        assert exit_info.value.code == 130
        assert "interrupted (Ctrl-C)" in capsys.readouterr().err
        # A second Ctrl-C while the first one unwinds ends the process at once, not with a traceback.
        assert signal.getsignal(signal.SIGINT).__name__ == "_second_interrupt_exits"
    finally:
        signal.signal(signal.SIGINT, previous)
    started = time.time()
    second = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {REPO_ROOT!r})\n"
        "from aria_utils.cli import run_cli\n"
        "def main(argv):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "    finally:\n"
        "        os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"  # a clean-up interrupted again
        "run_cli(main)\n")], capture_output=True, text=True, timeout=60)
    assert second.returncode == 130 and "Traceback" not in second.stderr, second.stderr
    assert "interrupted again" in second.stderr and time.time() - started < 30
