"""FID / IS / CLIP (issue 23): the libraries' numbers on random-weight metric networks saved to local files,
per split, from images generated across processes and resumed after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from aria_utils.evaluate import parse_args, run_evaluation
from aria_utils.evaluation import image_metrics as metrics
from aria_utils.evaluation.image_evaluation import split_membership
from conftest import REPO_ROOT, shared_region_index


@pytest.fixture(scope="module")
def metric_networks(tmp_path_factory):
    from aria_utils.fixtures.metric_networks import save_random_inception, save_tiny_clip

    root = tmp_path_factory.mktemp("metric-networks")
    return {"inception": save_random_inception(str(root / "inception.safetensors"), seed=0),
            "clip": save_tiny_clip(str(root / "clip"), seed=0)}


def random_images(seed, count=8, size=32):
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def image_sets():
    first = random_images(0)
    # A different set: darker, lower-contrast versions of other random images.
    second = (random_images(1).float() * 0.4 + 20).to(torch.uint8)
    return first, second


@pytest.fixture(scope="module")
def inception(metric_networks):
    return metrics.load_inception(metric_networks["inception"])


def statistics_of(network, images):
    statistics = metrics.FeatureStatistics()
    statistics.add(metrics.inception_features(network, images)[0])
    return statistics.mean_and_covariance()


def test_fid_of_a_set_against_its_own_statistics_is_zero_and_against_another_is_larger(inception, image_sets):
    first, second = image_sets
    own = statistics_of(inception, first)
    assert metrics.frechet_distance(own, own) == pytest.approx(0.0, abs=1e-3)
    assert metrics.frechet_distance(own, statistics_of(inception, second)) > 1.0


def test_fid_and_is_equal_torchmetrics_on_the_same_images_and_weights(metric_networks, inception, image_sets):
    NoTrainInceptionV3, _, InceptionScore = metrics.import_torchmetrics_inception()
    from torchmetrics.image.fid import FrechetInceptionDistance

    first, second = image_sets
    with metrics._weights_from_safetensors(metric_networks["inception"]):
        pool_network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], antialias=False)
        logits_network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                            antialias=False)
    library_fid = FrechetInceptionDistance(feature=pool_network)
    library_fid.update(first, real=True)
    library_fid.update(second, real=False)
    ours = metrics.frechet_distance(statistics_of(inception, second), statistics_of(inception, first))
    assert ours == pytest.approx(float(library_fid.compute()), rel=1e-6)

    library_is = InceptionScore(feature=logits_network, splits=5)
    library_is.update(first)
    torch.manual_seed(3)  # the library permutes the images with the global generator
    library_mean, library_std = library_is.compute()
    mean, std = metrics.inception_score(metrics.inception_features(inception, first)[1], seed=3, splits=5)
    assert (mean, std) == pytest.approx((float(library_mean), float(library_std)), rel=1e-6)


class TensorFeatures(torch.nn.Module):
    """The CLIP model as torchmetrics 1.9 calls it: `get_*_features` returning tensors, as in transformers 4
    (transformers 5 returns model outputs, which torchmetrics' CLIPScore cannot normalise)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return metrics._embedding(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask):
        return metrics._embedding(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def test_clip_score_equals_torchmetrics_on_the_same_images_and_model(metric_networks, image_sets):
    from torchmetrics.multimodal import CLIPScore

    model, processor = metrics.load_clip(metric_networks["clip"])
    images = torch.cat(image_sets)
    prompts = [f"a photo of thing number {i}" for i in range(len(images))]
    cosines = metrics.clip_cosines(model, processor, images, prompts)
    library = CLIPScore(model_name_or_path=lambda: (TensorFeatures(model), processor))
    library.update(list(images), prompts)
    # torchmetrics reports 100 x max(mean cosine, 0); BK-SDM and RC report the mean cosine.
    assert float(library.compute()) == pytest.approx(max(100 * float(cosines.double().mean()), 0.0), abs=1e-4)
    assert cosines.abs().max() > 0


def test_reference_statistics_round_trip_in_pytorch_fid_format(inception, image_sets, tmp_path):
    statistics = metrics.FeatureStatistics()
    statistics.add(metrics.inception_features(inception, image_sets[0])[0])
    path = str(tmp_path / "reference.npz")
    metrics.save_reference_statistics(path, statistics)
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"] and data["sigma"].shape == (2048, 2048)
    mean, covariance = statistics.mean_and_covariance()
    loaded_mean, loaded_covariance = metrics.load_reference_statistics(path)
    assert torch.equal(loaded_mean, mean) and torch.equal(loaded_covariance, covariance)
    np.savez(str(tmp_path / "wrong.npz"), mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(metrics.MetricSetupError, match="--fid_reference.*2048"):
        metrics.load_reference_statistics(str(tmp_path / "wrong.npz"))


def test_a_folder_of_reference_images_gives_their_statistics_cached_in_pytorch_fid_format(inception, tmp_path):
    from PIL import Image

    from aria_utils.evaluation.image_evaluation import ImageEvaluation, ImageMetricsConfig

    folder = tmp_path / "real"
    folder.mkdir()
    images = random_images(5, count=4, size=40)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    config = ImageMetricsConfig(metrics=("fid",), resolution=32, eval_resolution=64, num_inference_steps=1,
                                guidance_scale=1.0, images_per_prompt=1, seed=0, batch_size=3,
                                fid_reference=str(folder))
    evaluation = ImageEvaluation(config, str(tmp_path / "out"), ["p"], np.zeros(1, dtype=int), {0: []})
    mean, covariance = evaluation.folder_statistics(str(folder), inception)
    expected = metrics.FeatureStatistics()
    expected.add(metrics.inception_features(inception, torch.stack([
        metrics.resize_for_scoring(Image.open(folder / f"{i}.png"), 64) for i in range(4)]))[0])
    expected_mean, expected_covariance = expected.mean_and_covariance()
    assert torch.allclose(mean, expected_mean) and torch.allclose(covariance, expected_covariance)
    cached = [name for name in os.listdir(evaluation.root) if name.endswith(".npz")]
    assert len(cached) == 1
    assert torch.equal(metrics.load_reference_statistics(os.path.join(evaluation.root, cached[0]))[0], mean)


def test_a_weights_file_of_another_network_is_refused_by_flag(tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(metrics.MetricSetupError, match="--inception_weights"):
        metrics.load_inception(str(tmp_path / "other.safetensors"))


def test_split_membership():
    region_ids = np.array([0, 1, 2, 1])
    splits = split_membership(np.array([0, 1, 2, 3, 3]), region_ids, {0: ["seen"], 1: ["unseen"],
                                                                      2: ["unseen", "underrepresented"]},
                              ["a", "b", "a", "b"])
    assert splits["all"].all()
    assert splits["seen"].tolist() == [True, False, False, False, False]
    assert splits["unseen"].tolist() == [False, True, True, True, True]
    assert splits["underrepresented"].tolist() == [False, False, True, False, False]
    assert splits["category: b"].tolist() == [False, True, False, True, True]


# ----- the command, on the tiny teacher ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_eval_assets(assets, metric_networks, tmp_path_factory):
    import csv

    from diffusers import UNet2DConditionModel

    from aria_utils.families.unet_students import build_student
    from aria_utils.generate_teacher_data import main as generate_teacher_data

    root = tmp_path_factory.mktemp("image-evaluation")
    with open(assets["prompts"], encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    regions = shared_region_index(assets, [row["prompt"] for row in rows], 4)
    prompts = root / "prompts.csv"
    with open(prompts, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "category"])
        writer.writerows([(row["prompt"], row["category"]) for row in rows[::7][:16]])
    # A paired set of vehicle prompts only, so that regions of other prompts are unseen.
    vehicles = root / "vehicles.csv"
    with open(vehicles, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt"])
        writer.writerows([(row["prompt"],) for row in rows if row["category"] == "vehicles"][:8])
    generate_teacher_data(["--pretrained_model_name_or_path", assets["teacher"], "--prompt_file", str(vehicles),
                           "--num_prompts", "8", "--num_inference_steps", "1", "--batch_size", "8",
                           "--output_dir", str(root / "paired")])
    student = root / "student"
    build_student(UNet2DConditionModel.from_pretrained(assets["teacher"], subfolder="unet"), "bk_small") \
        .save_pretrained(str(student / "unet"))
    return dict(metric_networks, root=root, teacher=assets["teacher"], regions=regions,
                prompts=str(prompts), student=str(student), paired=str(root / "paired"))


def image_eval_argv(a, output, *extra, metric_names=("fid", "is", "clip")):
    argv = ["--teacher", a["teacher"], "--student", f"small={a['student']}", "--prompt_file", a["prompts"],
            "--region_cache_dir", a["regions"], "--paired_data_dir", a["paired"],
            "--output_dir", str(output), "--metrics", *metric_names, "--clip_model_name_or_path", a["clip"],
            "--image_inference_steps", "2", "--batch_size", "4", "--eval_resolution", "64", *extra]
    return argv + (["--inception_weights", a["inception"]] if {"fid", "is"} & set(metric_names) else [])


@pytest.fixture(scope="module")
def image_report(image_eval_assets):
    output = image_eval_assets["root"] / "report"
    return output, run_evaluation(parse_args(image_eval_argv(image_eval_assets, output)))


def test_report_has_every_metric_per_split_with_counts(image_report):
    output, report = image_report
    models = report["image_metrics"]["models"]
    assert list(models) == ["teacher", "small"]
    splits = models["small"]["splits"]
    assert splits["all"]["images"] == 16
    assert splits["seen"]["images"] + splits["unseen"]["images"] == 16
    # FID against the teacher's images of each split: the teacher is the reference, the student is some way off.
    assert all(n["fid"] is None for n in models["teacher"]["splits"].values())
    assert all(splits[s]["fid"] > 1e-3 for s in ("all", "seen", "unseen"))
    assert splits["all"]["fid"] > 1e-3 and splits["all"]["is"] >= 1.0 and -1 <= splits["all"]["clip"] <= 1
    assert "FID is biased" in splits["all"]["warning"]
    assert len(models["small"]["clip_per_region"]) >= 2
    assert models["small"]["unet_parameters"] < models["teacher"]["unet_parameters"]
    saved = json.load(open(output / "report.json"))
    assert saved["image_metrics"]["settings"]["eval_resolution"] == 64 and "torchmetrics" in saved["versions"]
    markdown = (output / "report.md").read_text()
    assert "| model | UNet parameters | FID ↓ | IS ↑ | CLIP ↑ | images |" in markdown
    assert "| teacher | 2.4M | reference |" in markdown
    assert "### Per split" in markdown and (output / "image_metrics.png").is_file()


def test_images_carry_prompt_index_and_seed(image_report):
    output, _ = image_report
    names = sorted(n for n in os.listdir(output / "images" / "small") if n.endswith(".png"))
    assert names == [f"p{i:07d}_s{i}.png" for i in range(16)]


def test_a_rerun_with_other_generation_settings_is_refused_by_flag(image_eval_assets, image_report):
    output, _ = image_report
    with pytest.raises(metrics.MetricSetupError, match="--image_inference_steps: 2 then, 3 now"):
        run_evaluation(parse_args(image_eval_argv(image_eval_assets, output, "--image_inference_steps", "3")))


def test_image_metric_flags_are_checked_before_loading(image_eval_assets, tmp_path, capsys):
    base = ["--teacher", image_eval_assets["teacher"], "--student", image_eval_assets["student"], "--prompt_file",
            image_eval_assets["prompts"], "--region_cache_dir", image_eval_assets["regions"], "--output_dir",
            str(tmp_path)]
    for extra, flag in ((["--inception_weights", "w.safetensors"], "--inception_weights"),
                        (["--metrics", "fid", "--fid_reference", str(tmp_path / "none.npz")], "--fid_reference"),
                        (["--metrics", "clip", "--clip_model_name_or_path", str(tmp_path / "no-clip")],
                         "--clip_model_name_or_path")):
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert flag in capsys.readouterr().err


def test_two_processes_killed_and_rerun_give_the_images_of_one_uninterrupted_process(image_eval_assets, tmp_path):
    """Generation is cut into chunks whose content depends on neither the process count nor a stop."""
    a = image_eval_assets
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process has it: the same kernels, the same bits
    try:
        run_evaluation(parse_args(image_eval_argv(a, single, "--batch_size", "2", "--category_column", "category",
                                                  metric_names=["clip"])))
    finally:
        torch.set_num_threads(threads)
    launched = tmp_path / "launched"
    command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", "-m", "aria_utils.evaluate",
               *image_eval_argv(a, launched, "--batch_size", "2", "--category_column", "category",
                                metric_names=["clip"])]
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    student_images = launched / "images" / "small"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if student_images.is_dir() and any(n.endswith(".png") for n in os.listdir(student_images)):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = sorted(n for n in os.listdir(student_images) if n.endswith(".png"))
    assert 0 < len(interrupted) < 16
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    launched_report = json.load(open(launched / "report.json"))
    for name in ("teacher", "small"):
        files = sorted(n for n in os.listdir(single / "images" / name) if n.endswith(".png"))
        assert len(files) == 16
        assert sorted(n for n in os.listdir(launched / "images" / name) if n.endswith(".png")) == files
        for file in files:
            assert (single / "images" / name / file).read_bytes() == (launched / "images" / name / file).read_bytes(), \
                (name, file)
    # The same command once more finds every image and every score: nothing is generated again.
    images = launched / "images" / "small"
    before = {name: os.stat(images / name).st_mtime_ns for name in os.listdir(images) if name.endswith(".png")}
    again = run_evaluation(parse_args(image_eval_argv(a, launched, "--batch_size", "2", "--category_column", "category",
                                                      metric_names=["clip"])))
    assert {name: os.stat(images / name).st_mtime_ns for name in before} == before
    assert again["image_metrics"]["models"]["small"]["splits"] == launched_report["image_metrics"]["models"]["small"]["splits"]
    # CLIP per category, from the category column.
    categories = [s for s in again["image_metrics"]["models"]["small"]["splits"] if s.startswith("category: ")]
    assert len(categories) >= 2 and sum(again["image_metrics"]["models"]["small"]["splits"][c]["images"]
                                        for c in categories) == 16
