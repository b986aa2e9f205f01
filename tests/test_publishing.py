"""LoRA students, 8-bit options, the model card and pushing to the Hub (issue: students that get published)."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run, run_training_in_process, training_command

TOKEN = "hf_aria_test_token_7f3c9d"  # must never reach a file or a log


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora") / "out"
    first = run(training_command(assets, output, "--use_lora", "--lora_rank", "4", "--checkpointing_steps", "2",
                                 "--mixed_precision", "bf16", "--hub_token", TOKEN, "--num_regions", "3",
                                 "--aria_warmup_steps", "1", "--validation_prompts", "a violin on a stage",
                                 "--validation_steps", "2", "--validation_inference_steps", "2",
                                 sampling="aria", steps=2))
    resumed = run(training_command(assets, output, "--use_lora", "--lora_rank", "4", "--checkpointing_steps", "2",
                                   "--mixed_precision", "bf16", "--hub_token", TOKEN, "--num_regions", "3",
                                   "--aria_warmup_steps", "1", "--validation_prompts", "a violin on a stage",
                                   "--validation_steps", "2", "--validation_inference_steps", "2",
                                   "--resume_from_checkpoint", "latest", "--speed_report_repeats", "1",
                                   sampling="aria", steps=4))
    return output, first.stdout + first.stderr + resumed.stdout + resumed.stderr


def test_lora_weights_are_diffusers_lora_and_load_back(lora_run):
    from diffusers import StableDiffusionPipeline

    output, _ = lora_run
    weights = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert weights and all("lora" in key for key in weights)
    pipeline = StableDiffusionPipeline.from_pretrained(str(output))
    pipeline.load_lora_weights(str(output))
    images = pipeline("a violin on a stage", num_inference_steps=2, output_type="np",
                      generator=torch.manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)


def test_lora_resume_continues_from_the_adapter_checkpoint(lora_run):
    output, log = lora_run
    assert "Resuming from" in log
    assert (output / "checkpoint-4" / "unet_lora" / "adapter_model.safetensors").is_file()
    # Resumed adapter differs from the step-2 adapter: training went on from it.
    step2 = load_file(str(output / "checkpoint-2" / "unet_lora" / "adapter_model.safetensors"))
    step4 = load_file(str(output / "checkpoint-4" / "unet_lora" / "adapter_model.safetensors"))
    assert step2.keys() == step4.keys() and any(not torch.equal(step2[k], step4[k]) for k in step2)


def test_trainable_params_stay_fp32_under_half_precision(assets):
    from diffusers import UNet2DConditionModel

    from aria_utils.training.lora import add_lora_adapter, trainable_parameters

    for dtype in (torch.bfloat16, torch.float16):
        unet = UNet2DConditionModel.from_pretrained(assets["teacher"], subfolder="unet")
        add_lora_adapter(unet, 4, 4, ["to_k", "to_q", "to_v", "to_out.0"], base_dtype=dtype)
        trainable = trainable_parameters(unet)
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        frozen = [p for p in unet.parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == dtype for p in frozen)


def test_model_card(lora_run):
    from huggingface_hub import ModelCard

    output, _ = lora_run
    card = ModelCard.load(str(output / "README.md"))  # what the Hub parses
    metadata = yaml.safe_load(card.content.split("---")[1])
    # A local teacher folder is not a hub id: the Hub would refuse the card with it as base_model.
    assert "base_model" not in metadata and card.data.base_model is None
    assert metadata["license"] == "creativeml-openrail-m"  # the tiny teacher has the SD-1.x layout
    assert {"diffusers", "diffusers-training", "text-to-image", "distillation", "aria", "lora"} <= set(metadata["tags"])
    assert "## ARIA regions" in card.text and card.text.count("\n| 0 |") + card.text.count("\n| 1 |") >= 2
    assert "accelerate launch train_aria_distill.py" in card.text and "validation/step-4.png" in card.text
    assert f'from_pretrained("{output}")' in card.text and "repo_id" not in card.text
    # The student's measured size and speed, on the training device in the training dtype.
    speed = json.load(open(output / "train_summary.json"))["speed"]
    assert speed["dtype"].startswith("bf16") and "not merged" in speed["note"]
    assert speed["student"]["parameters"] < speed["teacher"]["parameters"]
    assert speed["student"]["macs"] < speed["teacher"]["macs"] and speed["teacher"]["generation_seconds"] > 0
    assert "## Speed and size" in card.text and "| student / teacher |" in card.text


def test_prompts_in_the_card_stay_text(tmp_path):
    """A prompt may hold newlines, headings, HTML and table pipes: in the region table it is one escaped line."""
    from aria_utils.publishing.model_card import write_model_card

    prompt = "line one\n# A heading\n<img src=x onerror=alert(1)> | [link](http://x) ```code```"
    report = {"num_regions": 1, "embedding_model": "m", "regions": [
        {"region": 0, "size": 3, "representatives": [prompt], "discrepancy": 0.1, "probability": 1.0, "visits": 5}]}
    path = write_model_card(str(tmp_path), "t", "s", 10, 5, {"prompt_file": "a|b.csv"}, "cmd", region_report=report)
    text = open(path, encoding="utf-8").read()
    row = next(line for line in text.splitlines() if line.startswith("| 0 |"))
    assert "\\# A heading" not in text and "\n# A heading" not in text and "<img" not in text
    assert "&lt;img src=x onerror=alert(1)&gt; \\| \\[link\\](http://x) \\`\\`\\`code\\`\\`\\`" in row
    assert row.count(" | ") == 6  # seven cells: the prompt's pipe did not open an eighth
    assert "| `prompt_file` | a\\|b.csv |" in text


def test_no_command_line_accepts_abbreviations():
    """argparse would take --hub_tok for --hub_token (and the token would escape its redaction): every command
    line builds its parser with `aria_utils.cli.argument_parser` (the bad-input tables try abbreviations)."""
    import train_aria_distill

    assert train_aria_distill.build_parser().allow_abbrev is False
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tools = [os.path.join(root, "aria_utils", f"{name}.py")
             for name in ("regions", "generate_teacher_data", "fixtures/tiny_teacher", "fixtures/demo_corpus",
                          "evaluate")]
    tools += [os.path.join(root, "examples", "benchmark", name)
              for name in ("run_benchmark.py", "scale.py", "conditioned_teacher.py")]
    for path in tools:
        source = open(path, encoding="utf-8").read()
        assert "argparse.ArgumentParser(" not in source and "argument_parser(" in source, path
        assert "run_cli(main)" in source, path


@pytest.mark.parametrize("teacher, override, expected", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", None, "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("/models/my-teacher", None, None),
    ("community.safetensors", None, None),
    ("/models/my-teacher", "stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
])
def test_card_base_model_is_a_hub_id_or_absent(tmp_path, teacher, override, expected):
    from huggingface_hub import ModelCard

    from aria_utils.publishing.model_card import hub_base_model, write_model_card

    path = write_model_card(str(tmp_path), teacher, "BK-SDM `bk_small` student", 100.0, 50.0, {"seed": 0}, "cmd",
                            base_model=hub_base_model(teacher, override), license="openrail++",
                            datasets=["org/prompts"], repo_id="user/bk-small-aria")
    card = ModelCard.load(path)
    assert card.data.base_model == expected
    assert card.data.license == "openrail++" and card.data.datasets == ["org/prompts"]
    assert 'from_pretrained("user/bk-small-aria")' in card.text


def test_license_follows_the_teacher_family():
    from aria_utils.publishing.model_card import default_license

    assert default_license({"use_linear_projection": False, "cross_attention_dim": 768}) == "creativeml-openrail-m"
    assert default_license({"use_linear_projection": True, "cross_attention_dim": 1024}) == "openrail++"
    assert default_license({"addition_embed_type": "text_time", "use_linear_projection": True}) == "openrail++"


def test_validation_images_reach_every_tracker_that_takes_images():
    import numpy as np

    from aria_utils.training.validation_images import log_image

    class Recorder:
        def __init__(self, name):
            self.name, self.calls = name, []
            self.writer = self  # TensorBoard's SummaryWriter

        def add_image(self, *args, **kwargs):
            self.calls.append(("add_image", args, kwargs))

        def log_images(self, values, step):
            self.calls.append(("log_images", values, step))

    trackers = [Recorder("tensorboard"), Recorder("wandb")]
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    log_image(trackers, "validation/teacher_over_student", image, 4)
    assert trackers[0].calls[0][0] == "add_image" and trackers[0].calls[0][1][2] == 4
    name, values, step = trackers[1].calls[0]
    assert name == "log_images" and step == 4 and values["validation/teacher_over_student"][0] is image


def test_token_never_written_or_logged(lora_run):
    output, log = lora_run
    assert TOKEN not in log
    for root, _, files in os.walk(output):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                assert TOKEN.encode() not in handle.read(), os.path.join(root, name)


def test_lora_merge_writes_a_fused_student(assets, tmp_path):
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "merged"
    run(training_command(assets, output, "--use_lora", "--lora_rank", "4", "--lora_merge", "--learning_rate", "5e-2",
                         "--checkpointing_steps", "100", steps=2))
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    pipeline = StableDiffusionPipeline.from_pretrained(str(output))
    assert not any("lora" in key for key in pipeline.unet.state_dict())
    from aria_utils.families.unet_students import build_student

    base = build_student(pipeline.unet.__class__.from_pretrained(assets["teacher"], subfolder="unet"), "bk_small")
    merged = pipeline.unet.state_dict()
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, merged[k])]
    assert changed and all("attn" in k for k in changed)  # only LoRA-targeted attention weights moved


def test_lora_with_ema_resumes_exactly_and_exports_the_average(assets, tmp_path):
    lora_ema = ("--use_lora", "--lora_rank", "4", "--use_ema", "--ema_decay", "0.5", "--checkpointing_steps", "2")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(training_command(assets, straight, *lora_ema, steps=4))
    run(training_command(assets, interrupted, *lora_ema, steps=2))
    assert (interrupted / "checkpoint-2" / "unet_lora_ema" / "ema.safetensors").is_file()
    run(training_command(assets, interrupted, *lora_ema, "--resume_from_checkpoint", "latest", steps=4))

    exported = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(interrupted / "pytorch_lora_weights.safetensors"))
    assert exported.keys() == resumed.keys()
    assert all(torch.equal(exported[key], resumed[key]) for key in exported)
    # The export is the EMA, not the last adapter state that the checkpoint holds.
    raw = load_file(str(straight / "checkpoint-4" / "unet_lora" / "adapter_model.safetensors"))
    shadow = load_file(str(straight / "checkpoint-4" / "unet_lora_ema" / "ema.safetensors"))
    assert len(shadow) == len(raw)
    assert sorted(t.norm().item() for t in raw.values()) != sorted(t.norm().item() for t in shadow.values())


def test_8bit_adam_runs_on_cpu(assets, tmp_path):
    output = tmp_path / "adam8"
    result = run(training_command(assets, output, "--use_8bit_adam", "--checkpointing_steps", "100", steps=2))
    assert "8-bit AdamW" in result.stderr and (output / "model_index.json").is_file()


def test_teacher_quantization_refused_on_cpu(assets, tmp_path, caplog):
    with caplog.at_level("INFO"):
        result = run_training_in_process(training_command(assets, tmp_path / "q", "--teacher_quantization",
                                                          "8bit")[2:])
    code, message = result.returncode, result.stderr
    assert code not in (0, None)
    assert "--teacher_quantization 8bit needs a CUDA GPU" in message
    assert "Loading the teacher" not in caplog.text


def test_push_to_hub_offline_fails_before_training(assets, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("INFO"):
        result = run_training_in_process(training_command(assets, tmp_path / "p", "--push_to_hub", "--hub_token",
                                                          TOKEN)[2:])
    code, message = result.returncode, result.stderr
    assert code not in (0, None) and "--push_to_hub" in message and "HF_HUB_OFFLINE" in message
    assert "Teacher UNet" not in caplog.text and TOKEN not in message + caplog.text + capsys.readouterr().out


def test_push_uploads_the_folder_without_checkpoints(tmp_path):
    """Verified by recording the exact calls on a stand-in for huggingface_hub.HfApi (no network here)."""
    from aria_utils.publishing.hub import UPLOAD_IGNORE_PATTERNS, push_output_folder

    class RecordingApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

        def upload_folder(self, **kwargs):
            self.calls.append(("upload_folder", kwargs))

    api = RecordingApi()
    push_output_folder(api, str(tmp_path), "bk-small-aria", token=TOKEN, private=True)
    assert api.calls[0] == ("create_repo", "bk-small-aria", {"token": TOKEN, "private": True, "exist_ok": True})
    upload = api.calls[1][1]
    assert upload["repo_id"] == "user/bk-small-aria" and upload["folder_path"] == str(tmp_path)
    assert upload["ignore_patterns"] == UPLOAD_IGNORE_PATTERNS and "checkpoint-*" in UPLOAD_IGNORE_PATTERNS

    import fnmatch

    for path in ("checkpoint-500/optimizer.bin", ".incomplete-checkpoint-10/unet/x.safetensors",
                 "latent_cache/latents-1/latents.safetensors"):
        assert any(fnmatch.fnmatch(path, pattern) for pattern in UPLOAD_IGNORE_PATTERNS), path
    for path in ("unet/diffusion_pytorch_model.safetensors", "README.md", "aria_regions.json"):
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in UPLOAD_IGNORE_PATTERNS), path


def test_checkpoint_pushes_run_in_background_and_failures_are_reported(tmp_path):
    """--hub_push_checkpoints, verified on a recording stand-in for HfApi (no network here)."""
    from concurrent.futures import Future

    from aria_utils.publishing.hub import CheckpointPusher

    class RecordingApi:
        def __init__(self):
            self.uploads = []

        def upload_folder(self, **kwargs):
            self.uploads.append(kwargs)
            future = Future()
            if len(self.uploads) == 2:
                future.set_exception(ConnectionError("connection reset"))
            else:
                future.set_result("commit")
            return future

    api = RecordingApi()
    pusher = CheckpointPusher(api, "user/bk-small-aria", token=TOKEN)
    for step in (2, 4):
        pusher.push(str(tmp_path / f"checkpoint-{step}" / "unet"), "unet", step)
    assert [upload["folder_path"] for upload in api.uploads] == [str(tmp_path / "checkpoint-2" / "unet"),
                                                                 str(tmp_path / "checkpoint-4" / "unet")]
    assert all(upload["run_as_future"] and upload["repo_id"] == "user/bk-small-aria"
               and upload["path_in_repo"] == "unet" for upload in api.uploads)
    failures = pusher.finish()
    assert len(failures) == 1 and "step 4" in failures[0] and "connection reset" in failures[0]
    assert pusher.finish() == []


def test_lora_student_can_be_evaluated(lora_run, assets, tmp_path):
    from aria_utils.data.prompts import load_prompt_corpus
    from aria_utils.evaluate import parse_args, run_evaluation
    from conftest import shared_region_index

    output, _ = lora_run
    regions = shared_region_index(assets, list(load_prompt_corpus(prompt_file=assets["prompts"]).prompts), 3)
    report = run_evaluation(parse_args([
        "--teacher", assets["teacher"], "--student", f"lora={output}", "--prompt_file", assets["prompts"],
        "--max_prompts", "4", "--region_cache_dir", regions, "--output_dir", str(tmp_path),
        "--num_timesteps", "2", "--num_inference_steps", "2", "--num_sample_prompts_per_region", "1"]))
    assert report["students"]["lora"]["discrepancy"]["mean"] > 0
