"""Bad input fails early, with a message naming the flag or file and the fix, and without a traceback.

One table of mistakes a new user makes. Each row says where it must be caught:
- "args": by argument validation, before the Accelerator or any model exists (run in-process:
  exit status 2 and argparse's message, which never comes with a traceback);
- "main": inside the script, still before any model is loaded (run as a real process: non-zero exit,
  no traceback, and no "Loading the teacher" line in its log).
"""

import json
import os
import shutil
import sys

import pytest

import train_aria_distill
from conftest import REPO_ROOT, run, training_command


@pytest.fixture(scope="module")
def inputs(assets, tmp_path_factory):
    """Broken files and folders, built once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    made = {"root": root}
    made["binary"] = root / "prompts-binary.txt"
    made["binary"].write_bytes(bytes(range(256)) * 4)
    made["latin1"] = root / "prompts-latin1.txt"
    made["latin1"].write_bytes("a caf\xe9 at night\nna\xefve art\n".encode("latin-1"))
    made["blank"] = root / "blank.txt"
    made["blank"].write_text("")
    made["header_only"] = root / "header-only.csv"
    made["header_only"].write_text("prompt\n\n\n")
    made["folder"] = root / "a-folder.csv"
    made["folder"].mkdir()
    made["file_as_output"] = root / "output-is-a-file"
    made["file_as_output"].write_text("x")
    made["spreadsheet"] = root / "prompts.xlsx"
    made["spreadsheet"].write_bytes(b"PK")
    made["few_prompts"] = root / "few.txt"
    made["few_prompts"].write_text("a cat\na dog\na cat\n\n")

    made["teacher_without_unet"] = root / "teacher-without-unet"
    shutil.copytree(assets["teacher"], made["teacher_without_unet"])
    shutil.rmtree(made["teacher_without_unet"] / "unet")

    made["flow_teacher"] = root / "flow-teacher"
    shutil.copytree(assets["teacher"], made["flow_teacher"])
    scheduler_config = made["flow_teacher"] / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps(dict(json.loads(scheduler_config.read_text()),
                                                prediction_type="flow_prediction")))

    made["sdxl_teacher"] = root / "sdxl-teacher"
    shutil.copytree(assets["teacher"], made["sdxl_teacher"])
    unet_config = made["sdxl_teacher"] / "unet" / "config.json"
    # Only the config is read before the refusal: SDXL's layout (no plain innermost stage) is enough.
    unet_config.write_text(json.dumps(dict(
        json.loads(unet_config.read_text()), addition_embed_type="text_time",
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
        up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"])))
    # The same with only one text encoder, as an SDXL refiner has.
    made["sdxl_one_encoder"] = root / "sdxl-one-encoder"
    shutil.copytree(made["sdxl_teacher"], made["sdxl_one_encoder"])
    for component in ("text_encoder", "tokenizer"):
        shutil.copytree(made["sdxl_teacher"] / component, made["sdxl_teacher"] / f"{component}_2")

    # A paired set whose second shard lost its end (a copy cut short).
    made["truncated_shard"] = root / "truncated-shard"
    shutil.copytree(assets["teacher_data"], made["truncated_shard"])
    shard = made["truncated_shard"] / "shards" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    # The single-file layout of earlier versions, cut short.
    made["truncated_single_file"] = root / "truncated-single-file"
    made["truncated_single_file"].mkdir()
    first_shard = (made["truncated_shard"] / "shards" / "shard-00000.safetensors").read_bytes()
    (made["truncated_single_file"] / "latents.safetensors").write_bytes(first_shard[: len(first_shard) // 2])
    (made["truncated_single_file"] / "metadata.jsonl").write_text('{"caption": "x"}\n')
    # A paired set whose generation was interrupted.
    made["unfinished"] = root / "unfinished"
    shutil.copytree(assets["teacher_data"], made["unfinished"])
    manifest = json.loads((made["unfinished"] / "manifest.json").read_text())
    (made["unfinished"] / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    os.remove(made["unfinished"] / "shards" / "shard-00002.safetensors")

    images = root / "images"
    images.mkdir()
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "caption": "x"}) + "\n")
    made["images_without_text_column"] = images

    # An earlier run's work in an output folder.
    made["finished_run"] = root / "finished-run"
    (made["finished_run"] / "checkpoint-200").mkdir(parents=True)
    (made["finished_run"] / "checkpoint-200" / "training_state.json").write_text('{"global_step": 200}')
    (made["finished_run"] / "model_index.json").write_text("{}")
    # A checkpoint whose optimizer file was cut short after it was written.
    made["damaged_checkpoint"] = root / "damaged" / "checkpoint-4"
    made["damaged_checkpoint"].mkdir(parents=True)
    (made["damaged_checkpoint"] / "optimizer.bin").write_bytes(b"PK" + b"\0" * 10)
    (made["damaged_checkpoint"] / "training_state.json").write_text(
        json.dumps({"global_step": 4, "files": {"optimizer.bin": 5000}}))
    return made


# (name, stage, extra flags or a function of (assets, inputs) returning them, overrides, expected fragments)
CASES = [
    ("teacher folder missing", "args", [], {"pretrained_model_name_or_path": "{root}/no-teacher"},
     ["--pretrained_model_name_or_path", "no-teacher", "does not exist"]),
    ("misspelled local teacher dir/name", "args", [], {"pretrained_model_name_or_path": "tests/tiny-teachr"},
     ["--pretrained_model_name_or_path 'tests/tiny-teachr' does not exist"]),
    ("teacher folder without unet/", "args", [], {"pretrained_model_name_or_path": "{teacher_without_unet}"},
     ["--pretrained_model_name_or_path", "lacks unet/"]),
    ("student folder missing", "args", ["--student_model_name_or_path", "{root}/no-student"], {},
     ["--student_model_name_or_path", "no-student", "does not exist"]),
    ("prompt file missing", "args", [], {"prompt_file": "{root}/missing.csv"}, ["--prompt_file", "does not exist"]),
    ("prompt file is a folder", "args", [], {"prompt_file": "{folder}"}, ["--prompt_file", "is a folder"]),
    ("binary prompt file", "args", [], {"prompt_file": "{binary}"}, ["--prompt_file", "binary file"]),
    ("blank prompt file", "args", [], {"prompt_file": "{blank}"}, ["--prompt_file", "no non-empty prompt"]),
    ("unsupported prompt file", "args", [], {"prompt_file": "{spreadsheet}"},
     ["--prompt_file", "unsupported extension", ".parquet"]),
    ("eval prompt file missing", "args", ["--eval_prompt_file", "{root}/heldout.csv", "--eval_steps", "2"], {},
     ["--eval_prompt_file", "does not exist"]),
    ("eval steps without prompts", "args", ["--eval_steps", "2"], {}, ["--eval_steps needs --eval_prompt_file"]),
    ("no paired data", "args", [], {"train_data_dir": None}, ["--train_data_dir"]),
    ("image folder without caption column", "args", [], {"train_data_dir": "{images_without_text_column}"},
     ["--caption_column 'text'", "caption"]),
    ("truncated single-file latents", "args", [], {"train_data_dir": "{truncated_single_file}"},
     ["latents.safetensors", "regenerate"]),
    ("unfinished paired set", "args", [], {"train_data_dir": "{unfinished}"},
     ["--train_data_dir", "unfinished (2 of 3 shards)", "re-run the same"]),
    ("negative learning rate", "args", ["--learning_rate=-1e-4"], {}, ["--learning_rate must be greater than 0"]),
    ("zero batch size", "args", ["--train_batch_size", "0"], {}, ["--train_batch_size must be at least 1"]),
    ("no regions", "args", ["--num_regions", "0"], {}, ["--num_regions must be at least 1"]),
    ("eps zero", "args", ["--aria_uniform_mix", "0"], {}, ["--aria_uniform_mix"]),
    ("drop probability above one", "args", ["--text_drop_prob", "2"], {}, ["--text_drop_prob must be in [0, 1]"]),
    ("EMA decay of one", "args", ["--ema_decay", "1"], {}, ["--ema_decay must be in [0, 1)"]),
    ("resolution not a multiple of 8", "args", ["--resolution", "100"], {}, ["--resolution", "multiple of 8"]),
    ("unknown lr scheduler", "args", ["--lr_scheduler", "cosine_annealing"], {}, ["--lr_scheduler", "cosine"]),
    ("unknown student", "args", ["--student_config", "bk_huge"], {}, ["--student_config", "bk_tiny"]),
    ("empty validation prompt", "args", ["--validation_prompts", "a cat", ""], {},
     ["--validation_prompts holds an empty prompt"]),
    ("output dir is a file", "args", [], {"output_dir": "{file_as_output}"}, ["--output_dir", "is a file"]),
    ("fresh run over a finished run", "args", [], {"output_dir": "{finished_run}"},
     ["--output_dir", "another run's work", "checkpoint-200", "--resume_from_checkpoint latest", "--overwrite_output_dir"]),
    ("overwrite and resume together", "args", ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], {},
     ["--overwrite_output_dir", "--resume_from_checkpoint"]),
    ("resume from a missing checkpoint", "args", ["--resume_from_checkpoint", "{root}/checkpoint-99"], {},
     ["--resume_from_checkpoint", "checkpoint-99", "does not exist"]),
    ("resume from a damaged checkpoint", "args", ["--resume_from_checkpoint", "{damaged_checkpoint}"], {},
     ["--resume_from_checkpoint", "optimizer.bin has 12 bytes, 5000 were written"]),
    ("token with wandb", "args", ["--hub_token", "hf_secret", "--report_to", "wandb"], {},
     ["--hub_token", "--report_to wandb"]),
    ("lora merge without lora", "args", ["--lora_merge"], {}, ["--lora_merge needs --use_lora"]),
    ("pickle single file", "args", [], {"pretrained_model_name_or_path": "{root}/community.ckpt"},
     ["--pretrained_model_name_or_path", "pickle", ".safetensors"]),
    ("single-file flags without a single file", "args", ["--single_file_config", "{teacher}"], {},
     ["--single_file_config", "not one"]),
    # Caught inside the script, still before any model is loaded.
    ("fp16 on CPU", "main", ["--mixed_precision", "fp16"], {}, ["--mixed_precision fp16 needs a GPU", "bf16"]),
    ("prompt file with a header only", "main", [], {"prompt_file": "{header_only}"},
     ["--prompt_file", "no non-empty prompt"]),
    ("prompt file not UTF-8", "main", [], {"prompt_file": "{latin1}"}, ["--prompt_file", "not UTF-8", "iconv"]),
    ("prompt column missing", "main", ["--prompt_column", "caption"], {},
     ["--prompt_column 'caption'", "available columns"]),
    ("more regions than prompts", "main", ["--num_regions", "3", "--condition_sampling", "aria"],
     {"prompt_file": "{few_prompts}"}, ["--num_regions 3 exceeds the 2 distinct prompts"]),
    ("embedding model missing", "main", ["--region_embedding_model", "{root}/nope", "--condition_sampling", "aria"], {},
     ["--region_embedding_model"]),
    ("batch larger than the paired set", "main", ["--train_batch_size", "1000"], {},
     ["--train_batch_size 1000", "48 paired latents"]),
    ("teacher with an unsupported prediction type", "main", [], {"pretrained_model_name_or_path": "{flow_teacher}"},
     ["predicts 'flow_prediction'", "epsilon, v_prediction, sample"]),
    ("bk_tiny of an SDXL teacher", "main", ["--student_config", "bk_tiny"],
     {"pretrained_model_name_or_path": "{sdxl_teacher}"},
     ["--student_config bk_tiny removes the innermost plain stage", "use bk_base or bk_small"]),
    ("SDXL teacher without its second text encoder", "main", ["--student_config", "bk_small"],
     {"pretrained_model_name_or_path": "{sdxl_one_encoder}"}, ["needs both text encoders", "lacks text_encoder_2/"]),
    ("KOALA student of an SD-1.x teacher", "main", ["--student_config", "koala_700m"], {},
     ["--student_config koala_700m is a KOALA student of an SDXL teacher", "use bk_base"]),
    ("truncated shard", "main", [], {"train_data_dir": "{truncated_shard}"},
     ["shard-00001.safetensors is truncated", "regenerate"]),
]


def fill(value, assets, inputs):
    if value is None:
        return None
    names = dict({key: str(item) for key, item in inputs.items()}, teacher=assets["teacher"])
    return value.format(**names)


def argv_of(assets, inputs, tmp_path, extra, overrides):
    base = {"pretrained_model_name_or_path": assets["teacher"], "train_data_dir": assets["teacher_data"],
            "prompt_file": assets["prompts"], "output_dir": str(tmp_path / "out"), "condition_sampling": "random",
            "report_to": "none"}
    base.update(overrides)
    argv = []
    for key, value in base.items():
        if fill(value, assets, inputs) is not None:
            argv += [f"--{key}", fill(value, assets, inputs)]
    return argv + [fill(item, assets, inputs) for item in extra]


@pytest.mark.parametrize("name, stage, extra, overrides, fragments", CASES, ids=[case[0] for case in CASES])
def test_bad_input(name, stage, extra, overrides, fragments, assets, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # "tests/..." names a local folder, as it would in a user's checkout
    (inputs["root"] / "community.ckpt").write_bytes(b"not loaded")
    argv = argv_of(assets, inputs, tmp_path, extra, overrides)
    if stage == "args":
        with pytest.raises(SystemExit) as exit_info:
            train_aria_distill.parse_args(argv)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
    else:
        result = run([sys.executable, os.path.join(REPO_ROOT, "train_aria_distill.py"), *argv], expect_success=False)
        assert result.returncode not in (0, None), result.stderr[-2000:]
        message = result.stderr
        assert "Traceback" not in message, message[-3000:]
        assert "Loading the teacher" not in message and "Loading pipeline components" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message[-2000:]}"


def test_defaults_parse(assets, tmp_path):
    args = train_aria_distill.parse_args(["--pretrained_model_name_or_path", assets["teacher"], "--train_data_dir",
                                          assets["teacher_data"], "--prompt_file", assets["prompts"],
                                          "--output_dir", str(tmp_path / "out")])
    assert args.condition_sampling == "aria" and args.student_config == "bk_small"


def test_single_file_offline_needs_a_config_folder(assets, tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "community.safetensors"
    checkpoint.write_bytes(b"")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", assets["teacher_data"],
              "--prompt_file", assets["prompts"], "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        train_aria_distill.parse_args(common)
    err = capsys.readouterr().err
    assert "--single_file_config" in err and "Offline" in err
    with pytest.raises(SystemExit):
        train_aria_distill.parse_args(common + ["--variant", "fp16", "--single_file_config", assets["teacher"]])
    assert "--variant" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the helper command lines
def test_generate_teacher_data_never_replaces_a_set(assets, inputs, tmp_path, monkeypatch):
    from aria_utils.generate_teacher_data import main as generate

    monkeypatch.chdir(REPO_ROOT)
    common = ["--pretrained_model_name_or_path", assets["teacher"], "--prompt_file", assets["prompts"],
              "--num_prompts", "4", "--num_inference_steps", "1"]
    old_layout = tmp_path / "old-layout"
    old_layout.mkdir()
    (old_layout / "latents.safetensors").write_bytes(b"kept")
    with pytest.raises(SystemExit, match="already holds a finished teacher-latent set.*new --output_dir"):
        generate(common + ["--output_dir", str(old_layout)])
    assert (old_layout / "latents.safetensors").read_bytes() == b"kept"
    with pytest.raises(SystemExit, match="holds other files"):
        generate(common + ["--output_dir", str(inputs["finished_run"])])
    with pytest.raises(SystemExit, match="--pretrained_model_name_or_path .* does not exist"):
        generate(["--pretrained_model_name_or_path", "tests/no-teacher", *common[2:], "--output_dir",
                  str(tmp_path / "new")])
    with pytest.raises(SystemExit, match="--output_dir .* is a file"):
        generate(common + ["--output_dir", str(inputs["file_as_output"])])


def test_evaluate_names_a_misspelled_student(assets, tmp_path, capsys, monkeypatch):
    from aria_utils.evaluate import parse_args

    monkeypatch.chdir(REPO_ROOT)
    regions = tmp_path / "regions"
    regions.mkdir()
    (regions / "regions.json").write_text("{}")
    with pytest.raises(SystemExit):
        parse_args(["--teacher", assets["teacher"], "--student", "tests/no-studnt", "--prompt_file", assets["prompts"],
                    "--region_cache_dir", str(regions), "--output_dir", str(tmp_path / "eval")])
    assert "--student 'tests/no-studnt' does not exist" in capsys.readouterr().err


def test_fresh_run_into_a_finished_run_is_refused_and_overwrite_starts_over(assets, tmp_path):
    """Acceptance: refused before any model loads, naming the fixes; --overwrite_output_dir replaces the run."""
    output = tmp_path / "out"
    run(training_command(assets, output, "--checkpointing_steps", "2", steps=2))
    before = sorted(os.listdir(output))
    refused = run(training_command(assets, output, "--checkpointing_steps", "2", steps=4), expect_success=False)
    assert refused.returncode == 2 and "another run's work" in refused.stderr
    assert "Loading the teacher" not in refused.stderr and sorted(os.listdir(output)) == before
    run(training_command(assets, output, "--checkpointing_steps", "3", "--overwrite_output_dir", steps=3))
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint-")) == ["checkpoint-3"]
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 3
