"""Region-aware evaluation of one or more students against their teacher.

    [accelerate launch -m] python -m aria_utils.evaluate --teacher T --student S [--student NAME=PATH ...] \
        --prompt_file heldout.csv [--prompt_column prompt] [--category_column category] \
        --region_cache_dir R --output_dir E [--paired_data_dir teacher-data] \
        [--metrics discrepancy fid is clip]

Two kinds of measurement (`--metrics`):
- `discrepancy` (default): the teacher-student noise-prediction gap per region, group, category and
  timestep, plus sample comparisons (evaluation/discrepancy.py). Main process only.
- `fid`, `is`, `clip`: the field's image metrics on images every model generates for the prompt file,
  overall and per split (evaluation/image_evaluation.py); generation and scoring are spread over the
  processes of `accelerate launch` and resume after a stop.

Writes `report.json` (machine-readable: command, seeds, versions, all numbers), `report.md`
(tables, including BK-SDM's form: UNet parameters, FID, IS, CLIP per group), `image_metrics.png`,
`discrepancy_per_region.png`, `discrepancy_per_group.png` (when groups exist) and
`samples_<student>.png` (teacher row over student row, grouped by region).
"""

import importlib.metadata
import logging
import os
import platform
import re
import shlex
import sys

import numpy as np
import torch

from aria_utils.cli import argument_parser, run_cli
from aria_utils.evaluation.discrepancy import (
    DiscrepancyEvaluator,
    EvaluationError,
    EvaluationSetup,
    check_compatible,
    default_timestep_grid,
    finite_psnr,
    group_means,
    initial_noise_seed,
    region_labels,
    summarise_discrepancy,
)
from aria_utils.evaluation.image_evaluation import FID_MIN_IMAGES, IMAGE_METRICS, ImageEvaluation, ImageMetricsConfig
from aria_utils.evaluation.image_metrics import DEFAULT_CLIP_MODEL
from aria_utils.evaluation.report import plot_reports, save_sample_grid, write_markdown
from aria_utils.files import write_json_atomically
from aria_utils.publishing.hub import pretrained_source_problem
from aria_utils.data.prompts import PromptCorpusError, check_prompt_file

logger = logging.getLogger(__name__)

TEACHER_NAME = "teacher"  # the teacher's image set; the reference of FID by default


# A student's name becomes part of file names (samples_<name>.png): no folders, no "..".
STUDENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_student(value):
    """(name, path) of a `--student [NAME=]PATH`. A path that exists is taken whole, '=' and all; otherwise
    NAME is what comes before the first '='."""
    name, separator, path = value.partition("=")
    if not separator or os.path.exists(value):
        path = value
        name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(os.path.normpath(value))).lstrip(".") or "student"
    if not STUDENT_NAME.match(name):
        raise ValueError(f"--student {value!r}: the name {name!r} may hold letters, digits, '.', '_' and '-' only "
                         "(it names the report's files); write --student NAME=PATH with such a NAME.")
    return name, path


def parse_args(argv=None):
    parser = argument_parser("Per-region teacher-student discrepancy of distilled students.")
    parser.add_argument("--teacher", required=True, help="Teacher pipeline: folder or hub id.")
    parser.add_argument("--student", action="append", required=True, metavar="[NAME=]PATH",
                        help="Student pipeline / UNet folder or hub id; repeat to compare several.")
    parser.add_argument("--prompt_file", required=True, help="Held-out prompts (txt/csv/tsv/json/jsonl/parquet).")
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--category_column", default=None)
    parser.add_argument("--max_prompts", type=int, default=None, help="Evaluate the first N prompts only.")
    parser.add_argument("--region_cache_dir", required=True, help="Region index from training or aria_utils.method.region_index.")
    parser.add_argument("--region_embedding_model", default=None,
                        help="Embedding model the region cache must have been built with (checked).")
    parser.add_argument("--paired_data_dir", default=None,
                        help="The training paired set: labels regions seen / unseen.")
    parser.add_argument("--underrepresented_fraction", type=float, default=0.02,
                        help="Regions with less than this share of the corpus are 'underrepresented'.")
    parser.add_argument("--noise_seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_timesteps", type=int, default=10, help="Size of the fixed timestep grid.")
    parser.add_argument("--num_inference_steps", type=int, default=10, help="DDIM steps of teacher/student samples.")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--num_sample_prompts_per_region", type=int, default=2)
    parser.add_argument("--metrics", nargs="+", choices=["discrepancy", *IMAGE_METRICS], default=["discrepancy"],
                        help="discrepancy: teacher-student noise gap per region; fid / is / clip: the field's image "
                             "metrics on generated images (README: Image metrics).")
    parser.add_argument("--image_resolution", type=int, default=None,
                        help="Generation size in pixels (default: the teacher's, e.g. 512 for SD-1.x).")
    parser.add_argument("--eval_resolution", type=int, default=256,
                        help="Images are resized to this before scoring (BK-SDM: 512 generated, 256 scored); "
                             "0 scores them as generated.")
    parser.add_argument("--image_inference_steps", type=int, default=25,
                        help="Sampler steps of the images for fid / is / clip (the teacher's own scheduler).")
    parser.add_argument("--images_per_prompt", type=int, default=1)
    parser.add_argument("--fid_reference", default="teacher",
                        help="'teacher' (each split against the teacher's images of that split), a pytorch-fid .npz "
                             "(mu, sigma; e.g. MS-COCO's) or a folder of reference images.")
    parser.add_argument("--inception_weights", default=None,
                        help="Local safetensors file of the FID Inception-v3 weights (default: the library's "
                             "download of the 2015-12-05 weights).")
    parser.add_argument("--clip_model_name_or_path", default=None,
                        help=f"transformers CLIPModel folder or hub id for the clip metric (default {DEFAULT_CLIP_MODEL}).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    args.command = "python -m aria_utils.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        check_prompt_file(args.prompt_file)
    except PromptCorpusError as error:
        parser.error(str(error))
    if not os.path.isfile(os.path.join(args.region_cache_dir, "regions.json")):
        parser.error(f"--region_cache_dir {args.region_cache_dir!r} holds no region index (regions.json); build one "
                     "with python -m aria_utils.method.region_index or pass the training run's OUTPUT_DIR/regions.")
    try:
        args.student = [parse_student(value) for value in args.student]
    except ValueError as error:
        parser.error(str(error))
    names = [name for name, _ in args.student]
    if len(set(names)) != len(names):
        parser.error(f"--student names must be unique, got {names}; use NAME=PATH.")
    problem = pretrained_source_problem(args.teacher, "--teacher", ["scheduler/", "vae/"])
    for _, path in args.student:
        problem = problem or pretrained_source_problem(path, "--student")
    problem = problem or image_metric_flags_problem(args)
    if problem:
        parser.error(problem)
    return args


def image_metric_flags_problem(args):
    """What is wrong with the image-metric flags, checked before any model is loaded; None if nothing."""
    wanted = set(args.metrics)
    unused = [flag for flag, metric_set, given in (
        ("--inception_weights", {"fid", "is"}, args.inception_weights is not None),
        ("--fid_reference", {"fid"}, args.fid_reference != "teacher"),
        ("--clip_model_name_or_path", {"clip"}, args.clip_model_name_or_path is not None)) if given and not wanted & metric_set]
    if unused:
        return (f"{unused[0]} is given but no metric that uses it is in --metrics {' '.join(args.metrics)}; add "
                "fid / is / clip to --metrics or drop the flag.")
    if not wanted & set(IMAGE_METRICS):
        return None
    for flag in ("image_inference_steps", "images_per_prompt", "batch_size"):
        if getattr(args, flag) < 1:
            return f"--{flag} must be at least 1, got {getattr(args, flag)}."
    if args.eval_resolution < 0 or (args.image_resolution is not None and args.image_resolution % 8):
        return ("--eval_resolution must be >= 0 (0 = as generated) and --image_resolution a multiple of 8, got "
                f"{args.eval_resolution} and {args.image_resolution}.")
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        return (f"--inception_weights {args.inception_weights!r} is not a file; give the safetensors file of the "
                "FID Inception weights (README: Image metrics) or leave the flag out to use the library's download.")
    reference = args.fid_reference
    if reference != "teacher" and not (os.path.isdir(reference) or (reference.endswith(".npz")
                                                                      and os.path.isfile(reference))):
        return (f"--fid_reference {reference!r} is neither 'teacher', an existing .npz of pytorch-fid statistics, nor "
                "a folder of reference images.")
    if "clip" in wanted:
        args.clip_model_name_or_path = args.clip_model_name_or_path or DEFAULT_CLIP_MODEL
        problem = pretrained_source_problem(args.clip_model_name_or_path, "--clip_model_name_or_path",
                                            ["config.json"])
        if problem:
            return problem
    for name, path in args.student:
        if name == TEACHER_NAME and os.path.realpath(path) != os.path.realpath(args.teacher):
            return (f"--student {TEACHER_NAME}={path}: with image metrics the name {TEACHER_NAME!r} is the teacher's "
                    "image set; give this student another NAME.")
    return None


def unet_source(path, teacher_path):
    """(folder or hub id, subfolder) of a model's denoiser (UNet or transformer) weights and config. `path` None is
    the teacher; a LoRA folder's base is its own denoiser folder when it has one (a LoRA-trained BK student), else
    the teacher's."""
    from aria_utils.families import DENOISER_FOLDERS
    from aria_utils.training.lora import LORA_WEIGHT_NAME

    def own_folder(base):
        return next((folder for folder in DENOISER_FOLDERS if os.path.isdir(os.path.join(base, folder))), None)

    base = path or teacher_path
    if os.path.isfile(os.path.join(base, LORA_WEIGHT_NAME)) and own_folder(base) is None:
        base = teacher_path
    if not os.path.isdir(base):  # a hub id: its family says where its denoiser is
        from aria_utils.families import family_of_pipeline

        return base, family_of_pipeline(base).denoiser_folder
    return base, own_folder(base)


def load_student_unet(path, teacher_path=None):
    """A student denoiser from a pipeline / denoiser folder or hub id, or a LoRA folder fused onto its base."""
    from aria_utils.training.lora import LORA_WEIGHT_NAME
    from aria_utils.families import family_of_config, family_of_pipeline

    base, subfolder = unet_source(path, teacher_path)
    if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
        family = family_of_pipeline(base)
        cls, extra = family.pipeline_class()
        pipeline = cls.from_pretrained(base, **extra)
        pipeline.load_lora_weights(path, weight_name=LORA_WEIGHT_NAME)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
        return getattr(pipeline, family.denoiser_folder)
    denoiser_class = family_of_config(unet_config(path, teacher_path)).denoiser_class()
    return denoiser_class.from_pretrained(base, subfolder=subfolder)


def versions():
    import accelerate
    import diffusers
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
             "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    for package in ("torchmetrics", "torch-fidelity"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def unet_config(path, teacher_path):
    """The config of a model's denoiser (`path` None: the teacher's), as `load_student_unet` resolves it."""
    from aria_utils.families import load_denoiser_config

    base, subfolder = unet_source(path, teacher_path)
    return load_denoiser_config(base, subfolder=subfolder)


def unet_parameter_count(config):
    """Parameters of a denoiser, from its config on the meta device (nothing is loaded)."""
    from aria_utils.evaluation.speed import count_parameters
    from aria_utils.families import denoiser_on_meta_device

    return count_parameters(denoiser_on_meta_device(config))


def sample_prompt_indices(region_ids, per_region):
    chosen = []
    for region in sorted(set(region_ids.tolist())):
        chosen.extend(np.flatnonzero(region_ids == region)[:per_region].tolist())
    return chosen


def compute_dtype(args, device):
    if args.mixed_precision == "fp16" and device.type == "cpu":
        raise EvaluationError("--mixed_precision fp16 needs a GPU; use bf16 or no on CPU.")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)


def load_evaluation_inputs(args):
    """Prompts, categories, their regions and the regions' groups (seen / unseen / underrepresented)."""
    from aria_utils.data.paired_data import load_paired_latents
    from aria_utils.data.prompts import load_prompt_corpus
    from aria_utils.method.region_index import load_region_index, model_identity

    index = load_region_index(args.region_cache_dir)
    if args.region_embedding_model is not None and model_identity(args.region_embedding_model) != \
            index.fingerprint["embedding_model"]:
        raise EvaluationError(
            f"--region_cache_dir {args.region_cache_dir!r} was built with {index.fingerprint['embedding_model']!r}, "
            f"not --region_embedding_model {args.region_embedding_model!r}; rebuild it or drop the flag.")
    corpus = load_prompt_corpus(prompt_file=args.prompt_file, prompt_column=args.prompt_column,
                                category_column=args.category_column)
    prompts = corpus.prompts[: args.max_prompts]
    categories = corpus.categories[: args.max_prompts] if corpus.categories is not None else None
    region_ids = index.assign_prompts(prompts)
    paired_region_ids = None
    if args.paired_data_dir is not None:
        paired_region_ids = index.assign_prompts(load_paired_latents(args.paired_data_dir).captions)
    labels = region_labels(index.num_regions, index.sizes, paired_region_ids, args.underrepresented_fraction)
    return index, prompts, categories, region_ids, labels


def evaluate_images(args, state, prompts, categories, region_ids, labels):
    """FID / IS / CLIP of the teacher's and every student's images, on every process; numbers on the main one."""
    from aria_utils.families import family_of_pipeline

    models = {TEACHER_NAME: None, **{name: path for name, path in args.student
                                     if not (name == TEACHER_NAME)}}  # a student named 'teacher' is the teacher
    configs = {name: unet_config(path, args.teacher) for name, path in models.items()}
    for name, student_config in configs.items():  # before minutes of loading and generating
        check_compatible(configs[TEACHER_NAME], student_config, name)
    dtype = compute_dtype(args, state.device)
    family = family_of_pipeline(args.teacher)
    cls, extra = family.pipeline_class()
    teacher_pipeline = cls.from_pretrained(args.teacher, **extra)
    scale = 2 ** (len(teacher_pipeline.vae.config.block_out_channels) - 1)
    config = ImageMetricsConfig(
        metrics=tuple(m for m in args.metrics if m in IMAGE_METRICS),
        resolution=args.image_resolution or configs[TEACHER_NAME]["sample_size"] * scale,
        eval_resolution=args.eval_resolution or None, num_inference_steps=args.image_inference_steps,
        guidance_scale=args.guidance_scale, images_per_prompt=args.images_per_prompt, seed=args.seed,
        batch_size=args.batch_size, fid_reference=args.fid_reference, inception_weights=args.inception_weights,
        clip_model_name_or_path=args.clip_model_name_or_path)
    images = ImageEvaluation(config, args.output_dir, prompts, region_ids, labels, categories)
    scorers = images.load_scorers("cpu")  # a wrong weights file or CLIP model shows now, not after the generation
    images.check_settings({name: path or TEACHER_NAME for name, path in models.items()}, state.is_main_process)
    state.wait_for_everyone()  # the main process has removed its last run's partial files: generation may start
    teacher_pipeline.to(state.device, dtype)
    images.generate(teacher_pipeline, models, lambda path: load_student_unet(path, args.teacher), state,
                    denoiser_folder=family.denoiser_folder)
    del teacher_pipeline
    images.move_scorers(scorers, state.device)
    score_folders = images.score(list(models), scorers, state)
    if not state.is_main_process:
        return None
    results = images.summarise(score_folders, TEACHER_NAME, scorers)
    for name in models:
        results[name]["unet_parameters"] = unet_parameter_count(configs[name])
        results[name]["image_folder"] = images.folder(name)
    settings = dict(vars(config), metrics=list(config.metrics),
                    scoring=config.scoring_settings(), fid_min_images=FID_MIN_IMAGES)
    return {"settings": settings, "models": results}


def evaluate_discrepancy(args, index, prompts, categories, region_ids, labels, report):
    """The noise-prediction gap and sample comparisons of every student (main process)."""
    from aria_utils.families import load_frozen_teacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(args, device)
    teacher = load_frozen_teacher(args.teacher)
    teacher_unet, vae, scheduler = teacher.unet, teacher.vae, teacher.noise_scheduler
    students = {name: load_student_unet(path, args.teacher) for name, path in args.student}
    for name, unet in students.items():
        check_compatible(teacher_unet, unet, name)
    for model in [teacher_unet, *teacher.text_encoders, vae, *students.values()]:
        model.to(device, dtype).eval().requires_grad_(False)

    setup = EvaluationSetup(
        prompts=prompts, region_ids=region_ids, categories=categories, noise_seeds=tuple(args.noise_seeds),
        timesteps=tuple(default_timestep_grid(scheduler.config.num_train_timesteps, args.num_timesteps)),
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        batch_size=args.batch_size, seed=args.seed)
    evaluator = DiscrepancyEvaluator(teacher_unet, teacher.prompt_encoder(), scheduler, vae, device, dtype)
    sample_indices = sample_prompt_indices(region_ids, args.num_sample_prompts_per_region)
    teacher_samples = evaluator.teacher_samples(setup, sample_indices)
    report.update({"noise_seeds": list(setup.noise_seeds), "timesteps": list(setup.timesteps),
                   "num_inference_steps": args.num_inference_steps, "students": {}})
    sample_regions = region_ids[sample_indices]
    sample_labels = [f"{prompts[i]}\nregion {index.label(int(region_ids[i]))}; "
                     f"seed {initial_noise_seed(args.seed, setup.noise_seeds[0], i)}" for i in sample_indices]
    for name, unet in students.items():
        logger.info("Evaluating %s", name)
        per_sample = evaluator.noise_discrepancy(unet, setup)
        discrepancy = summarise_discrepancy(per_sample, setup, index.num_regions)
        samples = evaluator.sample_comparison(unet, setup, sample_indices, teacher_samples)
        per_region_samples = {}
        for region in sorted(set(sample_regions.tolist())):
            members = sample_regions == region
            per_region_samples[str(region)] = {"latent_mse": float(samples["latent_mse"][members].mean()),
                                               "psnr": finite_psnr(samples["psnr"][members].mean())}
        discrepancy["per_region"] = {str(k): v for k, v in discrepancy["per_region"].items()}
        discrepancy["per_timestep"] = {str(k): v for k, v in discrepancy["per_timestep"].items()}
        report["students"][name] = {
            "path": dict(args.student)[name],
            "discrepancy": discrepancy,
            "groups": group_means({int(k): v for k, v in discrepancy["per_region"].items()}, labels),
            "samples": {"latent_mse": float(samples["latent_mse"].mean()),
                        "psnr": finite_psnr(samples["psnr"].mean()), "per_region": per_region_samples},
        }
        save_sample_grid(os.path.join(args.output_dir, f"samples_{name}.png"), samples["teacher_images"],
                         samples["student_images"], name, sample_labels)


def run_evaluation(args):
    """Every requested measurement; the report on the main process (others return None)."""
    from accelerate import PartialState

    state = PartialState()
    os.makedirs(args.output_dir, exist_ok=True)
    index, prompts, categories, region_ids, labels = load_evaluation_inputs(args)
    report = {"teacher": args.teacher, "prompt_file": args.prompt_file, "num_prompts": len(prompts),
              "num_regions": index.num_regions, "metrics": list(args.metrics), "seed": args.seed,
              "guidance_scale": args.guidance_scale, "num_processes": state.num_processes,
              "versions": versions(), "command": args.command}
    if set(args.metrics) & set(IMAGE_METRICS):
        report["image_metrics"] = evaluate_images(args, state, prompts, categories, region_ids, labels)
    if not state.is_main_process:
        return None
    if "image_metrics" in report:
        report["image_metrics"]["region_names"] = {str(k): index.label(k) for k in range(index.num_regions)}
    if "discrepancy" in args.metrics:
        evaluate_discrepancy(args, index, prompts, categories, region_ids, labels, report)
    report["regions"] = [dict(region, labels=labels[region["region"]]) for region in index.describe()]
    write_json_atomically(os.path.join(args.output_dir, "report.json"), report)
    write_markdown(os.path.join(args.output_dir, "report.md"), report)
    plot_reports(report, args.output_dir)
    return report


def main(argv=None):
    from aria_utils.quiet import silence_known_harmless_messages

    silence_known_harmless_messages()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    report = run_evaluation(args)
    if report is None:  # not the main process of a launch: the main one reports
        return
    for name, result in report.get("image_metrics", {}).get("models", {}).items():
        overall = result["splits"]["all"]
        print(f"{name}: " + ", ".join(f"{key} {overall[key]:.4f}" for key in ("fid", "is", "clip")
                                      if overall.get(key) is not None) + f" ({overall['images']} images)")
    for name, result in report.get("students", {}).items():
        d = result["discrepancy"]
        print(f"{name}: mean {d['mean']:.5f}, worst region {d['worst_region']} ({d['worst_region_mean']:.5f}), "
              f"groups {result['groups']}")
    print(f"Report written to {args.output_dir}/report.md")

if __name__ == "__main__":
    run_cli(main)
