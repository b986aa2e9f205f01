"""Region-aware evaluation of one or more students against their teacher.

    python -m aria_utils.evaluate --teacher T --student S [--student NAME=PATH ...] \
        --prompt_file heldout.csv [--prompt_column prompt] [--category_column category] \
        --region_cache_dir R --output_dir E [--paired_data_dir teacher-data]

Writes `report.json` (machine-readable: command, seeds, versions, all numbers), `report.md`
(tables), `discrepancy_per_region.png`, `discrepancy_per_group.png` (when groups exist) and
`samples_<student>.png` (teacher row over student row, grouped by region).
"""

import json
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
    region_labels,
    summarise_discrepancy,
)
from aria_utils.publishing.hub import pretrained_source_problem
from aria_utils.data.prompts import PromptCorpusError, check_prompt_file

logger = logging.getLogger(__name__)


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
    parser.add_argument("--clip_model_name_or_path", default=None, help="transformers CLIPModel for CLIP scores.")
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
    problem = pretrained_source_problem(args.teacher, "--teacher", ["unet/config.json", "scheduler/", "vae/"])
    for _, path in args.student:
        problem = problem or pretrained_source_problem(path, "--student")
    if problem:
        parser.error(problem)
    return args


def load_student_unet(path, teacher_path=None):
    """A student UNet from a pipeline / UNet folder or hub id, or a LoRA folder fused onto its base.

    A LoRA folder's base is its own `unet/` when it has one (a LoRA-trained BK student), else the teacher's.
    """
    from diffusers import UNet2DConditionModel

    from aria_utils.training.lora import LORA_WEIGHT_NAME
    from aria_utils.families import family_of_pipeline

    if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
        base = path if os.path.isdir(os.path.join(path, "unet")) else teacher_path
        cls, extra = family_of_pipeline(base).pipeline_class()
        pipeline = cls.from_pretrained(base, **extra)
        pipeline.load_lora_weights(path, weight_name=LORA_WEIGHT_NAME)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
        return pipeline.unet
    subfolder = "unet" if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "unet")) else None
    return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder)


def versions():
    import accelerate
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def _projected(output):
    """Normalised projected embeddings: a tensor (transformers 4) or an output's pooler_output (5)."""
    features = output if torch.is_tensor(output) else output.pooler_output
    return torch.nn.functional.normalize(features, dim=-1)


def clip_scores(model_path, prompts, images, device):
    """CLIP score per image: max(cos(image, text), 0). Images are (N, 3, H, W) in [0, 1]."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_path).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model_path)
    pil_images = [(image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for image in images]
    with torch.no_grad():
        inputs = processor(text=list(prompts), images=pil_images, return_tensors="pt", padding=True, truncation=True)
        inputs = {key: value.to(device) for key, value in inputs.items()}
        image_features = _projected(model.get_image_features(pixel_values=inputs["pixel_values"]))
        text_features = _projected(model.get_text_features(input_ids=inputs["input_ids"],
                                                           attention_mask=inputs["attention_mask"]))
    return (image_features * text_features).sum(-1).clamp(min=0).cpu().double().numpy()


def sample_prompt_indices(region_ids, per_region):
    chosen = []
    for region in sorted(set(region_ids.tolist())):
        chosen.extend(np.flatnonzero(region_ids == region)[:per_region].tolist())
    return chosen


def write_markdown(path, report):
    students = list(report["students"])
    lines = ["# Region-aware evaluation", "", f"Teacher: `{report['teacher']}`  ", f"Prompts: {report['num_prompts']} "
             f"from `{report['prompt_file']}`, {report['num_regions']} regions, noise seeds {report['noise_seeds']}, "
             f"timesteps {report['timesteps']}", "", "## Overall noise-prediction discrepancy (teacher vs student MSE)",
             ""]
    groups = sorted({g for s in students for g in report["students"][s]["groups"]})
    header = ["student", "mean", "worst region", "worst region mean", "spread (std)"] + groups
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in students:
        d = report["students"][name]["discrepancy"]
        row = [name, f"{d['mean']:.5f}", str(d["worst_region"]), f"{d['worst_region_mean']:.5f}",
               f"{d['region_spread_std']:.5f}"] + [f"{report['students'][name]['groups'].get(g, float('nan')):.5f}"
                                                   for g in groups]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Per region", "", "| region | size | labels | representative | "
              + " | ".join(f"{name} discrepancy" for name in students) + " | "
              + " | ".join(f"{name} PSNR" for name in students) + " |",
              "|" + "---|" * (4 + 2 * len(students))]
    for region in report["regions"]:
        k = str(region["region"])
        cells = [k, str(region["size"]), ", ".join(region["labels"]) or "-",
                 (region["representatives"][0] if region["representatives"] else "").replace("|", "/")]
        cells += [f"{report['students'][n]['discrepancy']['per_region'].get(k, {}).get('mean', float('nan')):.5f}"
                  for n in students]
        cells += [f"{report['students'][n]['samples']['per_region'].get(k, {}).get('psnr', float('nan')):.2f}"
                  for n in students]
        lines.append("| " + " | ".join(cells) + " |")
    if any("per_category" in report["students"][n]["discrepancy"] for n in students):
        categories = sorted(report["students"][students[0]]["discrepancy"].get("per_category", {}))
        lines += ["", "## Per category", "", "| category | " + " | ".join(students) + " |",
                  "|" + "---|" * (1 + len(students))]
        for category in categories:
            lines.append(f"| {category} | " + " | ".join(
                f"{report['students'][n]['discrepancy']['per_category'][category]:.5f}" for n in students) + " |")
    lines += ["", "## Per timestep", "", "| timestep | " + " | ".join(students) + " |", "|" + "---|" * (1 + len(students))]
    for t in report["timesteps"]:
        lines.append(f"| {t} | " + " | ".join(
            f"{report['students'][n]['discrepancy']['per_timestep'][str(t)]:.5f}" for n in students) + " |")
    lines += ["", f"CLIP score: {report['clip_note']}", "", f"Command: `{report['command']}`", ""]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


def plot_reports(report, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = list(report["students"])
    regions = [r["region"] for r in report["regions"]]
    width = 0.8 / len(students)
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(regions) + 2), 4))
    for offset, name in enumerate(students):
        per_region = report["students"][name]["discrepancy"]["per_region"]
        values = [per_region.get(str(k), {}).get("mean", np.nan) for k in regions]
        axis.bar(np.arange(len(regions)) + offset * width, values, width, label=name)
    axis.set_xticks(np.arange(len(regions)) + width * (len(students) - 1) / 2)
    short = {"seen": "s", "unseen": "u", "underrepresented": "r"}
    axis.set_xticklabels([f"{k}\n" + ",".join(short[l] for l in r["labels"]) for k, r in zip(regions, report["regions"])])
    axis.set_xlabel("region (s = seen, u = unseen in the paired set, r = rare in the corpus)")
    axis.set_ylabel("teacher-student noise MSE")
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "discrepancy_per_region.png"), dpi=100)
    plt.close(figure)

    groups = sorted({g for n in students for g in report["students"][n]["groups"]})
    if groups:
        figure, axis = plt.subplots(figsize=(6, 4))
        for offset, name in enumerate(students):
            values = [report["students"][name]["groups"].get(g, np.nan) for g in groups]
            axis.bar(np.arange(len(groups)) + offset * width, values, width, label=name)
        axis.set_xticks(np.arange(len(groups)) + width * (len(students) - 1) / 2)
        axis.set_xticklabels(groups)
        axis.set_ylabel("teacher-student noise MSE")
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(output_dir, "discrepancy_per_group.png"), dpi=100)
        plt.close(figure)


def save_sample_grid(path, teacher_images, student_images):
    """Teacher row over student row; columns are already grouped by region."""
    from PIL import Image

    from aria_utils.training.validation_images import image_grid

    to_hwc = lambda images: images.permute(0, 2, 3, 1).numpy()  # noqa: E731
    Image.fromarray(image_grid([to_hwc(teacher_images), to_hwc(student_images)])).save(path)


def run_evaluation(args):

    from aria_utils.data.paired_data import load_paired_latents
    from aria_utils.data.prompts import load_prompt_corpus
    from aria_utils.method.region_index import load_region_index, model_identity
    from aria_utils.families import load_frozen_teacher

    os.makedirs(args.output_dir, exist_ok=True)
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

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if dtype == torch.float16 and device == "cpu":
        raise EvaluationError("--mixed_precision fp16 needs a GPU; use bf16 or no on CPU.")
    teacher = load_frozen_teacher(args.teacher)
    teacher_unet, vae, scheduler = teacher.unet, teacher.vae, teacher.noise_scheduler
    students = {name: load_student_unet(path, args.teacher) for name, path in args.student}
    for name, unet in students.items():
        check_compatible(teacher_unet, unet, name)
    for model in [teacher_unet, *teacher.text_encoders, vae, *students.values()]:
        model.to(device, dtype).eval().requires_grad_(False)

    region_ids = index.assign_prompts(prompts)
    paired_region_ids = None
    if args.paired_data_dir is not None:
        paired_region_ids = index.assign_prompts(load_paired_latents(args.paired_data_dir).captions)
    labels = region_labels(index.num_regions, index.sizes, paired_region_ids, args.underrepresented_fraction)

    setup = EvaluationSetup(
        prompts=prompts, region_ids=region_ids, categories=categories, noise_seeds=tuple(args.noise_seeds),
        timesteps=tuple(default_timestep_grid(scheduler.config.num_train_timesteps, args.num_timesteps)),
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        batch_size=args.batch_size, seed=args.seed)
    evaluator = DiscrepancyEvaluator(teacher_unet, teacher.prompt_encoder(), scheduler, vae, device, dtype)
    sample_indices = sample_prompt_indices(region_ids, args.num_sample_prompts_per_region)
    teacher_samples = evaluator.teacher_samples(setup, sample_indices)

    clip_note = "skipped: no --clip_model_name_or_path given"
    report = {"teacher": args.teacher, "prompt_file": args.prompt_file, "num_prompts": len(prompts),
              "num_regions": index.num_regions, "noise_seeds": list(setup.noise_seeds),
              "timesteps": list(setup.timesteps), "seed": args.seed, "num_inference_steps": args.num_inference_steps,
              "guidance_scale": args.guidance_scale, "versions": versions(),
              "command": args.command, "students": {}}
    sample_regions = region_ids[sample_indices]
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
        if args.clip_model_name_or_path:
            scores = clip_scores(args.clip_model_name_or_path, [prompts[i] for i in sample_indices],
                                 samples["student_images"], device)
            for region in per_region_samples:
                per_region_samples[region]["clip_score"] = float(scores[sample_regions == int(region)].mean())
            clip_note = f"computed with {args.clip_model_name_or_path}"
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
                         samples["student_images"])
    if not args.clip_model_name_or_path:
        print("CLIP score skipped: pass --clip_model_name_or_path with a local transformers CLIPModel to compute it.")
    report["clip_note"] = clip_note
    report["regions"] = [dict(region, labels=labels[region["region"]]) for region in index.describe()]
    with open(os.path.join(args.output_dir, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    write_markdown(os.path.join(args.output_dir, "report.md"), report)
    plot_reports(report, args.output_dir)
    return report


def main(argv=None):
    from aria_utils.quiet import silence_known_harmless_messages

    silence_known_harmless_messages()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    report = run_evaluation(args)
    for name, result in report["students"].items():
        d = result["discrepancy"]
        print(f"{name}: mean {d['mean']:.5f}, worst region {d['worst_region']} ({d['worst_region_mean']:.5f}), "
              f"groups {result['groups']}")
    print(f"Report written to {args.output_dir}/report.md")


if __name__ == "__main__":
    run_cli(main)
