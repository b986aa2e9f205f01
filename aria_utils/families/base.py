"""What every model family provides, and the parts the UNet families (SD-1.x/2.x, SDXL) share.

A family is one module (`sd.py`, `sdxl.py`) holding one `ModelFamily` object, registered in
`families/__init__.py`. The rest of the project asks the family it was handed: how to recognise a
checkpoint, load and freeze the teacher, turn prompts into the denoiser's conditioning, which diffusers
pipeline generates and exports, which student variants exist, and what the model card says. Nothing
outside `families/` asks *which* family it holds.
"""

from dataclasses import dataclass, field

import torch


def vae_scale_factor(vae_config):
    """Image pixels per latent pixel: the VAE halves the resolution at every stage but the last."""
    return 2 ** (len(dict(vae_config)["block_out_channels"]) - 1)


def latents_from_vae(vae_sample, vae_config):
    """The denoiser's latents from a VAE posterior sample: shifted (SD 3.x's VAE has a shift) and scaled."""
    config = dict(vae_config)
    return (vae_sample - (config.get("shift_factor") or 0.0)) * config["scaling_factor"]


def vae_input_from_latents(latents, vae_config):
    """The inverse of `latents_from_vae`: what `vae.decode` takes."""
    config = dict(vae_config)
    return latents / config["scaling_factor"] + (config.get("shift_factor") or 0.0)


@dataclass
class FrozenTeacher:
    """The teacher's components, frozen and in eval mode; `text_encoders[i]` goes with `tokenizers[i]`."""

    family: "ModelFamily"
    tokenizers: list
    text_encoders: list
    noise_scheduler: object
    vae: object
    unet: object  # the denoiser: a UNet, or SD 3.x's transformer
    extra: dict = field(default_factory=dict)

    def prompt_encoder(self, max_sequence_length=None):
        return self.family.prompt_encoder(self.tokenizers, self.text_encoders, max_sequence_length)


class ModelFamily:
    """One model family. Subclasses set the class attributes and override what differs."""

    name = ""  # short id, e.g. "sd" or "sdxl"
    pipeline_class_name = ""  # the diffusers pipeline that generates with, and loads, a checkpoint of the family
    text_encoder_folders = ()  # (tokenizer subfolder, text encoder subfolder, transformers class name or None)
    card_tags = ()  # Hub tags beyond the project's own
    missing_folders_message = ""  # the start of the error when required_folders() are missing
    student_variants = ()  # --student_config values this family's teachers can have
    denoiser_class_name = "UNet2DConditionModel"  # diffusers classes, by name (imported when asked for)
    scheduler_class_name = "DDPMScheduler"  # what the teacher was trained with; its scheduler/ config is read as it
    sampling_scheduler_class_name = "DDIMScheduler"  # a deterministic few-step sampler for validation and evaluation
    flow_matching = False  # trained with flow matching (--weighting_scheme and its parameters apply)
    takes_max_sequence_length = False  # has a T5 encoder whose prompt length --max_sequence_length sets
    denoiser_folder = "unet"  # the denoiser's subfolder in a pipeline folder, and its pipeline argument
    denoiser_description = "UNet"  # how messages and the model card name the denoiser
    # LoRA's default targets in the denoiser (peft module-name suffixes): the attention projections.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    # ----- recognising a checkpoint -----------------------------------------------------------------
    def recognises(self, denoiser_config):
        """Whether a teacher with this denoiser config belongs to the family."""
        raise NotImplementedError

    def recognises_single_file(self, tensor_names):
        """Whether a single-file checkpoint with these tensor names belongs to the family."""
        raise NotImplementedError

    def required_folders(self):
        """Subfolders a pipeline of the family must have besides its denoiser's and scheduler/ (checked before
        loading)."""
        return [f"{folder}/" for tokenizer, text_encoder, _ in self.text_encoder_folders
                for folder in (text_encoder, tokenizer)]

    # ----- the denoiser and its noise ---------------------------------------------------------------
    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    def scheduler_class(self):
        import diffusers

        return getattr(diffusers, self.scheduler_class_name)

    def sampling_scheduler(self, scheduler_config):
        import diffusers

        return getattr(diffusers, self.sampling_scheduler_class_name).from_config(scheduler_config)

    def noise_class(self):
        """The teacher's training noise (`noise.py`): flow matching, or DDPM's discrete timesteps."""
        from aria_utils.families.noise import DiscreteNoise, FlowMatchingNoise

        return FlowMatchingNoise if self.flow_matching else DiscreteNoise

    def training_noise(self, scheduler, flow_matching_sampling=None):
        """The noise object for `scheduler`; `flow_matching_sampling` is read by flow-matching families only."""
        if self.flow_matching:
            return self.noise_class()(scheduler, flow_matching_sampling)
        return self.noise_class()(scheduler)

    def scheduler_problem(self, scheduler_config):
        """Why this script cannot train against a teacher with this scheduler config (None: it can)."""
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            return (f"the teacher's scheduler predicts {prediction_type!r}; this script trains epsilon, v_prediction, "
                    "sample UNet teachers and flow-matching SD 3.x transformers.")
        return None

    text_tokens = 77  # the text sequence the denoiser attends to (CLIP's 77 tokens)

    def example_conditioning(self, denoiser_config, batch_size, device, dtype, text_tokens=None):
        """Zero conditioning shaped as the prompt encoder gives it (for counting costs without text encoders)."""
        states = torch.zeros(batch_size, text_tokens or self.text_tokens, denoiser_config["cross_attention_dim"],
                             device=device, dtype=dtype)
        return states, None

    def denoise(self, model, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs):
        """One denoiser forward pass on the prompt encoder's conditioning; the prediction tensor."""
        return model(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                     return_dict=False)[0]

    # ----- the teacher ------------------------------------------------------------------------------
    def load_teacher(self, path, revision=None, variant=None, cache_dir=None):
        """Tokenizer(s), training scheduler, text encoder(s), VAE and UNet of `path`, frozen and in eval mode."""
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer

        config_kwargs = dict(revision=revision, cache_dir=cache_dir)  # a variant names weight files, not configs
        weight_kwargs = dict(config_kwargs, variant=variant)
        teacher = FrozenTeacher(
            family=self,
            tokenizers=[AutoTokenizer.from_pretrained(path, subfolder=tokenizer_folder, **config_kwargs)
                        for tokenizer_folder, _, _ in self.text_encoder_folders],
            text_encoders=[self._text_encoder_class(class_name).from_pretrained(path, subfolder=folder, **weight_kwargs)
                           for _, folder, class_name in self.text_encoder_folders],
            noise_scheduler=self.scheduler_class().from_pretrained(path, subfolder="scheduler", **config_kwargs),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weight_kwargs),
            unet=self.denoiser_class().from_pretrained(path, subfolder=self.denoiser_folder, **weight_kwargs),
        )
        for frozen in (*teacher.text_encoders, teacher.vae, teacher.unet):
            frozen.requires_grad_(False)
            frozen.eval()
        return teacher

    def load_quantized_denoiser_and_text_encoders(self, path, mode, compute_dtype, load_kwargs):
        """Teacher denoiser and text encoder(s) through bitsandbytes (GPU only; checked at start)."""
        from diffusers import BitsAndBytesConfig as DiffusersBitsAndBytesConfig
        from transformers import BitsAndBytesConfig as TransformersBitsAndBytesConfig

        options = ({"load_in_8bit": True} if mode == "8bit" else
                   {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype})
        unet = self.denoiser_class().from_pretrained(path, subfolder=self.denoiser_folder,
                                                     quantization_config=DiffusersBitsAndBytesConfig(**options),
                                                     torch_dtype=compute_dtype, **load_kwargs)
        text_encoders = [self._text_encoder_class(class_name).from_pretrained(
            path, subfolder=folder, quantization_config=TransformersBitsAndBytesConfig(**options), **load_kwargs)
            for _, folder, class_name in self.text_encoder_folders]
        for model in (unet, *text_encoders):
            model.requires_grad_(False)
            model.eval()
        return unet, text_encoders

    @staticmethod
    def _text_encoder_class(class_name):
        import transformers

        # AutoModel resolves a folder's own architecture (CLIPTextModel, or the benchmark's MiniLM).
        return getattr(transformers, class_name or "AutoModel")

    prompt_encoder_class = None  # a PromptEncoderBase subclass

    def prompt_encoder(self, tokenizers, text_encoders, max_sequence_length=None):
        """`max_sequence_length`: the T5 prompt length of families with a T5 encoder (ignored by the others)."""
        if self.takes_max_sequence_length:
            return self.prompt_encoder_class(self, tokenizers, text_encoders, max_sequence_length)
        return self.prompt_encoder_class(self, tokenizers, text_encoders)

    # ----- generation and export --------------------------------------------------------------------
    def pipeline_class(self):
        """The diffusers pipeline class and the keyword arguments that keep it offline and quiet."""
        raise NotImplementedError

    def build_pipeline(self, unet, vae, prompt_encoder, scheduler):
        """A pipeline from in-memory components (validation images, evaluation samples)."""
        cls, extra = self.pipeline_class()
        pipeline = cls(vae=vae, scheduler=scheduler, **{self.denoiser_folder: unet},
                       **prompt_encoder.pipeline_components(), **self.in_memory_pipeline_extras(extra))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def in_memory_pipeline_extras(self, extra):
        return extra

    def generation_micro_conditioning(self, resolution):
        """What each row of a generated paired set records about its image size (None: nothing)."""
        return None

    # ----- students ---------------------------------------------------------------------------------
    def student_config(self, teacher_config, variant):
        """The student's denoiser config for --student_config `variant` (ValueError when it cannot exist)."""
        from aria_utils.families import unet_students

        return unet_students.student_config_from_teacher(teacher_config, variant)

    def build_student(self, teacher_denoiser, variant):
        """The student denoiser (fp32), initialised from the teacher's weights where the variant inherits them."""
        from aria_utils.families import unet_students

        return unet_students.build_student(teacher_denoiser, variant)

    def student_origin(self, variant):
        """The paper a student variant comes from, for the model card."""
        from aria_utils.families import unet_students

        return unet_students.student_family(variant)

    def needs_feature_projection(self, student, teacher):
        from aria_utils.families import unet_students

        return unet_students.needs_feature_projection(student, teacher)

    def lora_layers(self, denoiser):
        """The trained adapter's weights as the family's pipeline saves them (`save_lora_weights`): UNet LoRA in
        diffusers' own naming, as diffusers' UNet training scripts write it."""
        from aria_utils.training.lora import lora_layers_in_diffusers_format

        return lora_layers_in_diffusers_format(denoiser)

    @staticmethod
    def feature_output(output):
        """The tensor feature KD compares, from a hooked module's output (`losses.block_output`: a UNet block's
        first output)."""
        from aria_utils.training.losses import block_output

        return block_output(output)

    def feature_layer_pairs(self, student, teacher):
        """(student module, teacher module) names whose outputs feature KD compares."""
        from aria_utils.families import unet_students

        return unet_students.feature_layer_pairs(student, teacher)

    # ----- the model card ---------------------------------------------------------------------------
    def license(self, denoiser_config):
        """A distilled student is a derivative of its teacher: it carries the teacher family's licence."""
        raise NotImplementedError

    def license_details(self, denoiser_config):
        """The card's license_name / license_link where the licence is "other"."""
        return {}


class PromptEncoderBase:
    """Prompts -> (encoder_hidden_states, added_cond_kwargs) for the teacher's denoiser (and so the student's).

    `uses_time_ids` says whether the conditioning takes each image's size and crop (SDXL's micro-conditioning):
    the data pipeline moves them to the device only then.
    """

    uses_time_ids = False

    def __init__(self, family, tokenizers, text_encoders):
        self.family = family
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)

    def tokenize(self, prompts):
        """One LongTensor (batch, max_length) per tokenizer."""
        return tuple(tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids for tokenizer in self.tokenizers)

    def encode(self, input_ids, time_ids=None):
        """Call under torch.no_grad()."""
        raise NotImplementedError

    def default_time_ids(self, image_size, batch_size):
        return None

    def encode_prompts(self, prompts, device, time_ids=None, image_size=None):
        """`time_ids` (batch, 6) where the family takes them; else those of a generated `image_size` image."""
        if time_ids is None and image_size is not None:
            time_ids = self.default_time_ids(image_size, len(prompts))
        return self.encode(tuple(ids.to(device) for ids in self.tokenize(prompts)), time_ids)

    def pipeline_call_kwargs(self):
        """What a pipeline call needs to condition as training does (e.g. SD 3.x's T5 prompt length)."""
        return {}

    def conditioning_tokens(self):
        """The length of the text sequence the denoiser attends to."""
        return self.tokenizers[0].model_max_length

    def pipeline_components(self):
        """The text components under the names a diffusers pipeline takes them."""
        components = {}
        for number, (tokenizer, text_encoder) in enumerate(zip(self.tokenizers, self.text_encoders), start=1):
            suffix = "" if number == 1 else f"_{number}"
            components.update({f"tokenizer{suffix}": tokenizer, f"text_encoder{suffix}": text_encoder})
        return components


def check_encoder_count(tokenizers, text_encoders, expected, family_name):
    if len(tokenizers) != expected or len(text_encoders) != expected:
        raise ValueError(f"A {family_name} prompt encoder takes {expected} tokenizer(s) and as many text encoders.")

