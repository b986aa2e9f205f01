"""How long a full-size checkpoint takes to write: what a preemption's grace period must cover.

Builds an SD-1.5 BK-SDM student (bk_small by default) from SD-1.5's UNet config with random weights (no
download), gives it an AdamW state (one update) and, with --use_ema, an EMA, and writes checkpoints through
the training script's own path (`aria_utils.training.checkpointing.save_checkpoint` with the student's save hook).

    python examples/benchmark/checkpoint_time.py --output_dir ckpt-bench [--student_config bk_small] [--use_ema]

Reported per repeat: seconds until the checkpoint is complete (what a signalled process needs before it may
exit: the data is in the page cache by then) and seconds until `sync` returns (until it is on the disk).
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

# stable-diffusion-v1-5's unet/config.json differs from UNet2DConditionModel's defaults in these entries only.
SD15_UNET = {"cross_attention_dim": 768, "sample_size": 64, "attention_head_dim": 8}


def build(student_config, use_ema):
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from aria_utils.training.checkpointing import StudentCheckpointHooks
    from aria_utils.families.unet_students import count_parameters, student_config_from_teacher

    teacher_config = dict(UNet2DConditionModel.load_config(_default_config_dir()), **SD15_UNET)
    student = UNet2DConditionModel.from_config(student_config_from_teacher(teacher_config, student_config))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    for parameter in student.parameters():  # one update creates AdamW's two moments, as in training
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema = EMAModel(student.parameters(), model_cls=UNet2DConditionModel, model_config=student.config) if use_ema else None
    student, optimizer = accelerator.prepare(student, optimizer)
    StudentCheckpointHooks(accelerator, UNet2DConditionModel, ema).register()
    return accelerator, count_parameters(accelerator.unwrap_model(student))


def _default_config_dir():
    """A folder holding UNet2DConditionModel's default config (SD-1.x's layout), written without weights."""
    import tempfile

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    folder = tempfile.mkdtemp(prefix="sd15-unet-config-")
    with init_empty_weights():
        UNet2DConditionModel().save_config(folder)
    return folder


def main(argv=None):
    from aria_utils.training.checkpointing import checkpoint_bytes, save_checkpoint

    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Where checkpoints are written (and deleted after).")
    parser.add_argument("--student_config", default="bk_small")
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator, parameters = build(args.student_config, args.use_ema)
    results = []
    for repeat in range(args.repeats):
        subprocess.run(["sync"], check=False)
        started = time.perf_counter()
        path = save_checkpoint(accelerator, args.output_dir, repeat, {"global_step": repeat})
        written = time.perf_counter() - started
        subprocess.run(["sync"], check=False)
        synced = time.perf_counter() - started
        results.append({"written_s": round(written, 2), "synced_s": round(synced, 2),
                        "bytes": checkpoint_bytes(path)})
        print(f"repeat {repeat}: {results[-1]}", flush=True)
        shutil.rmtree(path)
    report = {"command": "python examples/benchmark/checkpoint_time.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "student_config": args.student_config, "student_parameters": parameters, "use_ema": args.use_ema,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
              "date": time.strftime("%Y-%m-%d"), "repeats": results}
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_cli(main)
