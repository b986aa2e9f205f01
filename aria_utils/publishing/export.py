"""The final artefact: a full diffusers pipeline folder with the student denoiser in the teacher's place."""

from aria_utils.families import family_of_pipeline


def save_student_pipeline(student_unet, teacher_name_or_path, output_dir, load_kwargs=None, family=None):
    """Teacher's text encoder(s), VAE, tokenizer(s) and scheduler + the student denoiser, in safetensors.

    The pipeline class of the teacher's family (e.g. `StableDiffusionPipeline`, `StableDiffusion3Pipeline`)
    loads it like any checkpoint of that family. `family`: the teacher's, when the caller has it.
    """
    family = family or family_of_pipeline(teacher_name_or_path, **(load_kwargs or {}))
    cls, extra = family.pipeline_class()
    pipeline = cls.from_pretrained(teacher_name_or_path, **{family.denoiser_folder: student_unet}, **extra,
                                   **(load_kwargs or {}))
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return pipeline


def save_lora_student(trained_student, base_student, teacher_name_or_path, output_dir, load_kwargs=None, merge=False):
    """The base student pipeline + `pytorch_lora_weights.safetensors` (diffusers format), or with --lora_merge
    the adapter fused into the student's weights and no separate LoRA file."""
    import os

    from aria_utils.training.lora import LORA_WEIGHT_NAME

    family = family_of_pipeline(teacher_name_or_path, **(load_kwargs or {}))
    lora_layers = family.lora_layers(trained_student)
    pipeline = save_student_pipeline(base_student, teacher_name_or_path, output_dir, load_kwargs, family)
    # The pipeline's LoRA loader names the denoiser's layers after it: unet_lora_layers / transformer_lora_layers.
    type(pipeline).save_lora_weights(output_dir, **{f"{family.denoiser_folder}_lora_layers": lora_layers},
                                      weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    if merge:
        pipeline.load_lora_weights(output_dir, weight_name=LORA_WEIGHT_NAME)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
        pipeline.save_pretrained(output_dir, safe_serialization=True)
        os.remove(os.path.join(output_dir, LORA_WEIGHT_NAME))
    return pipeline
