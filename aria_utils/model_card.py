"""The model card (README.md with YAML metadata) written next to the distilled student."""

import json
import os
import shlex

TAGS = ["diffusers", "text-to-image", "stable-diffusion", "distillation", "bk-sdm", "aria"]


def redacted_command(argv, secret_flags):
    """The training command as typed, minus `secret_flags` (e.g. --hub_token) and their values."""
    kept, skip_next = [], False
    for item in argv:
        if skip_next:
            skip_next = False
            continue
        if item in secret_flags:
            skip_next = True
            continue
        if any(item.startswith(flag + "=") for flag in secret_flags):
            continue
        kept.append(item)
    return "accelerate launch train_aria_distill.py " + shlex.join(kept)


def _yaml_list(values):
    return "\n".join(f"- {value}" for value in values)


def _region_table(region_report):
    lines = ["| region | prompts | representative prompt | final discrepancy | sampling probability | visits |",
             "|---|---|---|---|---|---|"]
    for region in region_report["regions"]:
        example = (region["representatives"][0] if region["representatives"] else "").replace("|", "/")
        lines.append(f"| {region['region']} | {region['size']} | {example} | {region['discrepancy']:.4f} | "
                     f"{region['probability']:.3f} | {region['visits']} |")
    return "\n".join(lines)


def write_model_card(output_dir, teacher, student_description, teacher_parameters, student_parameters, hyperparameters,
                     command, region_report=None, evaluation=None, validation_images=(), lora=False):
    """Write OUTPUT_DIR/README.md; returns its path."""
    ratio = student_parameters / teacher_parameters if teacher_parameters else float("nan")
    hyperparameter_rows = "\n".join(
        f"| `{key}` | `{value}` |" for key, value in sorted(hyperparameters.items())
        if isinstance(value, (int, float, str, bool)) and value is not None)
    usage = ("pipe = StableDiffusionPipeline.from_pretrained(repo_id)\npipe.load_lora_weights(repo_id)"
             if lora else "pipe = StableDiffusionPipeline.from_pretrained(repo_id)")
    sections = [
        "---",
        f"base_model: {teacher}",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags:",
        _yaml_list(TAGS + (["lora"] if lora else [])),
        "---",
        "",
        f"# {os.path.basename(os.path.normpath(output_dir))}",
        "",
        f"A {student_description} distilled from [`{teacher}`](https://huggingface.co/{teacher}) with BK-SDM "
        "output and feature knowledge distillation, Random Conditioning, and ARIA's adaptive allocation of random "
        "conditions over regions of the prompt space.",
        "",
        "| | UNet parameters |",
        "|---|---|",
        f"| teacher | {teacher_parameters / 1e6:.1f}M |",
        f"| student | {student_parameters / 1e6:.1f}M ({ratio:.0%} of the teacher) |",
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        usage,
        'image = pipe("a photo of an astronaut riding a horse").images[0]',
        "```",
        "",
        "## Training",
        "",
        "```bash",
        command,
        "```",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        hyperparameter_rows,
    ]
    if region_report is not None:
        sections += ["", "## ARIA regions", "",
                     f"{region_report['num_regions']} regions of the condition corpus (k-means over "
                     f"`{region_report['embedding_model']}` embeddings), with the tracked teacher-student discrepancy "
                     "at the end of training:", "", _region_table(region_report)]
    if evaluation is not None:
        sections += ["", "## Evaluation", "", evaluation]
    if validation_images:
        sections += ["", "## Validation images", "", "Teacher row over student row, same prompts and seeds.", ""]
        sections += [f"![validation]({path})" for path in validation_images]
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(sections) + "\n")
    return path


def load_region_report(output_dir):
    path = os.path.join(output_dir, "aria_regions.json")
    return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None
