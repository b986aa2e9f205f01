"""Validation images: teacher row over student row, same prompts, seeds and scheduler, labelled.

The teacher's images never change during training, so they are generated once and reused.
"""

import os

import numpy as np
import torch

from aria_utils.training.preemption import stop_when_preempted


@torch.no_grad()
def generate_images(pipeline, prompts, seed, num_inference_steps, guidance_scale, resolution, device,
                    **call_kwargs):
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(seed + index)
        output = pipeline(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          height=resolution, width=resolution, generator=generator, output_type="np",
                          callback_on_step_end=stop_when_preempted, **call_kwargs)
        images.append(output.images[0])
    return np.stack(images)


def image_grid(rows):
    """Stack rows of (N, H, W, 3) float images in [0, 1] into one uint8 (rows*H, N*W, 3) array."""
    return (np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0) * 255).round().astype(np.uint8)


def labelled_grid(rows, row_labels, column_labels, min_size=256):
    """`image_grid`, readable: every image scaled up (nearest, so pixels stay visible) to at least
    `min_size` pixels, a label left of each row and the (wrapped) prompt above each column. A column
    label's lines ("\n") are wrapped one by one: the prompt first, then e.g. its region and seed."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    height, width = rows[0][0].shape[:2]
    scale = max(1, -(-min_size // min(height, width)))
    cell_height, cell_width = height * scale, width * scale
    font = ImageFont.load_default(size=14)
    wrapped = [[line for part in label.split("\n") for line in textwrap.wrap(part, width=max(8, cell_width // 8))[:4]]
               for label in column_labels]
    header = 8 + 18 * max(len(lines) for lines in wrapped)
    margin = 8 + 8 * max(len(label) for label in row_labels)
    canvas = Image.new("RGB", (margin + cell_width * len(column_labels), header + cell_height * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, lines in enumerate(wrapped):
        for line_index, line in enumerate(lines):
            draw.text((margin + column * cell_width + 4, 4 + 18 * line_index), line, fill="black", font=font)
    for row_index, (row, label) in enumerate(zip(rows, row_labels)):
        top = header + row_index * cell_height
        draw.text((4, top + cell_height // 2 - 7), label, fill="black", font=font)
        for column, image in enumerate(row):
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
            canvas.paste(tile.resize((cell_width, cell_height), Image.NEAREST), (margin + column * cell_width, top))
    return np.asarray(canvas)


class Validator:
    """Generates and logs teacher-vs-student images every --validation_steps."""

    def __init__(self, prompts, teacher_unet, vae, prompt_encoder, scheduler, resolution, seed,
                 num_inference_steps, guidance_scale, output_dir, device, region_names=None):
        self.prompts = list(prompts)
        # Above each column: the prompt, its region (when regions exist) and the seed of its image.
        self.column_labels = [
            f"{prompt}\n" + (f"region {region_names[index]}; " if region_names else "") + f"seed {seed + index}"
            for index, prompt in enumerate(self.prompts)]
        self.training_scheduler_config = scheduler.config
        self.vae, self.prompt_encoder = vae, prompt_encoder
        self.teacher_unet = teacher_unet
        self.resolution = resolution
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.output_dir = os.path.join(output_dir, "validation")
        self.device = device
        self._teacher_images = None

    def _generate(self, unet):
        family = self.prompt_encoder.family
        # The family's few-step sampler (DDIM for the UNet families): DDPM needs ~1000 steps to give images.
        scheduler = family.sampling_scheduler(self.training_scheduler_config)
        pipeline = family.build_pipeline(unet, self.vae, self.prompt_encoder, scheduler)
        return generate_images(pipeline, self.prompts, self.seed, self.num_inference_steps, self.guidance_scale,
                               self.resolution, self.device, **self.prompt_encoder.pipeline_call_kwargs())

    def run(self, student_unet, step, trackers=()):
        """Generate, save `validation/step-<step>.png`, log to the trackers; return the grid array."""
        from PIL import Image

        if self._teacher_images is None:
            self._teacher_images = self._generate(self.teacher_unet)
        student_images = self._generate(student_unet)
        grid = labelled_grid([self._teacher_images, student_images], ["teacher", f"student, step {step}"],
                             self.column_labels)
        os.makedirs(self.output_dir, exist_ok=True)
        Image.fromarray(grid).save(os.path.join(self.output_dir, f"step-{step}.png"))
        log_image(trackers, "validation/teacher_over_student", grid, step)
        return grid


def log_image(trackers, name, image, step):
    """Send an (H, W, 3) uint8 image to every tracker that takes images: TensorBoard and wandb."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, image, step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step=step)  # accelerate wraps each in wandb.Image
