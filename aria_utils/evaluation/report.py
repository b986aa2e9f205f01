"""The evaluation's `report.md` and pictures, from the numbers in `report.json`."""

import os

import numpy as np

GROUP_ABBREVIATIONS = {"seen": "s", "unseen": "u", "underrepresented": "r"}


def _table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def _number(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def image_metric_lines(image_metrics):
    """BK-SDM's table form per split: model, UNet parameters, FID, IS, CLIP; image counts and warnings."""
    settings, models = image_metrics["settings"], image_metrics["models"]
    wants = settings["metrics"]
    reference = settings["fid_reference"]
    lines = ["## Image metrics", "",
             f"{settings['images_per_prompt']} image(s) per prompt at {settings['resolution']} px, "
             f"{settings['num_inference_steps']} sampler steps, guidance {settings['guidance_scale']}, scored at "
             f"{settings['eval_resolution'] or settings['resolution']} px. FID against "
             + ("the teacher's images of the same split" if reference == "teacher" else f"`{reference}`")
             + "; IS over up to 10 splits; CLIP score is the mean image-text cosine (BK-SDM's 0.2677 form).", ""]
    columns = [(key, label, digits) for key, label, digits in (
        ("fid", "FID ↓", 2), ("is", "IS ↑", 2), ("clip", "CLIP ↑", 4)) if key in wants]
    reference_row = reference == "teacher"

    def cell(name, numbers, key, digits):
        if key == "fid" and reference_row and name == "teacher":
            return "reference"
        return _number(numbers.get(key), digits)

    overall = [[name, f"{result['unet_parameters'] / 1e6:.1f}M"]
               + [cell(name, result["splits"]["all"], key, digits) for key, _, digits in columns]
               + [str(result["splits"]["all"]["images"])] for name, result in models.items()]
    lines += ["### All prompts (BK-SDM's table form)", ""]
    lines += _table(["model", "UNet parameters"] + [label for _, label, _ in columns] + ["images"], overall)
    first = next(iter(models.values()))["splits"]
    splits = [split for split in first if split != "all"]
    if splits:
        lines += ["", "### Per split", "", "Image counts are in the column headers."]
        for key, label, digits in columns:
            lines += ["", f"**{label}**", ""]
            lines += _table(["model"] + [f"{split} ({first[split]['images']})" for split in splits],
                            [[name] + [cell(name, result["splits"][split], key, digits) for split in splits]
                             for name, result in models.items()])
    small = [f"{split} ({first[split]['images']})" for split in first if "warning" in first[split]]
    if small:
        lines += ["", f"Warning: FID is biased upwards below {image_metrics['settings']['fid_min_images']} images "
                  f"(the Inception feature size); compare these splits only with splits of equal size: "
                  f"{', '.join(small)}."]
    lines.append("")
    if "clip" in wants:
        regions = list(next(iter(models.values()))["clip_per_region"])
        names = image_metrics.get("region_names", {})
        lines += ["### CLIP score per region", ""]
        lines += _table(["region"] + list(models), [[names.get(k, k)] + [_number(models[n]["clip_per_region"][k], 4)
                                                                         for n in models] for k in regions])
        lines.append("")
    return lines


def discrepancy_lines(report):
    students = list(report["students"])
    lines = [f"Noise seeds {report['noise_seeds']}, timesteps {report['timesteps']}", "",
             "## Overall noise-prediction discrepancy (teacher vs student MSE)", ""]
    groups = sorted({g for s in students for g in report["students"][s]["groups"]})
    rows = []
    for name in students:
        d = report["students"][name]["discrepancy"]
        rows.append([name, f"{d['mean']:.5f}", str(d["worst_region"]), f"{d['worst_region_mean']:.5f}",
                     f"{d['region_spread_std']:.5f}"] + [f"{report['students'][name]['groups'].get(g, float('nan')):.5f}"
                                                         for g in groups])
    lines += _table(["student", "mean", "worst region", "worst region mean", "spread (std)"] + groups, rows)
    lines += ["", "## Per region", ""]
    rows = []
    for region in report["regions"]:
        k = str(region["region"])
        cells = [k, ", ".join(region.get("keywords", [])) or "-", str(region["size"]),
                 ", ".join(region["labels"]) or "-",
                 (region["representatives"][0] if region["representatives"] else "").replace("|", "/")]
        cells += [f"{report['students'][n]['discrepancy']['per_region'].get(k, {}).get('mean', float('nan')):.5f}"
                  for n in students]
        cells += [f"{report['students'][n]['samples']['per_region'].get(k, {}).get('psnr', float('nan')):.2f}"
                  for n in students]
        rows.append(cells)
    lines += _table(["region", "distinctive words", "size", "groups", "representative"] + [f"{n} discrepancy" for n in students]
                    + [f"{n} PSNR" for n in students], rows)
    if any("per_category" in report["students"][n]["discrepancy"] for n in students):
        categories = sorted(report["students"][students[0]]["discrepancy"].get("per_category", {}))
        lines += ["", "## Per category", ""]
        lines += _table(["category"] + students, [[c] + [
            f"{report['students'][n]['discrepancy']['per_category'][c]:.5f}" for n in students] for c in categories])
    lines += ["", "## Per timestep", ""]
    lines += _table(["timestep"] + students, [[str(t)] + [
        f"{report['students'][n]['discrepancy']['per_timestep'][str(t)]:.5f}" for n in students]
        for t in report["timesteps"]])
    return lines + [""]


def write_markdown(path, report):
    lines = ["# Region-aware evaluation", "", f"Teacher: `{report['teacher']}`  ", f"Prompts: {report['num_prompts']} "
             f"from `{report['prompt_file']}`, {report['num_regions']} regions, seed {report['seed']}", ""]
    if "image_metrics" in report:
        lines += image_metric_lines(report["image_metrics"])
    if "students" in report:
        lines += discrepancy_lines(report)
    lines += [f"Command: `{report['command']}`", ""]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


def _grouped_bars(axis, series, categories, ylabel):
    """One bar per (category, series); `series` is {name: [value per category]} (None = no bar)."""
    width = 0.8 / max(1, len(series))
    for offset, (name, values) in enumerate(series.items()):
        axis.bar(np.arange(len(categories)) + offset * width,
                 [np.nan if value is None else value for value in values], width, label=name)
    axis.set_xticks(np.arange(len(categories)) + width * (len(series) - 1) / 2)
    axis.set_xticklabels(categories, rotation=30, ha="right")
    axis.set_ylabel(ylabel)
    axis.legend(fontsize="small")


def plot_image_metrics(image_metrics, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = image_metrics["models"]
    wants = [(key, label) for key, metric, label in (("fid", "fid", "FID (lower is better)"),
                                                     ("is", "is", "IS (higher is better)"),
                                                     ("clip", "clip", "CLIP score (higher is better)"))
             if metric in image_metrics["settings"]["metrics"]]
    splits = list(next(iter(models.values()))["splits"])
    figure, axes = plt.subplots(len(wants), 1, figsize=(max(7, 0.9 * len(splits) + 3), 3.2 * len(wants)),
                                squeeze=False)
    for axis, (key, label) in zip(axes[:, 0], wants):
        _grouped_bars(axis, {name: [r["splits"][s].get(key) for s in splits] for name, r in models.items()},
                      [f"{s}\n({next(iter(models.values()))['splits'][s]['images']} images)" for s in splits], label)
    figure.suptitle("Image metrics per split")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_discrepancy(report, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = list(report["students"])
    regions = [r["region"] for r in report["regions"]]
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(regions) + 2), 4))
    _grouped_bars(axis, {name: [report["students"][name]["discrepancy"]["per_region"].get(str(k), {}).get("mean")
                                for k in regions] for name in students},
                  [f"{r.get('label', k)}\n" + ",".join(GROUP_ABBREVIATIONS[label] for label in r["labels"])
                   for k, r in zip(regions, report["regions"])], "teacher-student noise MSE")
    axis.set_xlabel("region: its most distinctive words (s = seen, u = unseen in the paired set, r = rare in the corpus)")
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "discrepancy_per_region.png"), dpi=100)
    plt.close(figure)

    groups = sorted({g for n in students for g in report["students"][n]["groups"]})
    if groups:
        figure, axis = plt.subplots(figsize=(6, 4))
        _grouped_bars(axis, {name: [report["students"][name]["groups"].get(g) for g in groups] for name in students},
                      groups, "teacher-student noise MSE")
        figure.tight_layout()
        figure.savefig(os.path.join(output_dir, "discrepancy_per_group.png"), dpi=100)
        plt.close(figure)


def plot_reports(report, output_dir):
    if "image_metrics" in report:
        plot_image_metrics(report["image_metrics"], os.path.join(output_dir, "image_metrics.png"))
    if "students" in report:
        plot_discrepancy(report, output_dir)


def save_sample_grid(path, teacher_images, student_images, student_name, column_labels):
    """Teacher row over student row, each column labelled (prompt, region, seed); columns grouped by region."""
    from PIL import Image

    from aria_utils.training.validation_images import labelled_grid

    to_hwc = lambda images: images.permute(0, 2, 3, 1).numpy()  # noqa: E731
    Image.fromarray(labelled_grid([to_hwc(teacher_images), to_hwc(student_images)], ["teacher", student_name],
                                  column_labels, min_size=128)).save(path)
