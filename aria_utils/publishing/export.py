"""The final artefact: a full diffusers pipeline folder with the student UNet in the teacher's place."""

from aria_utils.families import family_of_pipeline


def save_student_pipeline(student_unet, teacher_name_or_path, output_dir, load_kwargs=None):
    """Teacher's text encoder(s), VAE, tokenizer(s) and scheduler + the student UNet, in safetensors.

    The pipeline class of the teacher's family (e.g. `StableDiffusionPipeline`) loads it like any checkpoint
    of that family.
    """
    cls, extra = family_of_pipeline(teacher_name_or_path, **(load_kwargs or {})).pipeline_class()
    pipeline = cls.from_pretrained(teacher_name_or_path, unet=student_unet, **extra, **(load_kwargs or {}))
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return pipeline


def save_lora_student(trained_student, base_student, teacher_name_or_path, output_dir, load_kwargs=None, merge=False):
    """The base student pipeline + `pytorch_lora_weights.safetensors` (diffusers format), or with --lora_merge
    the adapter fused into the student's weights and no separate LoRA file."""
    import os

    from aria_utils.training.lora import LORA_WEIGHT_NAME, lora_layers_in_diffusers_format

    lora_layers = lora_layers_in_diffusers_format(trained_student)
    pipeline = save_student_pipeline(base_student, teacher_name_or_path, output_dir, load_kwargs)
    type(pipeline).save_lora_weights(output_dir, unet_lora_layers=lora_layers, weight_name=LORA_WEIGHT_NAME,
                                      safe_serialization=True)
    if merge:
        pipeline.load_lora_weights(output_dir, weight_name=LORA_WEIGHT_NAME)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
        pipeline.save_pretrained(output_dir, safe_serialization=True)
        os.remove(os.path.join(output_dir, LORA_WEIGHT_NAME))
    return pipeline
