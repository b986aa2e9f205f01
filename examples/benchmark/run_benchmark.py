"""Does ARIA beat Random Conditioning? One command per setting, from scratch, offline, on CPU.

    python examples/benchmark/run_benchmark.py --setting planted --output_dir bench-planted          # ~30 min
    python examples/benchmark/run_benchmark.py --setting smooth --output_dir bench-smooth            # ~30 min
    python examples/benchmark/run_benchmark.py --setting planted --output_dir bench-planted --quick  # minutes

Setting (RC's unseen-concept test): a categorised prompt corpus (default: the built-in demo corpus;
any file with a category column works, e.g. PartiPrompts); held-out prompts for every category; a
paired set of teacher latents that leaves one category out entirely (unseen) while another is rare in
the corpus (underrepresented). Two teachers:

- smooth: the conditioned teacher (conditioned_teacher.py). Regions differ little in difficulty: the
  honest "no heterogeneity, no gain" control.
- planted: the same teacher plus two planted concepts, the unseen and the underrepresented category,
  carried by layers the BK student does not have (planted_teacher.py). The student starts from BK-SDM's
  init distilled for a few steps from the teacher *without* the concepts (think: a student of the base
  model, now distilled from a community fine-tune that added them), so the concepts are what is left
  to learn, and only samples of their prompts teach them.

Every method trains in this one process (no start-up per run) through the training script's own
step (aria_utils.training.distillation_step: the same data pipeline, condition draw, loss and tracker update), and
is evaluated on the held-out prompts every few steps with the region-aware evaluation. Writes
results.md / results.json and plots into --output_dir; re-running resumes (finished runs are kept).
"""

import copy
import csv
import json
import os
import platform
import random
import sys
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aria_utils.cli import argument_parser, run_cli  # noqa: E402

# name -> (--condition_sampling, extra flags). Fixed before any run; the ARIA variants share one tracker.
METHODS = {
    "paired": ("paired", []),
    "random": ("random", []),  # Random Conditioning (RC): regions by corpus mass
    "region_uniform": ("region_uniform", []),
    "aria": ("aria", []),  # level rule pi ~ d^(1/tau), tau = 1 (the default)
    "aria_tau0.3": ("aria", ["--aria_temperature", "0.3"]),
    "aria_tau0.1": ("aria", ["--aria_temperature", "0.1"]),
    "aria_dro": ("aria", ["--aria_allocation", "dro"]),
    "aria_progress": ("aria", ["--aria_allocation", "progress"]),
    "aria_importance_weights": ("aria", ["--aria_importance_weighting"]),
}
REFERENCE = "random"  # thresholds and step ratios are relative to RC
INITIAL = "no_training"  # the shared starting student, step 0 of every curve
BUDGETS = {
    "quick": dict(steps=60, batch=8, heldout=6, paired=128, eval_every=10, eval_timesteps=5, noise_seeds=(0,),
                  predistill_steps=40, methods=("random", "region_uniform", "aria", "aria_dro", "aria_progress")),
    "default": dict(steps=200, batch=8, heldout=12, paired=256, eval_every=20, eval_timesteps=8, noise_seeds=(0, 1),
                    predistill_steps=100, methods=tuple(METHODS)),
}
NUM_REGIONS = 32  # the smallest K at which the demo corpus's rare category gets a region of its own
# Below this share of output variance explained by the prompt, every allocation strategy looks alike
# and the comparison says nothing (see conditioned_teacher.py).
MIN_PROMPT_SHARE = 0.05
# A channel-reduced student inherits nothing from the teacher: its pre-distillation from a random init
# gets this many times the budget's steps, to start about as close to the base teacher as a BK init does.
RANDOM_INIT_PREDISTILL_FACTOR = 5
PLANTED_GAIN = 1.0  # planted_teacher.py: fixed before the comparisons, from the initial-gap measurement


BENCHMARK_FILE = "benchmark.json"  # what the folder's teacher, paired set and finished runs were made for


def claim_output_dir(out, identity):
    """Reuse `out` only for the same benchmark: finished runs of another setting, budget or corpus would be
    mixed into this table silently. Writes the identity on first use."""
    path = os.path.join(out, BENCHMARK_FILE)
    if os.path.isfile(path):
        previous = json.load(open(path, encoding="utf-8"))
        changed = sorted(key for key in set(previous) | set(identity) if previous.get(key) != identity.get(key))
        if changed:
            raise SystemExit(f"--output_dir {out} holds a benchmark with other {', '.join(changed)} "
                             f"({', '.join(f'{k}={previous.get(k)!r}' for k in changed)}); re-run with those "
                             "settings to resume it, or choose another --output_dir.")
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(identity, handle, indent=2)


def log(message):
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", flush=True)


def split_corpus(prompt_file, prompt_column, category_column, heldout_per_category, output_dir, seed):
    """Held-out prompts (some of every category) and the training corpus (the rest)."""
    from aria_utils.data.prompts import load_prompt_corpus

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


def build_teachers(setting, corpus, concepts, output_dir):
    """The teacher folder, and for the planted setting also the base teacher (without the concepts)."""
    import conditioned_teacher

    base = os.path.join(output_dir, "base_teacher" if setting == "planted" else "teacher")
    prompts, categories = list(corpus.prompts), list(corpus.categories)
    if not os.path.isdir(os.path.join(base, "unet")):
        log("building the conditioned teacher")
        pipeline = conditioned_teacher.build_teacher(0, 20.0)
        sample = conditioned_teacher.sample_per_category(prompts, categories, 8, 0)
        strength = conditioned_teacher.conditioning_strength(pipeline, *sample, 0)
        pipeline.save_pretrained(base, safe_serialization=True)
        with open(os.path.join(base, "conditioning_strength.json"), "w", encoding="utf-8") as handle:
            json.dump(dict(strength, cross_attention_gain=20.0), handle, indent=2)
    if setting == "smooth":
        return base, None
    from planted_teacher import PLANTED_FILE, build_planted_teacher, save_planted_record

    teacher = os.path.join(output_dir, "teacher")
    if not os.path.isfile(os.path.join(teacher, PLANTED_FILE)):
        log(f"planting the concepts {concepts}")
        pipeline, record = build_planted_teacher(prompts, categories, concepts, PLANTED_GAIN, seed=0)
        pipeline.save_pretrained(teacher, safe_serialization=True)
        save_planted_record(record, teacher)
    return teacher, base


def check_teacher_strength(teacher_dir):
    path = os.path.join(teacher_dir, "conditioning_strength.json")
    strength = json.load(open(path)) if os.path.isfile(path) else None
    if strength is None or strength["prompt_share"] < MIN_PROMPT_SHARE:
        raise SystemExit(f"The teacher in {teacher_dir} does not depend enough on its prompt "
                         f"({strength and strength['prompt_share']}; need {MIN_PROMPT_SHARE}), so the methods could "
                         "not differ; build it with examples/benchmark/conditioned_teacher.py.")
    return strength


def script_args(teacher_path, paired_dir, prompt_file, method, seed, budget, output_dir):
    """The training script's own argument namespace for this run (its defaults, its flag names)."""
    from train_aria_distill import build_parser

    sampling, extra = METHODS[method] if method in METHODS else ("random", [])
    return build_parser().parse_args([
        "--pretrained_model_name_or_path", teacher_path, "--train_data_dir", paired_dir, "--prompt_file", prompt_file,
        "--condition_sampling", sampling, "--track_regions", "--num_regions", str(NUM_REGIONS), "--seed", str(seed),
        "--train_batch_size", str(budget["batch"]), "--learning_rate", "5e-4",
        # The teacher is not a denoiser of its own latents, so the task loss would pull the student away
        # from it; the benchmark measures teacher-student agreement: KD only.
        "--lambda_sd", "0", "--aria_warmup_steps", str(max(1, budget["steps"] // 10)),
        "--output_dir", output_dir, *extra])


class Evaluation:
    """Held-out noise-prediction discrepancy of a student, per region and per category (teacher cached)."""

    def __init__(self, teacher, prompts, categories, region_ids, budget, seed=0):
        from aria_utils.evaluation.discrepancy import DiscrepancyEvaluator, EvaluationSetup, default_timestep_grid

        self.evaluator = DiscrepancyEvaluator(teacher.unet, teacher.prompt_encoder(), teacher.noise_scheduler,
                                              teacher.vae, torch.device("cpu"), show_progress=False)
        self.setup = EvaluationSetup(
            prompts=list(prompts), region_ids=np.asarray(region_ids), categories=list(categories),
            noise_seeds=tuple(budget["noise_seeds"]), seed=seed, batch_size=32, cache_teacher_predictions=True,
            timesteps=tuple(default_timestep_grid(teacher.noise_scheduler.config.num_train_timesteps,
                                                  budget["eval_timesteps"])))

    def __call__(self, student, step):
        from aria_utils.evaluation.discrepancy import summarise_discrepancy

        was_training = student.training
        student.eval()
        summary = summarise_discrepancy(self.evaluator.noise_discrepancy(student, self.setup), self.setup,
                                        NUM_REGIONS)
        student.train(was_training)
        return {"step": step, "mean": summary["mean"], "worst_region": summary["worst_region_mean"],
                "per_category": summary["per_category"],
                "per_region": {str(k): v["mean"] for k, v in summary["per_region"].items()}}


def train_student(initial_student, teacher, data, args, steps, evaluate=None, eval_every=None):
    """`steps` optimisation steps of the training script's step; the evaluation curve and the run's costs."""
    from diffusers.optimization import get_scheduler

    from aria_utils.method.region_tracker import RegionTracker
    from aria_utils.training.distillation_step import build_distillation_step, build_optimizer
    from aria_utils.training.feature_projectors import FeatureProjectors
    from aria_utils.training.lora import trainable_parameters
    from train_aria_distill import configs_from_args

    configs = configs_from_args(args)  # the script's own flags -> configs
    accelerator = data["accelerator"]
    student = copy.deepcopy(initial_student)
    student.train()
    projectors = None
    family = teacher.family
    if family.needs_feature_projection(student, teacher.unet):  # a channel-reduced student: projections, as in the script
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            projectors = FeatureProjectors(student, teacher.unet, family.feature_layer_pairs(student, teacher.unet))
    parameters = trainable_parameters(student) + (list(projectors.parameters()) if projectors is not None else [])
    optimizer = build_optimizer(configs.optimizer, parameters, args.train_batch_size)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=steps)
    if projectors is not None:
        student, projectors, optimizer, lr_scheduler = accelerator.prepare(student, projectors, optimizer,
                                                                           lr_scheduler)
    else:
        student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    tracker = RegionTracker.from_config(configs.region_tracker, data["sampler"],
                                        teacher.noise_scheduler.config.num_train_timesteps)
    step = build_distillation_step(
        accelerator, student, teacher.unet, teacher.prompt_encoder(), family.training_noise(teacher.noise_scheduler),
        optimizer, lr_scheduler, data["paired"], data["caption_region_ids"], data["corpus"].prompts,
        data["sampler"], tracker, steps, configs.batch, configs.conditioning, configs.loss_weights,
        configs.optimizer.max_grad_norm, feature_projectors=projectors)
    curve, step_times, tracker_times = [], [], []
    allocation = np.zeros(data["sampler"].num_regions)  # summed region distribution of the random conditions
    for global_step in range(steps):
        start = time.perf_counter()
        result = step(global_step)
        step_times.append(time.perf_counter() - start)
        tracker_times.append(result.tracker_time)
        if result.region_probabilities is not None:
            allocation += result.region_probabilities
        if evaluate is not None and (global_step + 1) % eval_every == 0:
            curve.append(evaluate(accelerator.unwrap_model(student), global_step + 1))
    step.close()
    trained = accelerator.unwrap_model(student)
    accelerator.free_memory()
    return trained, {
        "curve": curve, "mean_step_time": float(np.mean(step_times)),
        "tracker_fraction": float(np.sum(tracker_times) / np.sum(step_times)),
        "visits_per_region": tracker.visits.tolist(), "final_probabilities": tracker.probabilities().tolist(),
        "mean_allocation": (allocation / steps).tolist(),
    }


def region_purity(region_labels, categories, concept, num_regions, min_share=0.05):
    """The concept's regions (each holding at least `min_share` of its prompts), the share of its prompts
    they hold (coverage), and the share of their prompts that belong to it (purity)."""
    categories = np.asarray(categories)
    is_concept = categories == concept
    counts = np.bincount(region_labels[is_concept], minlength=num_regions)
    regions = [int(k) for k in np.flatnonzero(counts >= min_share * max(is_concept.sum(), 1))]
    inside = np.isin(region_labels, regions)
    return {"regions": regions, "coverage": float((inside & is_concept).sum() / max(is_concept.sum(), 1)),
            "purity": float(is_concept[inside].mean()) if inside.any() else 0.0,
            "corpus_share": float(is_concept.mean())}


# ----- metrics --------------------------------------------------------------------------------------
def group_values(record, unseen, underrepresented):
    per_category = record["per_category"]
    seen = [v for c, v in per_category.items() if c not in (unseen, underrepresented)]
    return {"overall": record["mean"], "worst_region": record["worst_region"], "unseen": per_category[unseen],
            "underrepresented": per_category[underrepresented], "seen_categories": float(np.mean(seen))}


GROUPS = ("overall", "worst_region", "unseen", "underrepresented", "seen_categories")


def curve_of(run, initial_record, group, unseen, underrepresented):
    records = [initial_record] + run["curve"]
    return (np.asarray([r["step"] for r in records], dtype=np.float64),
            np.asarray([group_values(r, unseen, underrepresented)[group] for r in records]))


def steps_to_reach(steps, values, threshold):
    """First step (linear between evaluations) at which the curve is at or below `threshold`; None if never."""
    for index in range(len(values)):
        if values[index] <= threshold:
            if index == 0:
                return float(steps[0])
            v0, v1 = values[index - 1], values[index]
            return float(steps[index - 1] + (steps[index] - steps[index - 1]) * (v0 - threshold) / (v0 - v1))
    return None


def area_under_curve(steps, values):
    """Mean discrepancy over training: trapezoid area under the curve divided by the number of steps."""
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def mean_std(values):
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(values) == 0:
        return None
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": int(len(values)), "values": values.tolist()}


def collect(runs, initial_record, seeds, unseen, underrepresented, concept_regions):
    """results[method][metric] = mean/std over seeds."""
    results = {}
    for method, by_seed in runs.items():
        rows = {}
        for seed in seeds:
            run = by_seed[seed]
            final = group_values(run["curve"][-1], unseen, underrepresented)
            for group in GROUPS:
                steps, values = curve_of(run, initial_record, group, unseen, underrepresented)
                rows.setdefault(f"final/{group}", []).append(final[group])
                rows.setdefault(f"auc/{group}", []).append(area_under_curve(steps, values))
                reference = runs[REFERENCE][seed]
                ref_steps, ref_values = curve_of(reference, initial_record, group, unseen, underrepresented)
                threshold = ref_values[-1]  # RC's final value on the same seed
                reached = steps_to_reach(steps, values, threshold)
                reference_reached = steps_to_reach(ref_steps, ref_values, threshold)
                rows.setdefault(f"steps/{group}", []).append(reached)
                # Undefined when RC never got below its starting value (its final is reached at step 0).
                rows.setdefault(f"step_ratio/{group}", []).append(
                    None if reached is None or not reference_reached else reached / reference_reached)
            allocation = np.asarray(run["mean_allocation"])
            for name, regions in concept_regions.items():
                rows.setdefault(f"allocation/{name}", []).append(
                    float(allocation[regions].sum()) if allocation.any() else None)  # paired: none drawn
            rows.setdefault("step_time", []).append(run["mean_step_time"])
            rows.setdefault("tracker_fraction", []).append(run["tracker_fraction"])
        results[method] = {name: mean_std(values) for name, values in rows.items()}
        results[method]["reached"] = {group: sum(v is not None for v in rows[f"steps/{group}"]) for group in GROUPS}
    return results


def fmt(stat, scale=1.0, digits=4, unit=""):
    if stat is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}{unit}"


def fmt_steps(stat, reached, total):
    if stat is None:
        return f"never (0/{total})"
    text = f"{stat['mean']:.0f} ± {stat['std']:.0f}"
    return text if reached == total else f"{text} ({reached}/{total} reached)"


def write_results(results, initial_record, config, output_dir, command):
    unseen, under = config["unseen"], config["underrepresented"]
    seeds = len(config["seeds"])
    lines = [
        f"# ARIA vs Random Conditioning: {config['setting']} setting", "",
        f"Command: `{command}`  ", f"Machine: {config['machine']}  ",
        f"Wall time: {config['wall_time_minutes']:.1f} min  ",
        f"Budget: {config['budget']} ({config['steps']} steps, batch {config['batch']}, student {config['student']}, "
        f"{config['num_regions']} regions), seeds {config['seeds']}  ",
        f"Corpus: {config['prompt_file_name']}; unseen category `{unseen}` (no paired latents), underrepresented "
        f"`{under}`  ",
        f"Teacher: the prompt explains {config['teacher_conditioning']['prompt_share']:.1%} of its output variance",
        "",
    ]
    if config["setting"] == "planted":
        lines += [f"Planted concepts: `{unseen}` and `{under}` (gain {config['planted']['gain']}, layers "
                  f"{', '.join(config['planted']['layers'])}); the starting student was distilled "
                  f"{config['predistill_steps']} steps from the teacher without them.", ""]
    lines += ["**Starting point** (held-out discrepancy of the shared starting student, per category, and how "
              "the regions isolate the named categories):", "",
              "| category | initial discrepancy | x mean of the other categories |", "|---|---|---|"]
    per_category = initial_record["per_category"]
    for category, value in sorted(per_category.items()):
        others = np.mean([v for c, v in per_category.items() if c != category])
        lines.append(f"| {category} | {value:.4f} | {value / others:.1f} |")
    lines += ["", "| category | corpus share | its regions | coverage | purity |", "|---|---|---|---|---|"]
    for category, purity in config["purity"].items():
        lines.append(f"| {category} | {purity['corpus_share']:.1%} | {len(purity['regions'])} | "
                     f"{purity['coverage']:.2f} | {purity['purity']:.2f} |")
    lines += ["", "**Final held-out teacher-student MSE** (lower is better), mean ± std over seeds; AUC is the "
              "mean over training (area under the discrepancy-vs-step curve / steps):", "",
              "| method | overall | worst region | unseen | underrepresented | seen | AUC worst region | AUC unseen "
              "| AUC underrepresented | step (s) | tracker share |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| {INITIAL} | {initial_record['mean']:.4f} | {initial_record['worst_region']:.4f} | "
                 f"{per_category[unseen]:.4f} | {per_category[under]:.4f} | "
                 f"{group_values(initial_record, unseen, under)['seen_categories']:.4f} | | | | | |")
    for method, stats in results.items():
        lines.append(
            f"| {method} | {fmt(stats['final/overall'])} | {fmt(stats['final/worst_region'])} | "
            f"{fmt(stats['final/unseen'])} | {fmt(stats['final/underrepresented'])} | "
            f"{fmt(stats['final/seen_categories'])} | {fmt(stats['auc/worst_region'])} | {fmt(stats['auc/unseen'])} | "
            f"{fmt(stats['auc/underrepresented'])} | {fmt(stats['step_time'], digits=3)} | "
            f"{fmt(stats['tracker_fraction'], scale=100, digits=2, unit=' %')} |")
    share_columns = list(config["purity"])
    lines += ["", "**Speed**: steps to reach RC's final value (same seed), and that as a fraction of the steps RC "
              "itself needed; the share of the random conditions that each method sent to each named category's "
              "regions (mean over steps):", "",
              "| method | steps: worst region | ratio | steps: unseen | ratio | steps: underrepresented | ratio | "
              + " | ".join(f"random conditions to {name} regions" for name in share_columns) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(share_columns)]
    for method, stats in results.items():
        cells = []
        for group in ("worst_region", "unseen", "underrepresented"):
            cells += [fmt_steps(stats[f"steps/{group}"], stats["reached"][group], seeds),
                      fmt(stats[f"step_ratio/{group}"], digits=2)]
        shares = [fmt(stats[f"allocation/{name}"], scale=100, digits=1, unit=" %") for name in share_columns]
        lines.append(f"| {method} | " + " | ".join(cells + shares) + " |")
    lines += ["", "Plots: `discrepancy_vs_step.png`, `discrepancy_per_category.png`.", ""]
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"config": config, "command": command, "initial": initial_record, "results": results}, handle,
                  indent=2)
    print("\n".join(lines))


def plot(runs, initial_record, seeds, unseen, underrepresented, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aria_utils.plots import finish_figure

    panels = (("worst_region", "worst region"), ("unseen", f"unseen: {unseen}"),
              ("underrepresented", f"underrepresented: {underrepresented}"), ("overall", "overall"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2, 3.8))
    for axis, (group, title) in zip(axes, panels):
        for method, by_seed in runs.items():
            curves = [curve_of(by_seed[seed], initial_record, group, unseen, underrepresented) for seed in seeds]
            steps, values = curves[0][0], np.asarray([c[1] for c in curves])
            axis.plot(steps, values.mean(0), label=method)
            axis.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
        axis.set_title(title, fontsize="medium")
        axis.set_xlabel("step")
        axis.set_yscale("log")
    axes[0].set_ylabel("held-out teacher-student MSE (log)")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    finish_figure(figure, os.path.join(output_dir, "discrepancy_vs_step.png"))

    categories = sorted(initial_record["per_category"])
    width = 0.8 / len(runs)
    figure, axis = plt.subplots(figsize=(max(7, 1.1 * len(categories)) + 2, 4))
    for offset, (method, by_seed) in enumerate(runs.items()):
        values = np.asarray([[by_seed[s]["curve"][-1]["per_category"][c] for c in categories] for s in seeds])
        axis.bar(np.arange(len(categories)) + offset * width, values.mean(0), width, yerr=values.std(0),
                 label=method, capsize=2)
    axis.set_xticks(np.arange(len(categories)) + width * (len(runs) - 1) / 2)
    axis.set_xticklabels(categories, rotation=30, ha="right")
    axis.set_ylabel("final held-out teacher-student MSE")
    axis.set_yscale("log")
    axis.set_title("after training, per category")
    axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    finish_figure(figure, os.path.join(output_dir, "discrepancy_per_category.png"))


def main(argv=None):
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--setting", choices=["planted", "smooth"], default="planted",
                        help="planted: two concepts the student starts far from (ARIA's premise); smooth: the "
                             "conditioned teacher alone, regions of similar difficulty (the control).")
    parser.add_argument("--quick", action="store_true",
                        help=f"{BUDGETS['quick']['steps']} steps and methods {', '.join(BUDGETS['quick']['methods'])}"
                             f", instead of {BUDGETS['default']['steps']} steps and every method.")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                        help="Override the budget's methods (random, RC, is always run: it is the reference).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--prompt_file", default=None, help="Categorised corpus; default: the built-in demo corpus.")
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--category_column", default="category")
    parser.add_argument("--unseen_category", default="animals")
    parser.add_argument("--underrepresented_category", default="musical_instruments")
    parser.add_argument("--student_config", default="bk_small")
    parser.add_argument("--predistill_steps", type=int, default=None,
                        help="Planted setting: steps the starting student is distilled from the teacher without the "
                             "planted concepts. Default: the budget's (quick 40, default 100), times "
                             f"{RANDOM_INIT_PREDISTILL_FACTOR} for a student that starts from a random init (c_*).")
    args = parser.parse_args(argv)
    started = time.time()
    budget = BUDGETS["quick" if args.quick else "default"]
    from aria_utils.families.unet_students import inherits_teacher_weights

    predistill_steps = args.predistill_steps if args.predistill_steps is not None else budget["predistill_steps"] * (
        1 if inherits_teacher_weights(args.student_config) else RANDOM_INIT_PREDISTILL_FACTOR)
    methods = list(dict.fromkeys([REFERENCE, *(args.methods or budget["methods"])]))
    command = "python examples/benchmark/run_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = os.path.abspath(args.output_dir)
    claim_output_dir(out, {"setting": args.setting, "budget": "quick" if args.quick else "default",
                           "prompt_file": os.path.abspath(args.prompt_file) if args.prompt_file else None,
                           "unseen_category": args.unseen_category,
                           "underrepresented_category": args.underrepresented_category,
                           "student_config": args.student_config, "predistill_steps": predistill_steps})
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from aria_utils.quiet import silence_known_harmless_messages

    silence_known_harmless_messages()

    from accelerate import Accelerator

    from aria_utils.method.conditioning import ConditionSampler
    from aria_utils.data.paired_data import load_paired_latents
    from aria_utils.data.prompts import load_prompt_corpus
    from aria_utils.method.region_index import build_or_load_region_index
    from aria_utils.families.unet_students import build_student
    from aria_utils.families import load_frozen_teacher

    prompt_file = args.prompt_file
    if prompt_file is None:
        from aria_utils.fixtures.demo_corpus import write_demo_corpus

        prompt_file = write_demo_corpus(os.path.join(out, "corpus"))
    paths, categories = split_corpus(prompt_file, args.prompt_column, args.category_column, budget["heldout"], out, 0)
    unseen, under = args.unseen_category, args.underrepresented_category
    for name in (unseen, under):
        if name not in categories:
            raise SystemExit(f"Category {name!r} is not in the corpus; categories: {categories}")
    corpus = load_prompt_corpus(prompt_file=paths["train"], category_column="category")
    heldout = load_prompt_corpus(prompt_file=paths["heldout"], category_column="category")

    teacher_dir, base_dir = build_teachers(args.setting, corpus, [unseen, under], out)
    strength = check_teacher_strength(base_dir or teacher_dir)
    log(f"teacher: the prompt explains {strength['prompt_share']:.1%} of its output variance")
    paired_dir = os.path.join(out, "paired")
    from aria_utils.generate_teacher_data import main as generate_teacher_data

    log("paired set (unseen category left out)")
    generate_teacher_data(["--pretrained_model_name_or_path", teacher_dir, "--prompt_file", paths["train"],
                           "--category_column", "category", "--exclude_categories", unseen,
                           "--num_prompts", str(budget["paired"]), "--num_inference_steps", "10", "--batch_size", "32",
                           "--output_dir", paired_dir])
    region_index = build_or_load_region_index(list(corpus.prompts), os.path.join(out, "regions"),
                                              num_regions=NUM_REGIONS, seed=0)
    purity = {name: region_purity(region_index.labels, corpus.categories, name, NUM_REGIONS) for name in (unseen, under)}

    teacher = load_frozen_teacher(teacher_dir)
    paired = load_paired_latents(paired_dir)
    data = {"accelerator": Accelerator(cpu=True), "paired": paired, "corpus": corpus,
            "caption_region_ids": region_index.assign_prompts(paired.captions, corpus.prompts),
            "sampler": ConditionSampler(len(corpus), region_index.labels, region_index.num_regions)}
    evaluate = Evaluation(teacher, heldout.prompts, heldout.categories,
                          region_index.assign_prompts(list(heldout.prompts), corpus.prompts), budget)

    torch.manual_seed(0)
    initial_student = build_student(teacher.unet, args.student_config)
    if base_dir is not None:
        init = "BK-SDM init" if inherits_teacher_weights(args.student_config) else "random init"
        log(f"starting student: {init} distilled {predistill_steps} steps from the base teacher")
        base = load_frozen_teacher(base_dir)
        base_args = script_args(base_dir, paired_dir, paths["train"], REFERENCE, 1000, budget, out)
        initial_student, _ = train_student(initial_student, base, data, base_args, predistill_steps)
        del base
    initial_record = evaluate(initial_student, 0)
    with open(os.path.join(out, "initial.json"), "w", encoding="utf-8") as handle:
        json.dump({"record": initial_record, "purity": purity}, handle, indent=2)

    runs = {method: {} for method in methods}
    for seed in args.seeds:
        for method in methods:
            path = os.path.join(out, "runs", f"{method}-seed{seed}.json")
            if os.path.isfile(path):  # an interrupted or repeated benchmark resumes here
                runs[method][seed] = json.load(open(path))
                continue
            log(f"training {method}, seed {seed}")
            run_args = script_args(teacher_dir, paired_dir, paths["train"], method, seed, budget, out)
            _, record = train_student(initial_student, teacher, data, run_args, budget["steps"], evaluate,
                                      budget["eval_every"])
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            os.replace(path + ".tmp", path)
            runs[method][seed] = record

    concept_regions = {name: value["regions"] for name, value in purity.items()}
    results = collect(runs, initial_record, args.seeds, unseen, under, concept_regions)
    config = {"setting": args.setting, "budget": "quick" if args.quick else "default", "steps": budget["steps"],
              "batch": budget["batch"], "student": args.student_config, "num_regions": NUM_REGIONS,
              "seeds": args.seeds, "unseen": unseen, "underrepresented": under,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only, torch {torch.__version__}",
              "prompt_file_name": os.path.basename(prompt_file), "teacher_conditioning": strength, "purity": purity,
              "predistill_steps": predistill_steps if base_dir else 0,
              "wall_time_minutes": (time.time() - started) / 60}
    if args.setting == "planted":
        from planted_teacher import PLANTED_FILE

        config["planted"] = json.load(open(os.path.join(teacher_dir, PLANTED_FILE)))
    write_results(results, initial_record, config, out, command)
    plot(runs, initial_record, args.seeds, unseen, under, out)


if __name__ == "__main__":
    run_cli(main)
