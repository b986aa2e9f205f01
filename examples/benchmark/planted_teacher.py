"""A benchmark teacher with planted heterogeneity: concepts that the BK student starts out far from.

ARIA's premise is that some regions of the prompt space are much harder for the student than others,
and rare. The conditioned teacher (conditioned_teacher.py) has no such regions: its per-region
discrepancies lie within about +-15 % of each other. This teacher adds them, with known ground truth.

Built from the conditioned teacher, for each concept category c (by default the benchmark's unseen and
underrepresented categories):

- a direction b_c in the space of the teacher's text states that separates the category from the rest
  of the corpus: regularised linear discriminant analysis of the token-mean text state h (the mean of
  the encoder's output over the token positions, exactly what a uniform cross-attention reads);
- a concept score z_c(prompt) = (b_c . h - m_c) / s_c, standardised so that it has mean 0 and std 1
  over the prompts outside the category, and is large (several std) inside it;
- the planted layers are the cross-attention layers that every BK student drops (the second attention
  of each down stage and the middle attention of each up stage). In each of them the keys are zeroed,
  so attention is uniform over the tokens, and the values are rewritten so that the layer adds
  `gain * sum_c z_c u_c` (u_c a fixed random unit vector per concept and layer) to every position.

So the student (BK-SDM init: it copies the layers the teacher keeps) starts with a large gap on the
concept categories, carried by layers it does not have, and can only close it by learning the concept
from samples of those prompts. Other prompts see a planted term of unit variance, the concept prompts
one of z^2 ~ (separation)^2: the gain sets how much harder the concepts are. The benchmark measures and
reports each category's initial gap and how well the regions isolate the concepts.
"""

import json
import os

import numpy as np
import torch

PLANTED_FILE = "planted_concepts.json"


def planted_attention_names(unet):
    """Cross-attention transformer blocks that BK students (base, small, tiny) do not keep."""
    names = []
    for stage, block in enumerate(unet.down_blocks):
        if getattr(block, "attentions", None) is not None and len(block.attentions) > 1:
            names.append(f"down_blocks.{stage}.attentions.1")
    for stage, block in enumerate(unet.up_blocks):
        if getattr(block, "attentions", None) is not None and len(block.attentions) > 2:
            names.append(f"up_blocks.{stage}.attentions.1")
    return names


@torch.no_grad()
def token_mean_states(text_encoder, tokenizer, prompts, batch_size=128):
    """(N, D) float64: per prompt, the mean over token positions of the encoder output the UNet reads."""
    means = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[start : start + batch_size]), padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        means.append(text_encoder(ids, return_dict=False)[0].double().mean(1))
    return torch.cat(means).numpy()


def concept_direction(states, is_concept, ridge=1e-2):
    """Regularised LDA direction of the concept against the rest, and the rest's score mean and std."""
    rest, concept = states[~is_concept], states[is_concept]
    covariance = np.cov(rest, rowvar=False)
    covariance += ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    direction = np.linalg.solve(covariance, concept.mean(0) - rest.mean(0))
    direction /= np.linalg.norm(direction)
    rest_scores = rest @ direction
    return direction, float(rest_scores.mean()), float(rest_scores.std())


@torch.no_grad()
def plant_concepts(unet, text_encoder, tokenizer, prompts, categories, concepts, gain, seed):
    """Rewrite the planted layers of `unet` in place; returns what was planted (JSON-serialisable)."""
    states = token_mean_states(text_encoder, tokenizer, prompts)
    categories = np.asarray(categories)
    generator = torch.Generator().manual_seed(seed)
    record = {"gain": gain, "layers": planted_attention_names(unet), "concepts": {}}
    fitted = []
    for concept in concepts:
        is_concept = categories == concept
        if not is_concept.any():
            raise ValueError(f"Concept category {concept!r} has no prompts in the corpus.")
        direction, mean, std = concept_direction(states, is_concept)
        scores = (states @ direction - mean) / std
        fitted.append((direction, mean, std))
        record["concepts"][concept] = {
            "corpus_prompts": int(is_concept.sum()),
            "score_inside_mean": float(scores[is_concept].mean()),
            "score_outside_std": float(scores[~is_concept].std()),
        }
    modules = dict(unet.named_modules())
    for name in record["layers"]:
        attention = modules[name].transformer_blocks[0].attn2
        dtype = attention.to_v.weight.dtype
        attention.to_k.weight.zero_()  # equal logits: uniform attention, so the layer reads the token mean
        values = torch.zeros_like(attention.to_v.weight, dtype=torch.float64)
        offset = torch.zeros(values.shape[0], dtype=torch.float64)
        for direction, mean, std in fitted:
            unit = torch.randn(values.shape[0], generator=generator, dtype=torch.float64)
            unit /= unit.norm()
            values += gain * torch.outer(unit, torch.from_numpy(direction)) / std
            offset += gain * unit * mean / std
        attention.to_v.weight.copy_(values.to(dtype))
        output = attention.to_out[0]
        # Subtract the rest's mean score: outside the concepts the planted term is centred.
        output.bias.sub_((output.weight.double() @ offset).to(dtype))
    return record


def build_planted_teacher(prompts, categories, concepts, gain, seed, cross_attention_gain=20.0):
    from conditioned_teacher import build_teacher

    pipeline = build_teacher(seed, cross_attention_gain)
    record = plant_concepts(pipeline.unet, pipeline.text_encoder, pipeline.tokenizer, prompts, categories, concepts,
                            gain, seed)
    return pipeline, record


def save_planted_record(record, output_dir):
    with open(os.path.join(output_dir, PLANTED_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
