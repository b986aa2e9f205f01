"""The final artefact: a full diffusers pipeline folder with the student UNet in the teacher's place."""


def save_student_pipeline(student_unet, teacher_name_or_path, output_dir, load_kwargs=None):
    """Teacher's text encoder, VAE, tokenizer and scheduler + the student UNet, in safetensors.

    `StableDiffusionPipeline.from_pretrained(output_dir)` loads it like any SD checkpoint.
    """
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        teacher_name_or_path, unet=student_unet, safety_checker=None, requires_safety_checker=False,
        **(load_kwargs or {}),
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return pipeline
