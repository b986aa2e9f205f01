"""What every model family provides, and the parts the UNet families (SD-1.x/2.x, SDXL) share.

A family is one module (`sd.py`, `sdxl.py`) holding one `ModelFamily` object, registered in
`families/__init__.py`. The rest of the project asks the family it was handed: how to recognise a
checkpoint, load and freeze the teacher, turn prompts into the denoiser's conditioning, which diffusers
pipeline generates and exports, which student variants exist, and what the model card says. Nothing
outside `families/` asks *which* family it holds.
"""

from dataclasses import dataclass, field


def vae_scale_factor(vae_config):
    """Image pixels per latent pixel: the VAE halves the resolution at every stage but the last."""
    return 2 ** (len(dict(vae_config)["block_out_channels"]) - 1)


@dataclass
class FrozenTeacher:
    """The teacher's components, frozen and in eval mode; `text_encoders[i]` goes with `tokenizers[i]`."""

    family: "ModelFamily"
    tokenizers: list
    text_encoders: list
    noise_scheduler: object
    vae: object
    unet: object
    extra: dict = field(default_factory=dict)

    def prompt_encoder(self):
        return self.family.prompt_encoder(self.tokenizers, self.text_encoders)


class ModelFamily:
    """One model family. Subclasses set the class attributes and override what differs."""

    name = ""  # short id, e.g. "sd" or "sdxl"
    pipeline_class_name = ""  # the diffusers pipeline that generates with, and loads, a checkpoint of the family
    text_encoder_folders = ()  # (tokenizer subfolder, text encoder subfolder, transformers class name or None)
    card_tags = ()  # Hub tags beyond the project's own
    missing_folders_message = ""  # the start of the error when required_folders() are missing
    student_variants = ()  # --student_config values this family's teachers can have

    # ----- recognising a checkpoint -----------------------------------------------------------------
    def recognises(self, denoiser_config):
        """Whether a teacher with this denoiser config belongs to the family."""
        raise NotImplementedError

    def recognises_single_file(self, tensor_names):
        """Whether a single-file checkpoint with these tensor names belongs to the family."""
        raise NotImplementedError

    def required_folders(self):
        """Subfolders a pipeline of the family must have besides unet/ and scheduler/ (checked before loading)."""
        return [f"{folder}/" for tokenizer, text_encoder, _ in self.text_encoder_folders
                for folder in (text_encoder, tokenizer)]

    # ----- the teacher ------------------------------------------------------------------------------
    def load_teacher(self, path, revision=None, variant=None, cache_dir=None):
        """Tokenizer(s), training scheduler, text encoder(s), VAE and UNet of `path`, frozen and in eval mode."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        config_kwargs = dict(revision=revision, cache_dir=cache_dir)  # a variant names weight files, not configs
        weight_kwargs = dict(config_kwargs, variant=variant)
        teacher = FrozenTeacher(
            family=self,
            tokenizers=[AutoTokenizer.from_pretrained(path, subfolder=tokenizer_folder, **config_kwargs)
                        for tokenizer_folder, _, _ in self.text_encoder_folders],
            text_encoders=[self._text_encoder_class(class_name).from_pretrained(path, subfolder=folder, **weight_kwargs)
                           for _, folder, class_name in self.text_encoder_folders],
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **config_kwargs),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weight_kwargs),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weight_kwargs),
        )
        for frozen in (*teacher.text_encoders, teacher.vae, teacher.unet):
            frozen.requires_grad_(False)
            frozen.eval()
        return teacher

    def load_quantized_denoiser_and_text_encoders(self, path, mode, compute_dtype, load_kwargs):
        """Teacher UNet and text encoder(s) through bitsandbytes (GPU only; checked at start)."""
        from diffusers import BitsAndBytesConfig as DiffusersBitsAndBytesConfig
        from diffusers import UNet2DConditionModel
        from transformers import BitsAndBytesConfig as TransformersBitsAndBytesConfig

        options = ({"load_in_8bit": True} if mode == "8bit" else
                   {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype})
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet",
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

    def prompt_encoder(self, tokenizers, text_encoders):
        return self.prompt_encoder_class(self, tokenizers, text_encoders)

    # ----- generation and export --------------------------------------------------------------------
    def pipeline_class(self):
        """The diffusers pipeline class and the keyword arguments that keep it offline and quiet."""
        raise NotImplementedError

    def build_pipeline(self, unet, vae, prompt_encoder, scheduler):
        """A pipeline from in-memory components (validation images, evaluation samples)."""
        cls, extra = self.pipeline_class()
        pipeline = cls(unet=unet, vae=vae, scheduler=scheduler, **prompt_encoder.pipeline_components(),
                       **self.in_memory_pipeline_extras(extra))
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

    # ----- the model card ---------------------------------------------------------------------------
    def license(self, denoiser_config):
        """A distilled student is a derivative of its teacher: it carries the teacher family's licence."""
        raise NotImplementedError


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

