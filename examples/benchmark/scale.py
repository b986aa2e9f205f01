"""Does the paired-data path hold at the README recipe's scale? One offline CPU command.

    python examples/benchmark/scale.py --output_dir scale-bench                      # N = 20K and 200K, 10M prompts
    python examples/benchmark/scale.py --output_dir scale-bench --num_latents 2000 20000 --corpus_size 1000000

It writes N synthetic SD-1.x-shape teacher latents (4x64x64, float16, the sharded format) and a
large prompt file, then measures, with the tiny teacher (its UNet takes 64x64 latents):

1. Training with 2 processes (gloo on CPU): peak RSS per process, time from `accelerate launch` to
   the first finished step, and steps/s, for every N and for a 256-latent "no data" baseline; plus
   the previous path (the whole set read into float32 by every process), measured at the smallest N.
2. The condition corpus: RSS and time to load the prompt file, packed (now) vs. the previous Python
   list + de-duplication set + lookup dict.
3. Generation: sharded `generate_teacher_data` vs. an in-memory loop that writes once at the end
   (the previous path), same teacher, prompts and batches.

Results go to OUTPUT_DIR/results.json and results.md. Re-running reuses the written data.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

from aria_utils.cli import argument_parser, run_cli  # noqa: E402
from aria_utils.data.paired_data import new_manifest, write_manifest, write_shard  # noqa: E402

LATENT_SHAPE = (4, 64, 64)  # SD-1.x at 512 px
SHARD_SIZE = 1000
BASELINE_LATENTS = 256
GIB = 1024 ** 3


def status_memory():
    """(current RSS, peak RSS) of this process in bytes, from /proc (Linux)."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _ = line.split()
                values[key[:-1]] = int(amount) * 1024
    return values["VmRSS"], values["VmHWM"]


# --------------------------------------------------------------------------------------------- data
def write_prompt_file(path, size):
    """`size` distinct prompts: the demo corpus's prompts, each with a numbered variation."""
    from aria_utils.fixtures.demo_corpus import build_demo_corpus

    if os.path.isfile(path):
        return path
    base = [prompt for prompt, _ in build_demo_corpus(seed=0)]
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        for index in range(size):
            handle.write(f"{base[index % len(base)]}, variation {index // len(base)}\n")
    os.replace(path + ".tmp", path)
    return path


def write_synthetic_latents(folder, num_latents, prompt_file, seed=0):
    """A finished sharded set of `num_latents` random SD-1.x-shape latents with corpus captions."""
    from tqdm.auto import tqdm

    manifest_path = os.path.join(folder, "manifest.json")
    if os.path.isfile(manifest_path) and json.load(open(manifest_path))["complete"]:
        return folder
    with open(prompt_file, encoding="utf-8") as handle:
        captions = [next(handle).rstrip("\n") for _ in range(min(num_latents, 100_000))]
    os.makedirs(folder, exist_ok=True)
    manifest = new_manifest(num_latents, SHARD_SIZE, LATENT_SHAPE, {"synthetic": True, "seed": seed})
    write_manifest(folder, manifest)
    generator = torch.Generator().manual_seed(seed)
    for index, shard in enumerate(tqdm(manifest["shards"], desc=f"Writing {num_latents} latents")):
        start = index * SHARD_SIZE
        latents = torch.randn((shard["num_latents"], *LATENT_SHAPE), generator=generator).half()
        rows = [{"index": i, "caption": captions[i % len(captions)]} for i in range(start, start + len(latents))]
        manifest["shards"][index].update(write_shard(folder, index, latents, rows))
    manifest["complete"] = True
    write_manifest(folder, manifest)
    return folder


def folder_size(folder):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


# --------------------------------------------------------------------------------------------- training
def measure_training(teacher, data_dir, prompt_file, output_dir, steps):
    """2 processes on CPU: peak RSS of each, launch -> first finished step, steps/s."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               os.path.join(REPO_ROOT, "train_aria_distill.py"), "--pretrained_model_name_or_path", teacher,
               "--train_data_dir", data_dir, "--prompt_file", prompt_file, "--condition_sampling", "random",
               "--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", "100000",
               "--report_to", "none", "--debug_process_states", "--output_dir", output_dir]
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run each time
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")
    launched = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"Training run failed:\n{result.stderr[-4000:]}")
    states = [json.load(open(os.path.join(output_dir, "process_states", f"rank_{rank}.json"))) for rank in (0, 1)]
    summary = json.load(open(os.path.join(output_dir, "train_summary.json")))
    return {"peak_rss_gib_per_process": [state["peak_host_memory_bytes"] / GIB for state in states],
            "launch_to_first_step_s": max(state["first_step_finished_at"] for state in states) - launched,
            "steps_per_second": 1.0 / summary["mean_step_time"], "steps": steps}


def measure_in_subprocess(kind, *arguments):
    """Run one `_measure_*` function below in a fresh process; return what it printed (JSON)."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), f"--_measure_{kind}", *arguments],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measure_previous_read(data_dir):
    """The previous path: every process read the whole set and converted it to float32."""
    from safetensors.torch import load_file

    before = status_memory()[0]
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    parts = [load_file(os.path.join(data_dir, shard["latents"]))["latents"] for shard in manifest["shards"]]
    latents = torch.cat(parts).float()
    del parts
    current, peak = status_memory()
    print(json.dumps({"latents": len(latents), "resident_gib": (current - before) / GIB,
                      "peak_gib": (peak - before) / GIB}))


# --------------------------------------------------------------------------------------------- corpus
def _measure_corpus(prompt_file, path):
    """RSS above the start and time to load the corpus (packed / previous lists)."""
    from aria_utils.data.prompts import load_prompt_corpus

    before = status_memory()[0]
    start = time.perf_counter()
    if path == "packed":
        corpus = load_prompt_corpus(prompt_file=prompt_file)
        corpus.prompts.find(["a caption to look up"])  # builds the lookup the training script uses
        count = len(corpus)
    else:  # the previous path: a list of str, a set to de-duplicate, a dict for the caption lookup
        prompts, seen = [], set()
        with open(prompt_file, encoding="utf-8") as handle:
            for line in handle:
                prompt = line.strip()
                if prompt and prompt not in seen:
                    seen.add(prompt)
                    prompts.append(prompt)
        lookup = {prompt: index for index, prompt in enumerate(prompts)}
        count = len(lookup)
    seconds = time.perf_counter() - start
    current, peak = status_memory()
    print(json.dumps({"prompts": count, "seconds": seconds, "resident_gib": (current - before) / GIB,
                      "peak_gib": (peak - before) / GIB}))


# --------------------------------------------------------------------------------------------- generation
def measure_generation(teacher, prompt_file, output_dir, num_prompts, repeats=2):
    """Latents/s of sharded generation vs. an in-memory loop writing once at the end (same work)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from aria_utils import generate_teacher_data as generation
    from aria_utils.data.prompts import load_prompt_corpus
    from aria_utils.families import vae_scale_factor

    # The resolution whose latents are 64x64 (the tiny VAE downsamples by 2, SD's by 8).
    vae_scale = vae_scale_factor(AutoencoderKL.load_config(teacher, subfolder="vae"))
    argv = ["--pretrained_model_name_or_path", teacher, "--prompt_file", prompt_file, "--num_prompts",
            str(num_prompts), "--num_inference_steps", "2", "--batch_size", "8", "--shard_size", "8",
            "--resolution", str(LATENT_SHAPE[1] * vae_scale)]
    results = {"sharded": [], "in_memory": []}
    for repeat in range(repeats):
        folder = os.path.join(output_dir, f"sharded-{repeat}")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(folder + "-in-memory", ignore_errors=True)
        start = time.perf_counter()
        generation.main(argv + ["--output_dir", folder])
        results["sharded"].append(num_prompts / (time.perf_counter() - start))

        start = time.perf_counter()
        args = generation.parse_args(argv + ["--output_dir", folder + "-in-memory"])
        corpus = load_prompt_corpus(prompt_file=prompt_file)
        indices = generation.select_prompts(corpus, num_prompts, args.seed)
        _, resolution = generation.latent_geometry(args)
        pipeline, _ = generation.load_teacher_pipeline(args, torch.device("cpu"))
        rows = generation.shard_rows(corpus, indices, 0, num_prompts, args.seed)
        latents = [generation.generate_latent_batch(pipeline, [r["caption"] for r in rows[i : i + 8]],
                                                    [r["seed"] for r in rows[i : i + 8]], args, resolution)
                   for i in range(0, num_prompts, 8)]
        os.makedirs(folder + "-in-memory", exist_ok=True)
        save_file({"latents": torch.cat(latents)}, os.path.join(folder + "-in-memory", "latents.safetensors"))
        results["in_memory"].append(num_prompts / (time.perf_counter() - start))
    return {name: {"latents_per_second": max(values), "runs": values} for name, values in results.items()}


# --------------------------------------------------------------------------------------------- report
def write_report(output_dir, results):
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    baseline = results["training"][str(BASELINE_LATENTS)]
    lines = [f"Machine: {results['machine']}. Command: `{results['command']}` ({results['wall_minutes']:.1f} min).",
             "", "| paired latents | on disk | peak RSS per process (GiB) | above the 256-latent baseline (GiB) | "
             "launch -> first step (s) | steps/s |", "|---|---|---|---|---|---|"]
    for count, row in results["training"].items():
        above = max(row["peak_rss_gib_per_process"]) - max(baseline["peak_rss_gib_per_process"])
        lines.append(f"| {int(count):,} | {row['disk_gib']:.2f} GiB | "
                     f"{' / '.join(f'{v:.2f}' for v in row['peak_rss_gib_per_process'])} | {above:+.2f} | "
                     f"{row['launch_to_first_step_s']:.1f} | {row['steps_per_second']:.2f} |")
    previous = results["previous_training_read"]
    lines += ["", f"Previous path (every process read the set into float32), measured at {previous['latents']:,} "
              f"latents: {previous['resident_gib']:.2f} GiB resident per process, peak {previous['peak_gib']:.2f} GiB.",
              "", "| condition corpus | prompts | load time (s) | resident (GiB) | peak while loading (GiB) |",
              "|---|---|---|---|---|"]
    for name, row in results["corpus"].items():
        lines.append(f"| {name} | {row['prompts']:,} | {row['seconds']:.1f} | {row['resident_gib']:.2f} | "
                     f"{row['peak_gib']:.2f} |")
    generation = results["generation"]
    ratio = generation["sharded"]["latents_per_second"] / generation["in_memory"]["latents_per_second"]
    lines += ["", f"Generation (tiny teacher, 64x64 latents, 2 steps, CFG, batch 8, a shard every 8 latents): sharded "
              f"{generation['sharded']['latents_per_second']:.2f} latents/s, in memory "
              f"{generation['in_memory']['latents_per_second']:.2f} latents/s ({ratio:.1%} of in-memory; best of "
              f"{len(generation['sharded']['runs'])})."]
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_latents", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--corpus_size", type=int, default=10_000_000, help="Prompts in the large prompt file.")
    parser.add_argument("--train_steps", type=int, default=8)
    parser.add_argument("--generation_prompts", type=int, default=32)
    return parser.parse_args(argv)


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1].startswith("--_measure_"):
        return globals()[sys.argv[1][2:]](*sys.argv[2:])
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    from aria_utils.fixtures.tiny_teacher import save_tiny_teacher

    teacher = os.path.join(args.output_dir, "tiny-teacher")
    if not os.path.isdir(teacher):
        save_tiny_teacher(teacher, seed=0)
    prompt_file = write_prompt_file(os.path.join(args.output_dir, f"prompts-{args.corpus_size}.txt"),
                                    args.corpus_size)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM, no GPU",
               "command": "python examples/benchmark/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "corpus": {}, "training": {}}

    print("Condition corpus load ...", flush=True)
    results["corpus"]["packed (now)"] = measure_in_subprocess("corpus", prompt_file, "packed")
    results["corpus"]["list + set + dict (previous)"] = measure_in_subprocess("corpus", prompt_file, "lists")

    for count in [BASELINE_LATENTS, *args.num_latents]:
        folder = write_synthetic_latents(os.path.join(args.output_dir, f"latents-{count}"), count, prompt_file)
        print(f"Training on {count} latents (2 processes) ...", flush=True)
        row = measure_training(teacher, folder, prompt_file, os.path.join(args.output_dir, f"run-{count}"),
                               args.train_steps)
        row["disk_gib"] = folder_size(folder) / GIB
        results["training"][str(count)] = row
    results["previous_training_read"] = measure_in_subprocess(
        "previous_read", os.path.join(args.output_dir, f"latents-{min(args.num_latents)}"))

    print("Generation throughput ...", flush=True)
    from aria_utils.fixtures.demo_corpus import write_demo_corpus

    small_corpus = write_demo_corpus(os.path.join(args.output_dir, "demo-corpus"))  # loading stays negligible
    results["generation"] = measure_generation(teacher, small_corpus, os.path.join(args.output_dir, "generation"),
                                               args.generation_prompts)
    results["wall_minutes"] = (time.time() - started) / 60
    print(write_report(args.output_dir, results))


if __name__ == "__main__":
    run_cli(main)
