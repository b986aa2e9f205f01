"""How much smaller and faster a student is than its teacher (the measuring itself: aria_utils/evaluation/speed.py).

    # A trained student (pipeline, denoiser or LoRA folder), on this machine's GPU in bf16:
    python -m aria_utils.speed --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --student bk-small-aria \\
        --device cuda --mixed_precision bf16
    # What a student variant would cost, from the configs alone (no weights, any machine):
    python -m aria_utils.speed --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --student_config bk_small \\
        --config_only

Prints a table (parameters, MACs per forward, forward latency at batch 1 and 2, a whole generation) and
writes it with the numbers to --output_file (JSON). Training writes the same report for its student at the
end (train_summary.json, the model card).
"""

from aria_utils.cli import UserInputError, argument_parser, run_cli


def parse_args(argv=None):
    parser = argument_parser("Parameters, MACs and latency of a student against its teacher.")
    parser.add_argument("--teacher", required=True, help="Teacher pipeline: hub id or diffusers folder.")
    student = parser.add_mutually_exclusive_group(required=True)
    student.add_argument("--student", default=None,
                         help="Trained student: pipeline, denoiser or LoRA folder (or hub id).")
    student.add_argument("--student_config", default=None,
                         help="A student variant of the teacher (e.g. bk_small, koala_700m, depth_1_2), built from the "
                              "teacher's config (and weights, unless --config_only).")
    parser.add_argument("--config_only", action="store_true",
                        help="Parameters and MACs from the configs on the meta device; nothing is loaded or timed.")
    parser.add_argument("--resolution", type=int, default=None, help="Image size; default: the teacher's.")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                        help="The dtype both denoisers run in (fp16 needs a GPU).")
    parser.add_argument("--generation_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed runs before the timed ones.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs; the median is reported.")
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help="SD 3.x: the T5 prompt length (default: the training default, 77).")
    parser.add_argument("--output_file", default=None, help="Also write the report here (JSON).")
    args = parser.parse_args(argv)
    for flag in ("generation_steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}.")
    if args.mixed_precision == "fp16" and not args.device.startswith("cuda"):
        parser.error("--mixed_precision fp16 needs a GPU (--device cuda); use bf16 or no on a CPU.")
    return args


def _cuda_available():
    import torch

    return torch.cuda.is_available()


def config_report(family, teacher_config, student_config, vae_config, resolution, text_tokens=None):
    """Parameters and MACs of teacher and student from their configs (meta device), with the student's ratios."""
    from aria_utils.evaluation.speed import count_parameters, macs_from_config
    from aria_utils.families import denoiser_on_meta_device

    report = {"resolution": resolution}
    for name, config in (("teacher", teacher_config), ("student", student_config)):
        report[name] = {"parameters": count_parameters(denoiser_on_meta_device(config, family)),
                        **macs_from_config(family, config, resolution, vae_config, text_tokens)}
    report["student_vs_teacher"] = {key: report["student"][key] / report["teacher"][key]
                                    for key in ("parameters", "macs", "macs_without_attention_products")}
    return report


def main(argv=None):
    import torch
    from diffusers import AutoencoderKL

    from aria_utils.families import denoiser_config_of_pipeline, load_frozen_teacher, vae_scale_factor
    from aria_utils.quiet import silence_known_harmless_messages

    silence_known_harmless_messages()
    args = parse_args(argv)
    try:
        family, teacher_config = denoiser_config_of_pipeline(args.teacher)
        vae_config = AutoencoderKL.load_config(args.teacher, subfolder="vae")
    except OSError as error:
        raise UserInputError(f"--teacher {args.teacher!r}: its denoiser and vae/ configs could not be read "
                             f"({error}).") from None
    if args.student_config is not None and args.student_config not in family.student_variants:
        raise UserInputError(f"--student_config {args.student_config!r} is not a student of this {family.name} "
                             f"teacher; choose one of {', '.join(family.student_variants)}.")
    resolution = args.resolution or teacher_config["sample_size"] * vae_scale_factor(vae_config)
    text_tokens = None
    if args.max_sequence_length is not None:
        text_tokens = 77 + args.max_sequence_length
    if args.config_only:
        from aria_utils.evaluate import unet_config

        student_config = (family.student_config(teacher_config, args.student_config) if args.student_config
                          else unet_config(args.student, args.teacher))
        report = config_report(family, teacher_config, student_config, vae_config, resolution, text_tokens)
        table = config_table(report, family.denoiser_description)
    else:
        from aria_utils.evaluate import load_student_unet
        from aria_utils.evaluation.speed import speed_report, speed_table

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        teacher = load_frozen_teacher(args.teacher)
        student = (family.build_student(teacher.unet, args.student_config) if args.student_config
                   else load_student_unet(args.student, args.teacher))
        for model in (teacher.unet, student, teacher.vae, *teacher.text_encoders):
            model.to(args.device, dtype)
        prompt_encoder = teacher.prompt_encoder(args.max_sequence_length)
        report = speed_report(family, teacher.unet, student, teacher.vae, prompt_encoder,
                              teacher.noise_scheduler.config, resolution, args.device, dtype,
                              generation_steps=args.generation_steps, warmup=args.warmup, repeats=args.repeats,
                              guidance_scale=args.guidance_scale)
        table = speed_table(report, family.denoiser_description)
    report.update(teacher_path=args.teacher, student_path=args.student, student_config=args.student_config)
    print(table)
    if args.output_file:
        from aria_utils.files import write_json_atomically

        write_json_atomically(args.output_file, report)
    return report


def config_table(report, denoiser_description="UNet"):
    from aria_utils.evaluation.speed import macs_text

    teacher, student, ratio = report["teacher"], report["student"], report["student_vs_teacher"]

    def row(name, costs):
        return (f"| {name} | {costs['parameters'] / 1e6:,.1f}M | {macs_text(costs['macs'])} | "
                f"{macs_text(costs['macs_without_attention_products'])} |")

    return "\n".join([
        f"| | {denoiser_description} parameters | MACs per forward | without attention products (as BK-SDM) |",
        "|---|---|---|---|", row("teacher", teacher), row("student", student),
        f"| student / teacher | {ratio['parameters']:.0%} | {ratio['macs']:.0%} | "
        f"{ratio['macs_without_attention_products']:.0%} |",
        "", f"From the configs on the meta device, batch 1, {report['resolution']} px; nothing was timed."])


if __name__ == "__main__":
    run_cli(main)
