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


def save_lora_student(trained_student, base_student, teacher_name_or_path, output_dir, load_kwargs=None, merge=False):
    """The base student pipeline + `pytorch_lora_weights.safetensors` (diffusers format), or with --lora_merge
    the adapter fused into the student's weights and no separate LoRA file."""
    import os

    from diffusers import StableDiffusionPipeline

    from aria_utils.lora import LORA_WEIGHT_NAME, lora_layers_in_diffusers_format

    lora_layers = lora_layers_in_diffusers_format(trained_student)
    pipeline = save_student_pipeline(base_student, teacher_name_or_path, output_dir, load_kwargs)
    StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=lora_layers, weight_name=LORA_WEIGHT_NAME,
                                              safe_serialization=True)
    if merge:
        pipeline.load_lora_weights(output_dir, weight_name=LORA_WEIGHT_NAME)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
        pipeline.save_pretrained(output_dir, safe_serialization=True)
        os.remove(os.path.join(output_dir, LORA_WEIGHT_NAME))
    return pipeline
