"""The model card (README.md with YAML metadata) written next to the distilled student.

Built with huggingface_hub's ModelCard / ModelCardData, so the metadata is what the Hub validates:
`base_model` only when the teacher is a hub id (the Hub refuses a card whose base_model is a local
path), a license inherited from the teacher's family, and the hub datasets the student was trained on.
"""

import json
import os
import re
import shlex

TAGS = ["diffusers", "diffusers-training", "text-to-image", "stable-diffusion", "distillation", "bk-sdm", "aria"]


def default_license(unet_config):
    """A distilled student is a derivative of its teacher: it carries the licence of the teacher's family."""
    from aria_utils.families import family_of_config

    return family_of_config(unet_config).license(unet_config)


def hub_base_model(teacher, override=None):
    """The card's base_model: --hub_base_model, else the teacher when it is a hub id, else None."""
    if override:
        return override
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from aria_utils.publishing.hub import looks_like_local_path
    from aria_utils.families.single_file import is_single_file

    if os.path.exists(teacher) or is_single_file(teacher) or looks_like_local_path(teacher):
        return None
    try:
        validate_repo_id(teacher)
    except HFValidationError:
        return None
    return teacher


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


# Inline Markdown syntax; block syntax (headings, lists) needs a line start, which one-line text never has.
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def markdown_text(text, limit=120):
    """User text (a prompt, a path) as one line of plain Markdown: whitespace runs (newlines included)
    become one space, HTML and Markdown syntax are escaped so headings, links, tags and table pipes stay
    text, and long text is cut at `limit` characters."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "\u2026"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _region_table(region_report):
    lines = ["| region | distinctive words | prompts | representative prompt | final discrepancy | sampling probability "
             "| visits |", "|---|---|---|---|---|---|---|"]
    for region in region_report["regions"]:
        example = markdown_text(region["representatives"][0]) if region["representatives"] else ""
        words = markdown_text(", ".join(region.get("keywords", []))) or "-"
        lines.append(f"| {region['region']} | {words} | {region['size']} | {example} | {region['discrepancy']:.4f} | "
                     f"{region['probability']:.3f} | {region['visits']} |")
    return "\n".join(lines)


def _resume_changes(resume_history):
    """Lines saying which flags changed when the run was resumed (honoured from that step on)."""
    lines = []
    for entry in resume_history:
        changes = ", ".join(f"`--{name}` {markdown_text(before, 60)} -> {markdown_text(after, 60)}"
                            for name, (before, after) in entry["changed"].items())
        lines.append(f"- resumed at step {entry['step']} with {changes}")
    return lines


def write_model_card(output_dir, teacher, student_description, teacher_parameters, student_parameters, hyperparameters,
                     command, region_report=None, evaluation=None, validation_images=(), lora=False, base_model=None,
                     license="creativeml-openrail-m", datasets=(), repo_id=None, family=None, resume_history=(),
                     license_details=None, speed=None):
    """Write OUTPUT_DIR/README.md; returns its path. `repo_id` names the model in the usage snippet
    (the Hub repo when pushing, else the output folder); `family` (the teacher's, default Stable
    Diffusion 1.x/2.x) gives the snippet's pipeline and extra tags; `license_details` (license_name,
    license_link) go with a license "other"; `speed` is the measured speed-and-size table (markdown)."""
    from aria_utils.families.sd import STABLE_DIFFUSION

    from huggingface_hub import ModelCard, ModelCardData

    ratio = student_parameters / teacher_parameters if teacher_parameters else float("nan")
    hyperparameter_rows = "\n".join(
        f"| `{key}` | {markdown_text(value, 200)} |" for key, value in sorted(hyperparameters.items())
        if isinstance(value, (int, float, str, bool)) and value is not None)
    name = repo_id or output_dir
    family = family or STABLE_DIFFUSION
    pipeline_name = family.pipeline_class_name
    usage = [f'pipe = {pipeline_name}.from_pretrained("{name}")']
    if lora:
        usage.append(f'pipe.load_lora_weights("{name}")')
    teacher_link = f"[`{teacher}`](https://huggingface.co/{teacher})" if base_model == teacher else f"`{teacher}`"
    metadata = ModelCardData(base_model=base_model, license=license, library_name="diffusers",
                             pipeline_tag="text-to-image", tags=TAGS + list(family.card_tags) + (["lora"] if lora else []),
                             datasets=list(datasets) or None, **(license_details or {}))
    sections = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {os.path.basename(os.path.normpath(repo_id or output_dir))}",
        "",
        f"A {student_description} distilled from {teacher_link} with BK-SDM "
        "output and feature knowledge distillation, Random Conditioning, and ARIA's adaptive allocation of random "
        "conditions over regions of the prompt space.",
        "",
        f"| | {family.denoiser_description} parameters |",
        "|---|---|",
        f"| teacher | {teacher_parameters / 1e6:.1f}M |",
        f"| student | {student_parameters / 1e6:.1f}M ({ratio:.0%} of the teacher) |",
        "",
        "## Use",
        "",
        "```python",
        f"from diffusers import {pipeline_name}",
        "",
        *usage,
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
    if speed is not None:
        sections += ["", "## Speed and size", "", speed]
    if resume_history:
        sections += ["", "The run was resumed with changed flags, each honoured from the step given:", "",
                     *_resume_changes(resume_history)]
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
    ModelCard("\n".join(sections) + "\n").save(path)
    return path


def load_region_report(output_dir):
    path = os.path.join(output_dir, "aria_regions.json")
    return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None
