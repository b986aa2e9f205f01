"""Two real processes (gloo, DistributedType.MULTI_CPU) through `accelerate launch`."""

import json
import os
import sys

import pytest

from conftest import run, training_command


@pytest.fixture(scope="module")
def two_process_run(assets, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp") / "out"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # A region cache of its own: the two processes embed the corpus between them.
    command = training_command(assets, output, "--num_regions", "4", "--aria_warmup_steps", "2",
                               "--checkpointing_steps", "3", "--debug_process_states",
                               "--region_cache_dir", str(output.parent / "regions"), sampling="aria", steps=6)
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    result = run(launch + command[1:], env={"ACCELERATE_USE_CPU": "1"})
    states = [json.load(open(output / "process_states" / f"rank_{rank}.json")) for rank in (0, 1)]
    return output, states, result


def test_two_processes_really_ran(two_process_run):
    _, states, result = two_process_run
    assert [state["process_index"] for state in states] == [0, 1]
    assert "processes = 2" in result.stderr and "effective batch = 8" in result.stderr


def test_identical_tracker_and_weights_on_both_processes(two_process_run):
    _, states, _ = two_process_run
    assert states[0]["tracker"] == states[1]["tracker"]
    assert states[0]["tracker"]["num_steps"] == 6
    assert states[0]["student_sha256"] == states[1]["student_sha256"]


def test_processes_drew_different_conditions(two_process_run):
    _, states, _ = two_process_run
    assert states[0]["conditions_sha256"] != states[1]["conditions_sha256"]


def test_tracker_counts_samples_of_both_processes(two_process_run):
    output, states, _ = two_process_run
    # 6 steps x 2 processes x 4 samples; text-dropped samples (p=0.1) have no region.
    visits = sum(states[0]["tracker"]["visits"])
    assert 30 <= visits <= 48
    assert {"checkpoint-3", "checkpoint-6"} <= set(os.listdir(output))
