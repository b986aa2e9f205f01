"""Bad input fails early (before any model is loaded) with a message naming the flag."""

import json

import pytest

import train_aria_distill
from conftest import run, training_command


def parse(assets, tmp_path, *extra, **overrides):
    base = {"--pretrained_model_name_or_path": assets["teacher"], "--train_data_dir": assets["teacher_data"],
            "--prompt_file": assets["prompts"], "--output_dir": str(tmp_path / "out")}
    base.update({f"--{k}": v for k, v in overrides.items()})
    argv = [item for pair in base.items() for item in pair if item is not None] + list(extra)
    return train_aria_distill.parse_args(argv)


def error_of(capsys, assets, tmp_path, *extra, **overrides):
    with pytest.raises(SystemExit):
        parse(assets, tmp_path, *extra, **overrides)
    return capsys.readouterr().err


def test_defaults_parse(assets, tmp_path):
    args = parse(assets, tmp_path)
    assert args.condition_sampling == "aria" and args.student_config == "bk_small"


def test_missing_teacher_path(assets, tmp_path, capsys):
    err = error_of(capsys, assets, tmp_path, pretrained_model_name_or_path=str(tmp_path / "no-teacher"))
    assert "--pretrained_model_name_or_path" in err and "no-teacher" in err


def test_missing_prompt_file(assets, tmp_path, capsys):
    err = error_of(capsys, assets, tmp_path, prompt_file=str(tmp_path / "missing.csv"))
    assert "--prompt_file" in err and "does not exist" in err


def test_unknown_student_config(assets, tmp_path, capsys):
    err = error_of(capsys, assets, tmp_path, "--student_config", "bk_huge")
    assert "--student_config" in err and "bk_tiny" in err


def test_missing_caption_column(assets, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "caption": "x"}) + "\n")
    err = error_of(capsys, assets, tmp_path, train_data_dir=str(folder))
    assert "--caption_column 'text'" in err and "caption" in err


def test_resume_path_absent(assets, tmp_path, capsys):
    err = error_of(capsys, assets, tmp_path, "--resume_from_checkpoint", str(tmp_path / "checkpoint-99"))
    assert "--resume_from_checkpoint" in err


def test_no_paired_data(assets, tmp_path, capsys):
    err = error_of(capsys, assets, tmp_path, train_data_dir=None)
    assert "--train_data_dir" in err


def test_num_regions_below_one(assets, tmp_path, capsys):
    assert "--num_regions" in error_of(capsys, assets, tmp_path, "--num_regions", "0")


def test_aria_flags_checked(assets, tmp_path, capsys):
    assert "--aria_uniform_mix" in error_of(capsys, assets, tmp_path, "--aria_uniform_mix", "0")


def fails_before_model_loading(result):
    assert result.returncode != 0
    assert "Loading pipeline components" not in result.stderr and "Teacher UNet" not in result.stderr


def test_fp16_on_cpu_is_refused(assets, tmp_path):
    result = run(training_command(assets, tmp_path / "out", "--mixed_precision", "fp16"), expect_success=False)
    fails_before_model_loading(result)
    assert "--mixed_precision fp16 needs a GPU" in result.stderr and "bf16" in result.stderr


def test_empty_prompt_file(assets, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt\n\n\n")
    result = run(training_command(dict(assets, prompts=str(empty)), tmp_path / "out"), expect_success=False)
    fails_before_model_loading(result)
    assert "--prompt_file" in result.stderr and "no non-empty prompt" in result.stderr


def test_more_regions_than_prompts(assets, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a cat\na dog\na cat\n\n")
    result = run(training_command(dict(assets, prompts=str(small)), tmp_path / "out", "--num_regions", "3",
                                  sampling="aria"), expect_success=False)
    fails_before_model_loading(result)
    assert "--num_regions 3 exceeds the 2 distinct prompts" in result.stderr


def test_missing_embedding_model(assets, tmp_path):
    result = run(training_command(assets, tmp_path / "out", "--region_embedding_model", str(tmp_path / "nope"),
                                  sampling="aria"), expect_success=False)
    fails_before_model_loading(result)
    assert "--region_embedding_model" in result.stderr


def test_pickle_single_file_is_refused(assets, tmp_path, capsys):
    checkpoint = tmp_path / "community.ckpt"
    checkpoint.write_bytes(b"not loaded")
    err = error_of(capsys, assets, tmp_path, pretrained_model_name_or_path=str(checkpoint))
    assert "--pretrained_model_name_or_path" in err and "pickle" in err and ".safetensors" in err


def test_single_file_offline_needs_a_config_folder(assets, tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "community.safetensors"
    checkpoint.write_bytes(b"")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = error_of(capsys, assets, tmp_path, pretrained_model_name_or_path=str(checkpoint))
    assert "--single_file_config" in err and "Offline" in err
    err = error_of(capsys, assets, tmp_path, "--variant", "fp16", pretrained_model_name_or_path=str(checkpoint),
                   single_file_config=assets["teacher"])
    assert "--variant" in err


def test_single_file_flags_need_a_single_file_teacher(assets, tmp_path, capsys):
    err = error_of(capsys, assets, tmp_path, single_file_config=assets["teacher"])
    assert "--single_file_config" in err and "not one" in err
