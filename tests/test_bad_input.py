"""Bad input fails early, with a message naming the flag or file and the fix, and without a traceback.

One table of mistakes a new user makes. Each row says where it must be caught:
- "args": by argument validation, before the Accelerator or any model exists (run in-process:
  exit status 2 and argparse's message, which never comes with a traceback);
- "main": inside the script, still before any model is loaded (the script's `__main__` path run in this
  process by conftest's `run_training_in_process`: a non-zero exit with a message, no traceback, and no
  "Loading the teacher" log line);
- "process": the same, as a real process (no traceback in its output).
"""

import json
import os
import shutil
import sys

import pytest

import train_aria_distill
from conftest import REPO_ROOT, run, run_training_in_process, training_command


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
    made["nul_late"] = root / "nul-after-8k.txt"  # binary detection looks at the first 8 KB only
    made["nul_late"].write_bytes(b"a photo of a cat\n" * 600 + b"a dog\x00 at night\n")
    made["symlink_loop"] = root / "loop.txt"
    os.symlink(made["symlink_loop"], made["symlink_loop"])
    made["fifo"] = root / "prompts-fifo.txt"
    os.mkfifo(made["fifo"])
    import pyarrow as pa
    import pyarrow.parquet as pq

    made["int_column"] = root / "ids.parquet"
    pq.write_table(pa.table({"prompt": list(range(40)), "text": [f"a cat {i}" for i in range(40)]}), made["int_column"])
    # The teacher's folder given as the output folder, and a copy of it (a pipeline this project did not write).
    made["teacher_copy"] = root / "teacher-copy"
    shutil.copytree(assets["teacher"], made["teacher_copy"])

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
    made["wrong_count"] = root / "wrong-count"
    shutil.copytree(assets["teacher_data"], made["wrong_count"])
    manifest = json.loads((made["wrong_count"] / "manifest.json").read_text())
    (made["wrong_count"] / "manifest.json").write_text(json.dumps(dict(manifest, num_latents=47)))
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
     ["--pretrained_model_name_or_path", "lacks a denoiser (transformer/config.json or unet/config.json)"]),
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
    ("output dir is the teacher's folder", "args", ["--overwrite_output_dir"], {"output_dir": "{teacher}"},
     ["--output_dir", "is the folder of --pretrained_model_name_or_path", "Choose another --output_dir"]),
    ("output dir holds a pipeline this project did not write", "args", ["--overwrite_output_dir"],
     {"output_dir": "{teacher_copy}"}, ["--output_dir", "did not write", "never deleted", "choose another"]),
    ("output dir is the paired set", "args", [], {"output_dir": "{teacher_data}"},
     ["--output_dir", "is the folder of --train_data_dir"]),
    ("an abbreviated secret flag", "args", ["--hub_tok", "hf_NEVER_PRINTED"], {},
     ["unrecognized arguments: --hub_tok ***"]),
    ("an abbreviated flag", "args", ["--learning_r", "1e-4"], {}, ["unrecognized arguments: --learning_r"]),
    ("ARIA with eps 1 is RC", "args", ["--condition_sampling", "aria", "--aria_uniform_mix", "1"], {},
     ["--aria_uniform_mix 1", "--condition_sampling random"]),
    ("ARIA with one region is RC", "args", ["--condition_sampling", "aria", "--num_regions", "1"], {},
     ["--num_regions 1", "--condition_sampling random"]),
    ("prompt file is a symlink loop", "args", [], {"prompt_file": "{symlink_loop}"},
     ["--prompt_file", "symbolic link that leads nowhere"]),
    ("prompt file is a FIFO", "args", [], {"prompt_file": "{fifo}"}, ["--prompt_file", "named pipe (FIFO)"]),
    ("manifest with a wrong total count", "args", [], {"train_data_dir": "{wrong_count}"},
     ["--train_data_dir", "says 47 latents in shards of 16, but its 3 shards hold 48"]),
    ("resume from a checkpoint name not in the output dir", "args", ["--resume_from_checkpoint", "checkpoint-7"], {},
     ["--resume_from_checkpoint 'checkpoint-7' does not exist", "in --output_dir"]),
    # Caught inside the script, still before any model is loaded.
    ("fp16 on CPU", "process", ["--mixed_precision", "fp16"], {}, ["--mixed_precision fp16 needs a GPU", "bf16"]),
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
    ("depth-pruned student of an SD-1.x teacher", "main", ["--student_config", "depth_1_2"], {},
     ["--student_config 'depth_1_2' is not a student of a UNet teacher"]),
    ("SD 3.x flags with an SD-1.x teacher", "main", ["--weighting_scheme", "mode", "--max_sequence_length", "256"], {},
     ["--weighting_scheme, --max_sequence_length apply to SD 3.x teachers", "drop them"]),
    ("teacher with an unsupported prediction type", "main", [], {"pretrained_model_name_or_path": "{flow_teacher}"},
     ["predicts 'flow_prediction'", "epsilon, v_prediction, sample"]),
    ("bk_tiny of an SDXL teacher", "main", ["--student_config", "bk_tiny"],
     {"pretrained_model_name_or_path": "{sdxl_teacher}"},
     ["--student_config bk_tiny removes the innermost plain stage", "use bk_base or bk_small"]),
    ("SDXL teacher without its second text encoder", "main", ["--student_config", "bk_small"],
     {"pretrained_model_name_or_path": "{sdxl_one_encoder}"}, ["needs both text encoders", "lacks text_encoder_2/"]),
    ("more validation steps than the scheduler has", "main",
     ["--validation_prompts", "a cat", "--validation_inference_steps", "1000"], {},
     ["--validation_inference_steps 1000", "at most 999"]),
    ("LoRA on a channel-reduced student", "args", ["--student_config", "c_small", "--use_lora"], {},
     ["--use_lora with --student_config c_small", "random init"]),
    ("channel-reduced student of an SDXL teacher", "main", ["--student_config", "c_small"],
     {"pretrained_model_name_or_path": "{sdxl_teacher}"}, ["--student_config c_small", "use koala_1b or koala_700m"]),
    ("KOALA student of an SD-1.x teacher", "main", ["--student_config", "koala_700m"], {},
     ["--student_config koala_700m is a KOALA student of an SDXL teacher", "use bk_base"]),
    ("truncated shard", "args", [], {"train_data_dir": "{truncated_shard}"},
     ["shard-00001.safetensors has", "were written (damaged or cut short)", "redoes damaged ones"]),
    ("NUL byte after the first 8 KB of a prompt file", "main", [], {"prompt_file": "{nul_late}"},
     ["--prompt_file", "record 601 holds a NUL byte"]),
    ("prompt column of integers", "main", [], {"prompt_file": "{int_column}"},
     ["--prompt_column 'prompt'", "holds int values", "not text"]),
]


def fill(value, assets, inputs):
    if value is None:
        return None
    names = dict({key: str(item) for key, item in inputs.items()}, teacher=assets["teacher"],
                 teacher_data=assets["teacher_data"])
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
def test_bad_input(name, stage, extra, overrides, fragments, assets, inputs, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # "tests/..." names a local folder, as it would in a user's checkout
    (inputs["root"] / "community.ckpt").write_bytes(b"not loaded")
    argv = argv_of(assets, inputs, tmp_path, extra, overrides)
    if stage == "args":
        with pytest.raises(SystemExit) as exit_info:
            train_aria_distill.parse_args(argv)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
    elif stage == "main":
        with caplog.at_level("INFO"):
            result = run_training_in_process(argv)
        code, message = result.returncode, result.stderr
        assert code not in (0, None)
        assert "Loading the teacher" not in caplog.text and "Loading pipeline components" not in message
    else:  # "process": one row runs as users run it, the script's own __main__ in a new process
        result = run([sys.executable, os.path.join(REPO_ROOT, "train_aria_distill.py"), *argv], expect_success=False,
                     in_process=False)
        assert result.returncode not in (0, None), result.stderr[-2000:]
        message = result.stderr
        assert "Traceback" not in message, message[-3000:]
        assert "Loading the teacher" not in message and "Loading pipeline components" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message[-2000:]}"
    assert "hf_NEVER_PRINTED" not in message  # a token is never printed, however its flag is spelled


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
    """Acceptance: refused before any model loads, naming the fixes; --overwrite_output_dir replaces the run and
    deletes nothing else: not a logging folder outside --output_dir, not the user's files inside it."""
    output = tmp_path / "out"
    elsewhere = tmp_path / "shared-logs"
    (elsewhere / "other-project").mkdir(parents=True)
    (elsewhere / "other-project" / "events.out.tfevents.1.other").write_bytes(b"theirs")
    (elsewhere / "keep_me.txt").write_text("theirs")
    logs = ["--report_to", "tensorboard", "--logging_dir", "../shared-logs"]
    run(training_command(assets, output, "--checkpointing_steps", "2", *logs, steps=2))  # the last --report_to wins
    ours = [path for path in elsewhere.rglob("events.out.tfevents.*") if "other-project" not in str(path)]
    assert ours  # this run's TensorBoard events went to the external folder
    (output / "keep_me.txt").write_text("mine")
    before = sorted(os.listdir(output))
    refused = run(training_command(assets, output, "--checkpointing_steps", "2", steps=4), expect_success=False)
    assert refused.returncode == 2 and "another run's work" in refused.stderr
    assert "Loading the teacher" not in refused.stderr and sorted(os.listdir(output)) == before
    run(training_command(assets, output, "--checkpointing_steps", "3", "--overwrite_output_dir", *logs, steps=3))
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint-")) == ["checkpoint-3"]
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 3
    assert (output / "keep_me.txt").read_text() == "mine"
    assert (elsewhere / "keep_me.txt").exists() and all(path.exists() for path in ours)
    assert (elsewhere / "other-project" / "events.out.tfevents.1.other").read_bytes() == b"theirs"


# ------------------------------------------------------------------------------ every command line tool
def cli_cases(assets, inputs, tmp_path):
    regions = ["--num_regions", "2", "--output_dir", str(tmp_path / "regions")]
    evaluate = ["--teacher", assets["teacher"], "--region_cache_dir", str(tmp_path / "cache"), "--output_dir",
                str(tmp_path / "eval")]
    generate = ["--pretrained_model_name_or_path", assets["teacher"], "--num_prompts", "2", "--output_dir",
                str(tmp_path / "latents")]
    return [
        ("regions", ["--prompt_file", str(inputs["root"] / "missing.csv"), *regions], "does not exist"),
        ("regions", ["--prompt_file", str(inputs["binary"]), *regions], "binary file"),
        ("regions", ["--prompt_file", str(inputs["blank"]), *regions], "no non-empty prompt"),
        ("regions", ["--prompt_file", str(inputs["fifo"]), *regions], "named pipe (FIFO)"),
        ("regions", ["--prompt_file", assets["prompts"], "--prompt_column", "nope", *regions],
         "--prompt_column 'nope' is not a column"),
        ("regions", ["--prompt_file", str(inputs["nul_late"]), *regions], "holds a NUL byte"),
        ("regions", ["--prompt_file", assets["prompts"], *regions, "--batch", "4"], "unrecognized arguments: --batch 4"),
        ("evaluate", ["--student", assets["teacher"], "--prompt_file", str(inputs["binary"]), *evaluate],
         "binary file"),
        ("evaluate", ["--student", f"../../x={assets['teacher']}", "--prompt_file", assets["prompts"], *evaluate],
         "the name '../../x' may hold letters, digits"),
        ("generate_teacher_data", ["--prompt_file", str(inputs["int_column"]), *generate], "holds int values"),
        ("generate_teacher_data", ["--prompt_file", str(inputs["symlink_loop"]), *generate],
         "symbolic link that leads nowhere"),
    ]


CLI_NAMES = ["regions: missing file", "regions: binary file", "regions: blank file", "regions: FIFO",
             "regions: no such column", "regions: NUL byte", "regions: abbreviation", "evaluate: binary prompt file",
             "evaluate: a name with ../", "generate: integer prompts", "generate: symlink loop"]


@pytest.mark.parametrize("case", range(len(CLI_NAMES)), ids=CLI_NAMES)
def test_command_line_tools_turn_mistakes_into_messages(case, assets, inputs, tmp_path, capsys, monkeypatch):
    """The same way as the training script: `run_cli` around each tool's main, no traceback, a non-zero status."""
    import importlib

    from aria_utils.cli import run_cli

    monkeypatch.chdir(REPO_ROOT)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "regions.json").write_text("{}")
    tool, argv, fragment = cli_cases(assets, inputs, tmp_path)[case]
    module = importlib.import_module(f"aria_utils.{tool}")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, argv)
    assert exit_info.value.code not in (0, None)
    message = capsys.readouterr().err + str(exit_info.value.code)
    assert fragment in message, message[-2000:]


def test_a_student_path_holding_an_equals_sign_is_a_path(tmp_path):
    from aria_utils.evaluate import parse_student

    folder = tmp_path / "runs" / "lr=1e-4"
    folder.mkdir(parents=True)
    assert parse_student(str(folder)) == ("lr_1e-4", str(folder))
    assert parse_student(f"rc={folder}") == ("rc", str(folder))
