"""A tiny Stable Diffusion pipeline with the SD-1.x (or SDXL) topology, built locally and offline.

Nothing can be downloaded here, yet every code path must be the one a hub checkpoint takes. This
module writes a real `StableDiffusionPipeline` folder (UNet with CrossAttnDownBlock2D x3 +
DownBlock2D, CLIP text encoder and tokenizer, AutoencoderKL, DDPMScheduler) whose only difference
from SD-1.5 is its size. The tokenizer uses the real CLIP BPE vocabulary shipped by the
`open-clip-torch` package, so prompts tokenize to the standard CLIP ids.

    python -m aria_utils.tiny_teacher --output_dir tiny-teacher --seed 0
    python -m aria_utils.tiny_teacher --sdxl --output_dir tiny-sdxl-teacher

With `--sdxl` it writes a `StableDiffusionXLPipeline` folder instead: SDXL-base's UNet layout (a plain
outer stage, two cross-attention stages with transformer depths 1 / 2 / 10, pooled text embeddings and
time ids added to the time embedding), two CLIP text encoders (the second with a projection), the
SDXL VAE scaling factor and an Euler scheduler, as the hub checkpoint has them.
"""

import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

from aria_utils.cli import argument_parser, run_cli
from aria_utils.files import apply_umask_tree

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
# Number of merges CLIP keeps from the BPE file (49408 ids = 512 byte symbols + merges + 2 specials).
CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 512 - 2


def _bytes_to_unicode():
    """The reversible byte -> printable-unicode table of byte-level BPE (GPT-2 / CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(code) for code in codes]))


def find_clip_bpe_file():
    """Path of the CLIP BPE merges file shipped by open-clip-torch, or None when not installed.

    `import open_clip` fails without torchvision, so locate the package without importing it.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return candidate if candidate.exists() else None


def build_clip_tokenizer():
    """A `CLIPTokenizer` with the real CLIP vocabulary, built from open-clip-torch's BPE file."""
    from transformers import CLIPTokenizer

    bpe_file = find_clip_bpe_file()
    if bpe_file is None:
        raise RuntimeError(
            "The tiny teacher needs the CLIP BPE vocabulary shipped by open-clip-torch. Install it with "
            "`pip install --no-deps open-clip-torch==3.3.0` (no-deps: its torchvision dependency is not needed)."
        )
    with gzip.open(bpe_file, "rt", encoding="utf-8") as handle:
        merge_lines = handle.read().split("\n")[1 : CLIP_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as handle:
            json.dump(vocab, handle)
        with open(merges_file, "w", encoding="utf-8") as handle:
            handle.write("#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=CLIP_MAX_LENGTH)


def build_tiny_pipeline(seed=0, prediction_type="epsilon", sample_size=16):
    """Build the tiny SD-topology pipeline in memory. Same seed, same weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        # SD-1.x layout, scaled down: 3 cross-attention stages and one plain innermost stage.
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=16,
        attention_head_dim=4,
        cross_attention_dim=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size * 2,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_config())
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_clip_config(**overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**dict(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ), **overrides)


# SDXL micro-conditioning: 6 numbers, each embedded with this many sinusoidal channels (SDXL-base: 256).
TINY_SDXL_TIME_EMBED_DIM = 8
TINY_SDXL_PROJECTION_DIM = 32


def build_tiny_sdxl_pipeline(seed=0, prediction_type="epsilon", sample_size=16):
    """The tiny SDXL-topology pipeline in memory. Same seed, same weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer()
    # SDXL's second tokenizer pads with "!" (id 0) instead of the end-of-text token.
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.pad_token = "!"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        # SDXL-base's layout, scaled down in width only.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 4, 8),
        norm_num_groups=16,
        use_linear_projection=True,
        cross_attention_dim=64,  # the two encoders' hidden states, concatenated (32 + 32)
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_PROJECTION_DIM,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4, norm_num_groups=16,
        sample_size=sample_size * 2, scaling_factor=0.13025,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(projection_dim=TINY_SDXL_PROJECTION_DIM))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny_teacher(output_dir, seed=0, prediction_type="epsilon", sdxl=False):
    build = build_tiny_sdxl_pipeline if sdxl else build_tiny_pipeline
    pipeline = build(seed=seed, prediction_type=prediction_type)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    apply_umask_tree(output_dir)
    return output_dir


def parse_args(argv=None):
    parser = argument_parser("Write a tiny SD-1.x- (or SDXL-) topology teacher pipeline folder.")
    parser.add_argument("--output_dir", required=True, help="Folder to write the pipeline to.")
    parser.add_argument("--seed", type=int, default=0, help="Weights are a deterministic function of it.")
    parser.add_argument(
        "--prediction_type", choices=["epsilon", "v_prediction", "sample"], default="epsilon",
        help="Scheduler prediction type (v_prediction mimics SD-2.x 768 checkpoints, sample x0-prediction ones).",
    )
    parser.add_argument("--sdxl", action="store_true", help="Write an SDXL-topology pipeline (two text encoders).")
    return parser.parse_args(argv)


def main(argv=None):
    from aria_utils.quiet import silence_known_harmless_messages

    silence_known_harmless_messages()
    args = parse_args(argv)
    save_tiny_teacher(args.output_dir, seed=args.seed, prediction_type=args.prediction_type, sdxl=args.sdxl)
    print(f"Tiny teacher pipeline written to {args.output_dir}")


if __name__ == "__main__":
    run_cli(main)
