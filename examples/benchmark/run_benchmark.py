"""Does ARIA beat Random Conditioning? One command, from scratch, offline, on CPU.

    python examples/benchmark/run_benchmark.py --output_dir bench            # 300-step budget (see README)
    python examples/benchmark/run_benchmark.py --output_dir bench --quick    # 60-step budget
    python examples/benchmark/run_benchmark.py --output_dir bench --quick --ablations

Setting (RC's unseen-concept test): a categorised prompt corpus (default: the built-in demo corpus;
any file with a category column works, e.g. PartiPrompts); held-out prompts for every category; a
paired set of teacher latents that leaves one category out entirely (unseen) while another stays
at its natural ~1.5 % (underrepresented). Every method gets the same teacher, student, paired set,
steps and batch; all students are evaluated with the region-aware evaluation on the held-out
prompts. Writes results.md / results.json and plots into --output_dir.
"""

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

METHODS = ("paired", "random", "region_uniform", "aria")
INITIAL = "no_training"  # the shared starting student, evaluated alongside as the reference
# Tracker options that matter, each against the default aria run.
ABLATIONS = {
    "aria_tau0.5": ["--aria_temperature", "0.5"],
    "aria_tau2": ["--aria_temperature", "2.0"],
    "aria_eps0.3": ["--aria_uniform_mix", "0.3"],
    "aria_no_timestep_norm": ["--no-aria_normalize_timesteps"],
    "aria_importance_weights": ["--aria_importance_weighting"],
}
BUDGETS = {  # student steps, batch, held-out prompts per category, paired prompts, evaluation grid
    "quick": dict(steps=60, batch=8, heldout=6, paired=128, eval_every=20, eval_timesteps=5, noise_seeds=["0"]),
    "default": dict(steps=300, batch=16, heldout=12, paired=256, eval_every=50, eval_timesteps=10,
                    noise_seeds=["0", "1"]),
}
# Below this share of output variance explained by the prompt, every allocation strategy looks alike
# and the comparison says nothing (see conditioned_teacher.py).
MIN_PROMPT_SHARE = 0.05


def log(message):
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command, log_path):
    with open(log_path, "w", encoding="utf-8") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    if result.returncode != 0:
        raise SystemExit(f"Failed ({result.returncode}): {' '.join(command)}\nSee {log_path}")


def split_corpus(prompt_file, prompt_column, category_column, heldout_per_category, output_dir, seed):
    """Held-out prompts (some of every category) and the training corpus (the rest)."""
    from aria_utils.prompts import load_prompt_corpus

    corpus = load_prompt_corpus(prompt_file=prompt_file, prompt_column=prompt_column, category_column=category_column)
    rng = random.Random(seed)
    by_category = {}
    for prompt, category in zip(corpus.prompts, corpus.categories):
        by_category.setdefault(category, []).append(prompt)
    heldout, train = [], []
    for category, prompts in sorted(by_category.items()):
        prompts = prompts[:]
        rng.shuffle(prompts)
        count = min(heldout_per_category, max(1, len(prompts) // 3))
        heldout += [(p, category) for p in prompts[:count]]
        train += [(p, category) for p in prompts[count:]]
    paths = {}
    for name, rows in (("train", train), ("heldout", heldout)):
        paths[name] = os.path.join(output_dir, f"{name}_prompts.csv")
        with open(paths[name], "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["prompt", "category"])
            writer.writerows(rows)
    return paths, sorted(by_category)


def save_initial_student(teacher, student_config, output_dir):
    """The student every method starts from (BK-SDM init from the teacher): the 'no training' reference."""
    from diffusers import UNet2DConditionModel

    from aria_utils.students import build_student

    if not os.path.isdir(os.path.join(output_dir, "unet")):
        teacher_unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
        build_student(teacher_unet, student_config).save_pretrained(os.path.join(output_dir, "unet"))
    return output_dir


def mean_std(values):
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(values) == 0:
        return None
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist()}


def fmt(stat, scale=1.0, digits=4, unit=""):
    if stat is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}{unit}"


def collect(method_runs, reports, unseen, underrepresented):
    """results[method] = metric -> mean/std over seeds."""
    results = {}
    for method, runs in method_runs.items():
        rows = {"overall": [], "worst_region": [], "unseen": [], "underrepresented": [], "seen_categories": [],
                "step_time": [], "samples_per_second": [], "tracker_fraction": []}
        for seed, run_dir in runs.items():
            student = reports[seed]["students"][method]["discrepancy"]
            summary_path = os.path.join(run_dir, "train_summary.json") if run_dir else None
            per_category = student.get("per_category", {})
            rows["overall"].append(student["mean"])
            rows["worst_region"].append(student["worst_region_mean"])
            rows["unseen"].append(per_category.get(unseen))
            rows["underrepresented"].append(per_category.get(underrepresented))
            others = [v for c, v in per_category.items() if c not in (unseen, underrepresented)]
            rows["seen_categories"].append(float(np.mean(others)) if others else None)
            summary = json.load(open(summary_path)) if summary_path else {}
            rows["step_time"].append(summary.get("mean_step_time"))
            rows["samples_per_second"].append(summary.get("samples_per_second"))
            rows["tracker_fraction"].append(summary.get("tracker_fraction"))
        results[method] = {name: mean_std(values) for name, values in rows.items()}
    return results


def write_results(results, config, output_dir, command):
    lines = [
        "# ARIA vs Random Conditioning: benchmark results", "",
        f"Command: `{command}`  ", f"Machine: {config['machine']}  ",
        f"Budget: {config['budget']} ({config['steps']} steps, batch {config['batch']}, student {config['student']}, "
        f"{config['num_regions']} regions), seeds {config['seeds']}  ",
        f"Unseen category: `{config['unseen']}` (no paired latents); underrepresented: `{config['underrepresented']}`  ",
        f"Teacher: the prompt explains {config['teacher_conditioning']['prompt_share']:.1%} of its output variance "
        f"({config['teacher_conditioning']['between_category_share']:.0%} of that between categories)",
        "", "Teacher-student noise-prediction MSE on held-out prompts (lower is better), mean ± std over seeds:", "",
        "| method | overall | worst region | unseen category | underrepresented category | seen categories "
        "| step time (s) | samples/s | tracker share of step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, stats in results.items():
        lines.append(f"| {method} | {fmt(stats['overall'])} | {fmt(stats['worst_region'])} | {fmt(stats['unseen'])} | "
                     f"{fmt(stats['underrepresented'])} | {fmt(stats['seen_categories'])} | "
                     f"{fmt(stats['step_time'], digits=3)} | {fmt(stats['samples_per_second'], digits=1)} | "
                     f"{fmt(stats['tracker_fraction'], scale=100, digits=2, unit=' %')} |")
    lines += ["", "Plots: `discrepancy_vs_step.png`, `discrepancy_per_category.png`.", ""]
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"config": config, "command": command, "results": results}, handle, indent=2)
    print("\n".join(lines))


def plot(method_runs, reports, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    initial = np.mean([report["students"][INITIAL]["discrepancy"]["mean"] for report in reports.values()])
    figure, axis = plt.subplots(figsize=(9, 4))
    for method, runs in method_runs.items():
        curves = []
        for run_dir in runs.values():
            path = os.path.join(run_dir, "eval", "history.jsonl")
            if os.path.exists(path):
                records = [json.loads(line) for line in open(path)]
                curves.append([(r["step"], r["mean"]) for r in records])
        if curves:
            steps = [s for s, _ in curves[0]]
            values = np.asarray([[v for _, v in curve] for curve in curves if len(curve) == len(steps)])
            axis.errorbar(steps, values.mean(0), yerr=values.std(0), label=method, capsize=3)
    axis.axhline(initial, color="gray", linestyle="--", label=f"{INITIAL} (step 0)")
    axis.set_xlabel("step")
    axis.set_ylabel("held-out teacher-student MSE (log)")
    axis.set_yscale("log")
    axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "discrepancy_vs_step.png"), dpi=100)
    plt.close(figure)

    seeds = list(reports)
    categories = sorted(reports[seeds[0]]["students"][next(iter(method_runs))]["discrepancy"]["per_category"])
    bar_methods = list(method_runs)  # no_training is ~10x higher and would flatten the differences
    width = 0.8 / len(bar_methods)
    figure, axis = plt.subplots(figsize=(max(7, 1.1 * len(categories)), 4))
    for offset, method in enumerate(bar_methods):
        values = np.asarray([[reports[s]["students"][method]["discrepancy"]["per_category"][c] for c in categories]
                             for s in seeds])
        axis.bar(np.arange(len(categories)) + offset * width, values.mean(0), width, yerr=values.std(0),
                 label=method, capsize=2)
    axis.set_xticks(np.arange(len(categories)) + width * (len(bar_methods) - 1) / 2)
    axis.set_xticklabels(categories, rotation=30, ha="right")
    axis.set_ylabel("held-out teacher-student MSE")
    low = min(p.get_height() for p in axis.patches)
    axis.set_ylim(bottom=0.8 * low)  # the differences between methods are a few percent
    axis.set_title(f"after training ({INITIAL}: {initial:.4f} overall)")
    axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "discrepancy_per_category.png"), dpi=100)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--quick", action="store_true", help="60 student steps at batch 8 and a smaller evaluation "
                        "grid, instead of 300 steps at batch 16.")
    parser.add_argument("--ablations", action="store_true", help="Also run the ARIA tracker-option ablations.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--prompt_file", default=None, help="Categorised corpus; default: the built-in demo corpus.")
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--category_column", default="category")
    parser.add_argument("--unseen_category", default="animals")
    parser.add_argument("--underrepresented_category", default="musical_instruments")
    parser.add_argument("--num_regions", type=int, default=8)
    parser.add_argument("--student_config", default="bk_small")
    parser.add_argument("--teacher_dir", default=None, help="Reuse a benchmark teacher instead of training one.")
    args = parser.parse_args(argv)
    budget = BUDGETS["quick" if args.quick else "default"]
    command = "python examples/benchmark/run_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = os.path.abspath(args.output_dir)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    python = sys.executable

    prompt_file = args.prompt_file
    if prompt_file is None:
        from aria_utils.demo_corpus import write_demo_corpus

        prompt_file = write_demo_corpus(os.path.join(out, "corpus"))
    paths, categories = split_corpus(prompt_file, args.prompt_column, args.category_column, budget["heldout"], out, 0)
    for name in (args.unseen_category, args.underrepresented_category):
        if name not in categories:
            raise SystemExit(f"Category {name!r} is not in the corpus; categories: {categories}")

    teacher = args.teacher_dir or os.path.join(out, "teacher")
    if not os.path.isdir(os.path.join(teacher, "unet")):
        log("building the benchmark teacher")
        run([python, "examples/benchmark/conditioned_teacher.py", "--prompt_file", paths["train"],
             "--category_column", "category", "--output_dir", teacher], os.path.join(logs, "teacher.log"))
    strength_path = os.path.join(teacher, "conditioning_strength.json")
    strength = json.load(open(strength_path)) if os.path.isfile(strength_path) else None
    if strength is None or strength["prompt_share"] < MIN_PROMPT_SHARE:
        raise SystemExit(f"The teacher in {teacher} does not depend enough on its prompt "
                         f"({strength and strength['prompt_share']}; need {MIN_PROMPT_SHARE}), so the methods could "
                         "not differ; build it with examples/benchmark/conditioned_teacher.py.")
    log(f"teacher: the prompt explains {strength['prompt_share']:.1%} of its output variance")
    paired = os.path.join(out, "paired")
    if not os.path.isdir(paired):
        log("generating the paired set (unseen category left out)")
        run([python, "-m", "aria_utils.generate_teacher_data", "--pretrained_model_name_or_path", teacher,
             "--prompt_file", paths["train"], "--category_column", "category",
             "--exclude_categories", args.unseen_category, "--num_prompts", str(budget["paired"]),
             "--num_inference_steps", "10", "--batch_size", "32", "--output_dir", paired],
            os.path.join(logs, "paired.log"))
    regions = os.path.join(out, "regions")
    run([python, "-m", "aria_utils.regions", "--prompt_file", paths["train"], "--num_regions", str(args.num_regions),
         "--output_dir", regions], os.path.join(logs, "regions.log"))

    initial_student = save_initial_student(teacher, args.student_config, os.path.join(out, "initial_student"))
    variants = {method: [] for method in args.methods}
    if args.ablations:
        variants.update(ABLATIONS)
    method_runs = {name: {} for name in variants}
    for seed in args.seeds:
        for name, extra in variants.items():
            run_dir = os.path.join(out, "runs", f"{name}-seed{seed}")
            method_runs[name][seed] = run_dir
            if os.path.isfile(os.path.join(run_dir, "train_summary.json")):
                continue
            sampling = "aria" if name.startswith("aria") else name
            log(f"training {name}, seed {seed}")
            run([python, "train_aria_distill.py", "--pretrained_model_name_or_path", teacher,
                 "--student_config", args.student_config, "--train_data_dir", paired, "--prompt_file", paths["train"],
                 "--condition_sampling", sampling, "--track_regions", "--num_regions", str(args.num_regions),
                 "--region_cache_dir", regions, "--seed", str(seed), "--train_batch_size", str(budget["batch"]),
                 "--max_train_steps", str(budget["steps"]), "--learning_rate", "5e-4",
                 # The teacher is not a denoiser of its own latents, so the task loss would pull the
                 # student away from it; the benchmark measures teacher-student agreement: KD only.
                 "--lambda_sd", "0",
                 "--aria_warmup_steps", str(max(1, budget["steps"] // 10)),
                 "--checkpointing_steps", str(budget["steps"]), "--eval_prompt_file", paths["heldout"],
                 "--eval_steps", str(budget["eval_every"]), "--eval_num_timesteps", "4", "--eval_max_prompts", "256",
                 "--report_to", "none", "--output_dir", run_dir, *extra], os.path.join(logs, f"{name}-seed{seed}.log"))

    reports = {}
    for seed in args.seeds:
        eval_dir = os.path.join(out, "eval", f"seed{seed}")
        report_path = os.path.join(eval_dir, "report.json")
        if os.path.isfile(report_path):  # an interrupted or repeated benchmark resumes here
            reports[seed] = json.load(open(report_path))
            if set(reports[seed]["students"]) == {INITIAL, *variants}:
                continue
        log(f"evaluating all students of seed {seed}")
        command_line = [python, "-m", "aria_utils.evaluate", "--teacher", teacher, "--prompt_file", paths["heldout"],
                        "--category_column", "category", "--region_cache_dir", regions, "--paired_data_dir", paired,
                        "--num_timesteps", str(budget["eval_timesteps"]), "--num_sample_prompts_per_region", "1",
                        "--output_dir", eval_dir, "--noise_seeds", *budget["noise_seeds"]]
        command_line += ["--student", f"{INITIAL}={initial_student}"]
        for name in variants:
            command_line += ["--student", f"{name}={method_runs[name][seed]}"]
        run(command_line, os.path.join(logs, f"eval-seed{seed}.log"))
        reports[seed] = json.load(open(report_path))

    import platform

    config = {"budget": "quick" if args.quick else "default", "steps": budget["steps"], "batch": budget["batch"],
              "student": args.student_config, "num_regions": args.num_regions, "seeds": args.seeds,
              "unseen": args.unseen_category, "underrepresented": args.underrepresented_category,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
              "prompt_file": prompt_file, "teacher_conditioning": strength}
    results = collect({INITIAL: {seed: None for seed in args.seeds}, **method_runs}, reports, args.unseen_category,
                      args.underrepresented_category)
    write_results(results, config, out, command)
    plot(method_runs, reports, out)


if __name__ == "__main__":
    main()
