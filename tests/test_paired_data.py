"""The sharded paired-data path: generation across processes and interruptions, verification and repair,
reading only a batch's rows."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from aria_utils.data.paired_data import (
    LATENTS_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    PairedDataError,
    load_paired_latents,
    save_paired_latents,
)
from aria_utils.data.prompts import TextTable
from conftest import REPO_ROOT, run


def read_set(path):
    """(latents, caption rows) of a finished paired set, for bit-for-bit comparisons."""
    paired = load_paired_latents(str(path))
    rows = []
    manifest = json.load(open(os.path.join(path, MANIFEST_FILE)))
    for shard in manifest["shards"]:
        rows += [json.loads(line) for line in open(os.path.join(path, shard["captions"]))]
    return paired.latents(np.arange(len(paired))), rows


# ------------------------------------------------------------------------------------------ reading
def test_batch_reads_return_the_written_rows(tmp_path):
    latents = torch.randn(10, 4, 3, 3)
    captions = [f"caption {i}" for i in range(10)]
    save_paired_latents(str(tmp_path / "set"), latents, captions, shard_size=4)
    paired = load_paired_latents(str(tmp_path / "set"))
    assert len(paired) == 10 and paired.latent_shape == (4, 3, 3)
    assert len(os.listdir(tmp_path / "set" / "shards")) == 9  # 3 shards x (latents, captions, their checksums)
    picked = np.array([9, 0, 5, 4, 3])  # across all three shards, out of order
    assert torch.equal(paired.latents(picked), latents[picked].half().float())  # fp16 on disk, fp32 out
    assert paired.captions.take(picked) == [captions[i] for i in picked]
    first = load_paired_latents(str(tmp_path / "set"), max_samples=6)  # --max_train_samples
    assert len(first) == 6 and list(first.captions) == captions[:6]
    with pytest.raises(IndexError):
        first.latents([6])


def test_single_file_sets_of_earlier_versions_still_load(tmp_path):
    from safetensors.torch import save_file

    latents = torch.randn(5, 4, 2, 2).half()
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({"latents": latents}, str(folder / LATENTS_FILE))
    (folder / METADATA_FILE).write_text("".join(json.dumps({"index": i, "caption": f"c{i}"}) + "\n" for i in range(5)))
    paired = load_paired_latents(str(folder))
    assert torch.equal(paired.latents(np.arange(5)), latents.float()) and paired.captions[4] == "c4"


def test_truncated_shard_names_the_file(tmp_path):
    save_paired_latents(str(tmp_path / "set"), torch.randn(4, 4, 8, 8), ["a", "b", "c", "d"], shard_size=2)
    shard = tmp_path / "set" / "shards" / "shard-00001.safetensors"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-100])
    # Opening compares each file with the size recorded when it was written (no data read).
    with pytest.raises(PairedDataError, match="shard-00001.safetensors has .* bytes, .* were written.*redoes damaged"):
        load_paired_latents(str(tmp_path / "set"))
    # Cut short after the set was opened (while training runs): an error naming the file, not a SIGBUS.
    shard.write_bytes(intact)
    paired = load_paired_latents(str(tmp_path / "set"))
    shard.write_bytes(intact[:-100])
    with pytest.raises(PairedDataError, match="shard-00001.safetensors became shorter"):
        paired.latents([3])
    assert paired.latents([0, 1]).shape == (2, 4, 8, 8)  # the other shard still reads


def test_damaged_latents_are_named_by_shard_and_index(tmp_path):
    latents = torch.randn(6, 4, 2, 2)
    save_paired_latents(str(tmp_path / "set"), latents, list("abcdef"), shard_size=3)
    paired = load_paired_latents(str(tmp_path / "set"))
    shard = tmp_path / "set" / "shards" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    row_bytes = 4 * 2 * 2 * 2
    data[header + row_bytes: header + 2 * row_bytes] = bytes(row_bytes)  # latent 1 of shard 1 (set index 4) zeroed
    shard.write_bytes(bytes(data))  # same size: only the checksum or the values can tell
    with pytest.raises(PairedDataError, match=r"latent 1 of shards/shard-00001.safetensors is all zeros"):
        paired.latents([0, 4])
    data[header: header + 2] = b"\x00\x7e"  # float16 NaN in latent 0 of shard 1
    shard.write_bytes(bytes(data))
    with pytest.raises(PairedDataError, match=r"latent 0 of shards/shard-00001.safetensors is not finite"):
        paired.latents([3])
    manifest = json.load(open(tmp_path / "set" / MANIFEST_FILE))
    from aria_utils.data.paired_data import verify_shard

    assert verify_shard(str(tmp_path / "set"), manifest, 0) is None
    assert "does not match the checksum" in verify_shard(str(tmp_path / "set"), manifest, 1)


def test_a_manifest_whose_counts_do_not_add_up_is_refused(tmp_path):
    from aria_utils.data.paired_data import check_paired_set_is_finished

    save_paired_latents(str(tmp_path / "set"), torch.randn(4, 4, 2, 2), list("abcd"), shard_size=2)
    manifest_path = tmp_path / "set" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, num_latents=40)))
    with pytest.raises(PairedDataError, match="says 40 latents in shards of 2, but its 2 shards hold 4"):
        check_paired_set_is_finished(str(tmp_path / "set"))


def test_files_are_readable_per_the_umask(tmp_path):
    save_paired_latents(str(tmp_path / "set"), torch.randn(2, 4, 2, 2), ["a", "b"])
    mask = os.umask(0)
    os.umask(mask)
    shard = tmp_path / "set" / "shards" / "shard-00000.safetensors"
    assert os.stat(shard).st_mode & 0o777 == 0o666 & ~mask  # safetensors alone would give 0600


def test_text_table_lookup_and_selection():
    table = TextTable.from_strings(["a cat", "ünïcode", "", "a dog", "a cat"])
    assert list(table.find(["a dog", "missing", "a cat", ""])) == [3, -1, 0, 2]
    assert list(table.select([3, 1])) == ["a dog", "ünïcode"]
    assert table[1:3] == ["ünïcode", ""] and len(table) == 5


# ------------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def generation(assets, tmp_path_factory):
    """One uninterrupted 1-process set, one 2-process set, one killed with SIGKILL and re-run."""
    root = tmp_path_factory.mktemp("generation")
    common = ["--pretrained_model_name_or_path", assets["teacher"], "--prompt_file", assets["prompts"],
              "--category_column", "category", "--num_prompts", "36", "--num_inference_steps", "8",
              "--batch_size", "2", "--shard_size", "4", "--seed", "3"]
    module = [sys.executable, "-m", "aria_utils.generate_teacher_data"]
    single_thread = {"OMP_NUM_THREADS": "1"}  # CPU float results depend on the thread count; keep it equal
    run(module + common + ["--output_dir", str(root / "straight")], env=single_thread)

    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "-m", "aria_utils.generate_teacher_data",
         *common, "--output_dir", str(root / "two_processes")], env={"ACCELERATE_USE_CPU": "1"})

    killed = root / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(module + common + ["--output_dir", str(killed)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        shards = killed / "shards"
        if shards.is_dir() and len([n for n in os.listdir(shards) if n.endswith(".safetensors")]) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    manifest_at_kill = json.load(open(killed / MANIFEST_FILE))
    resumed = run(module + common + ["--output_dir", str(killed)], env=single_thread)
    return {"root": root, "common": common, "module": module, "manifest_at_kill": manifest_at_kill,
            "resumed_log": resumed.stderr + resumed.stdout}


def test_two_processes_write_the_same_set_as_one(generation):
    latents, rows = read_set(generation["root"] / "straight")
    other_latents, other_rows = read_set(generation["root"] / "two_processes")
    assert len(rows) == 36 and rows == other_rows
    assert torch.equal(latents, other_latents)


def test_killed_generation_resumes_to_the_same_set(generation):
    assert not generation["manifest_at_kill"]["complete"]  # the kill landed mid-generation
    assert "already done" in generation["resumed_log"]
    latents, rows = read_set(generation["root"] / "straight")
    resumed_latents, resumed_rows = read_set(generation["root"] / "killed")
    assert rows == resumed_rows and torch.equal(latents, resumed_latents)
    assert not [name for name in os.listdir(generation["root"] / "killed" / "shards") if name.endswith(".tmp")]


def test_changed_settings_into_the_same_folder_are_refused(generation):
    folder = generation["root"] / "straight"
    before = sorted(os.listdir(folder / "shards"))
    common = [item if item != "8" else "9" for item in generation["common"]]  # --num_inference_steps 9
    result = run(generation["module"] + common + ["--output_dir", str(folder)], expect_success=False)
    assert result.returncode != 0
    assert "num_inference_steps 8 there, 9 now" in result.stderr and "new --output_dir" in result.stderr
    assert sorted(os.listdir(folder / "shards")) == before
    again = run(generation["module"] + generation["common"] + ["--output_dir", str(folder)])
    assert "nothing to do" in again.stdout  # the same command on a finished set changes nothing


def test_a_damaged_set_is_repaired_by_running_the_generator_again(generation, capsys):
    """A shard cut short and one zeroed in place (same size, so only the recorded checksum can tell) are found
    by re-running the same command, and redone into exactly the set an undamaged run wrote."""
    import shutil

    folder = generation["root"] / "repaired"
    shutil.copytree(generation["root"] / "straight", folder)
    manifest = json.load(open(folder / MANIFEST_FILE))
    assert all(len(shard["latents_sha256"]) == 64 for shard in manifest["shards"])  # recorded at write time
    cut = folder / "shards" / "shard-00002.safetensors"
    cut.write_bytes(cut.read_bytes()[:-500])
    zeroed = folder / "shards" / "shard-00005.safetensors"
    size = zeroed.stat().st_size
    zeroed.write_bytes(zeroed.read_bytes()[:100] + bytes(size - 100))
    result = run(generation["module"] + generation["common"] + ["--output_dir", str(folder)],
                 env={"OMP_NUM_THREADS": "1"})
    log = result.stderr + result.stdout
    assert "Shard 2 is damaged" in log and "Shard 5 is damaged" in log and "nothing to do" not in log
    latents, rows = read_set(generation["root"] / "straight")
    repaired_latents, repaired_rows = read_set(folder)
    assert rows == repaired_rows and torch.equal(latents, repaired_latents)
    from aria_utils.generate_teacher_data import main as generate_teacher_data

    generate_teacher_data(generation["common"] + ["--output_dir", str(folder)])  # verifies only: no model is loaded
    assert "every shard verified" in capsys.readouterr().out
