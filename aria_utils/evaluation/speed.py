"""What a student costs against its teacher: parameters, MACs per denoiser forward, and measured latency.

- Parameters as diffusers counts them (`parameters()`, buffers excluded).
- MACs of one denoiser forward at batch 1 and the training resolution, counted by PyTorch's own
  `torch.utils.flop_counter.FlopCounterMode` on the meta device (convolutions, linear layers and attention's
  products; a multiply-accumulate is two FLOPs; norms and activations are not counted). Counting needs only
  the config: nothing is allocated, so full-size models are counted on any machine. BK-SDM's table (SD-1.4's
  UNet: 339G MACs at 512 px) leaves out attention's Q K^T and A V products; both counts are reported: ours
  for SD-1.4 are 402G with them and 339G without (tests/test_speed.py).
- Latency: the median of timed repeats after warm-up, of one forward at batch 1 and at batch 2 (what
  classifier-free guidance runs per step), and of a whole generation (25 steps by default, with guidance),
  on the device, dtype and attention implementation named in the report.
"""

import statistics
import time

import torch

from aria_utils.families import vae_scale_factor

DEFAULT_GENERATION_STEPS = 25


def count_parameters(model):
    return sum(parameter.numel() for parameter in model.parameters())


def example_forward_inputs(family, denoiser_config, resolution, vae_config, batch_size, device, dtype,
                           text_tokens=None):
    """(noisy latents, timesteps, encoder hidden states, added_cond_kwargs) shaped as the family's prompt encoder
    and training data give them, for `resolution`-pixel images; values are zeros (costs do not depend on them)."""
    latent_size = resolution // vae_scale_factor(vae_config)
    channels = denoiser_config["in_channels"]
    latents = torch.zeros(batch_size, channels, latent_size, latent_size, device=device, dtype=dtype)
    timesteps = torch.full((batch_size,), 500, device=device, dtype=family.noise_class().timestep_dtype)
    states, added = family.example_conditioning(denoiser_config, batch_size, device, dtype, text_tokens)
    return latents, timesteps, states, added


# What attention's own products (Q K^T and the weighted sum of V) become under the counter.
ATTENTION_PRODUCT_OPS = ("bmm", "baddbmm", "_scaled_dot_product", "_flash_attention", "_efficient_attention")


def count_macs(family, model, inputs):
    """(all MACs, MACs of attention's Q K^T and A V products) of one forward pass of `model` on `inputs`."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        family.denoise(model, *inputs)
    attention = sum(flops for op, flops in counter.get_flop_counts()["Global"].items()
                    if any(name in str(op) for name in ATTENTION_PRODUCT_OPS))
    return counter.get_total_flops() // 2, attention // 2


def macs_from_config(family, denoiser_config, resolution, vae_config, text_tokens=None):
    """MACs of one batch-1 forward of a denoiser with this config, counted on the meta device (no weights, and the
    same count on every machine: there PyTorch's attention runs as the matrix products the counter knows, while
    its fused CPU kernel would go uncounted).

    Returns {"macs": all of them, "macs_without_attention_products": without Q K^T and A V, as module-based
    counters (BK-SDM's table) count}."""
    from aria_utils.families import denoiser_on_meta_device

    model = denoiser_on_meta_device(denoiser_config, family)
    inputs = example_forward_inputs(family, denoiser_config, resolution, vae_config, 1, "meta", torch.float32,
                                    text_tokens)
    total, attention = count_macs(family, model, inputs)
    return {"macs": total, "macs_without_attention_products": total - attention}


def attention_implementation(model):
    """How the denoiser's attention runs: diffusers' processor, and for PyTorch SDPA the kernels it may pick."""
    processors = sorted({type(processor).__name__ for processor in model.attn_processors.values()})
    name = ", ".join(processors)
    if any(processor.endswith("2_0") for processor in processors):
        name += " (torch scaled_dot_product_attention"
        if torch.cuda.is_available():
            kernels = [kernel for kernel, enabled in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                                      ("memory-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                                      ("math", torch.backends.cuda.math_sdp_enabled())) if enabled]
            name += ": " + " / ".join(kernels)
        name += ")"
    return name


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run, device, warmup=2, repeats=5):
    """Median wall time of `run()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_denoiser(family, model, vae_config, resolution, device, dtype, warmup=2, repeats=5, text_tokens=None):
    """Parameters, MACs (batch 1) and the median forward latency at batch 1 and 2 of one denoiser."""
    result = {"parameters": count_parameters(model),
              **macs_from_config(family, dict(model.config), resolution, vae_config, text_tokens)}
    for batch_size in (1, 2):
        inputs = example_forward_inputs(family, dict(model.config), resolution, vae_config, batch_size, device,
                                        dtype, text_tokens)
        result[f"forward_seconds_batch_{batch_size}"] = median_seconds(
            lambda inputs=inputs: family.denoise(model, *inputs), device, warmup, repeats)
    return result


@torch.no_grad()
def measure_generation(pipeline, resolution, device, steps=DEFAULT_GENERATION_STEPS, guidance_scale=7.5, warmup=1,
                       repeats=3, call_kwargs=None):
    """Median seconds of one whole `steps`-step generation with classifier-free guidance (latents out, no decode:
    the VAE is the same for teacher and student)."""
    def generate():
        pipeline("a photo of an astronaut riding a horse", num_inference_steps=steps, guidance_scale=guidance_scale,
                 height=resolution, width=resolution, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **(call_kwargs or {}))

    return median_seconds(generate, device, warmup, repeats)


def speed_report(family, teacher, student, vae, prompt_encoder, scheduler_config, resolution, device, dtype,
                 generation_steps=DEFAULT_GENERATION_STEPS, warmup=2, repeats=5, guidance_scale=7.5):
    """Teacher against student on `device` in `dtype`: the report `train_summary.json` and the model card hold."""
    text_tokens = prompt_encoder.conditioning_tokens()
    report = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "attention": attention_implementation(student), "resolution": resolution,
              "generation_steps": generation_steps, "warmup": warmup, "repeats": repeats}
    call_kwargs = prompt_encoder.pipeline_call_kwargs()
    for name, model in (("teacher", teacher), ("student", student)):
        was_training = model.training
        model.eval()
        measured = measure_denoiser(family, model, vae.config, resolution, device, dtype, warmup, repeats,
                                    text_tokens)
        pipeline = family.build_pipeline(model, vae, prompt_encoder, family.sampling_scheduler(scheduler_config))
        measured["generation_seconds"] = measure_generation(pipeline, resolution, device, generation_steps,
                                                            guidance_scale, warmup=min(1, warmup),
                                                            repeats=max(1, repeats // 2), call_kwargs=call_kwargs)
        model.train(was_training)
        report[name] = measured
    teacher_costs, student_costs = report["teacher"], report["student"]
    report["student_vs_teacher"] = {
        "parameters": student_costs["parameters"] / teacher_costs["parameters"],
        "macs": student_costs["macs"] / teacher_costs["macs"],
        **{f"speedup_{key}": teacher_costs[key] / student_costs[key]
           for key in ("forward_seconds_batch_1", "forward_seconds_batch_2", "generation_seconds")},
    }
    return report


def macs_text(macs):
    """G below a trillion and M below a billion (the tiny test models), so no count shows as 0.0."""
    return f"{macs / 1e9:,.1f}G" if macs >= 1e9 else f"{macs / 1e6:,.1f}M"


def speed_table(report, denoiser_description="UNet"):
    """Markdown: the teacher's and student's sizes and times, and the student's ratios."""
    teacher, student, ratio = report["teacher"], report["student"], report["student_vs_teacher"]

    def row(name, costs):
        return (f"| {name} | {costs['parameters'] / 1e6:,.1f}M | {macs_text(costs['macs'])} "
                f"({macs_text(costs['macs_without_attention_products'])}) | "
                f"{costs['forward_seconds_batch_1'] * 1e3:,.1f} ms | {costs['forward_seconds_batch_2'] * 1e3:,.1f} ms | "
                f"{costs['generation_seconds']:,.2f} s |")

    return "\n".join([
        f"| | {denoiser_description} parameters | MACs per forward (without attention products, as BK-SDM counts) "
        f"| forward, batch 1 | forward, batch 2 | "
        f"{report['generation_steps']}-step generation |",
        "|---|---|---|---|---|---|",
        row("teacher", teacher),
        row("student", student),
        f"| student / teacher | {ratio['parameters']:.0%} | {ratio['macs']:.0%} | "
        f"{ratio['speedup_forward_seconds_batch_1']:.2f}x faster | {ratio['speedup_forward_seconds_batch_2']:.2f}x faster "
        f"| {ratio['speedup_generation_seconds']:.2f}x faster |",
        "",
        f"Measured on {report['device']}, {report['dtype']}, attention: {report['attention']}; "
        f"{report['resolution']} px; forwards: median of {report['repeats']} timed runs after {report['warmup']} "
        f"warm-up, generations: median of {max(1, report['repeats'] // 2)} after {min(1, report['warmup'])}; "
        "MACs counted by torch.utils.flop_counter at batch 1.",
    ])
