#!/usr/bin/env python
"""Distil a Stable Diffusion (1.x, 2.x or XL) UNet into a smaller BK-SDM / KOALA student with Random Conditioning and ARIA.

    accelerate launch train_aria_distill.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --student_config bk_small --train_data_dir teacher-data --prompt_file prompts.csv \
        --condition_sampling aria --output_dir bk-small-aria

The objective is BK-SDM's (task + output KD + feature KD). Random Conditioning replaces the caption
of a noised latent with a corpus prompt, more often at high noise; ARIA decides which prompts, by
sending more of them to the regions of the prompt space where the student still disagrees with the
teacher. See README.md and docs/method.md.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from aria_utils.training import checkpointing
from aria_utils.method import conditioning
from aria_utils.training import run_folder
from aria_utils.families import single_file
from aria_utils.families import unet_students as students
from aria_utils.cli import argument_parser, run_cli, writable_folder_problem
from aria_utils.files import write_json_atomically
from aria_utils.publishing.hub import PIPELINE_SUBFOLDERS, pretrained_source_problem
from aria_utils.training.lora import trainable_parameters
from aria_utils.data.paired_data import (
    PairedDataError,
    check_image_folder,
    check_paired_set_is_finished,
    encode_image_dataset,
    is_teacher_latent_dir,
    load_image_caption_dataset,
    load_paired_latents,
)
from aria_utils.training.preemption import Preempted, PreemptionFlag, grace_period_warning, keep_console_when_pipe_breaks
from aria_utils.data.prompts import PromptCorpusError, check_prompt_file, load_prompt_corpus
from aria_utils.quiet import silence_known_harmless_messages
from aria_utils.families import (DENOISER_FOLDERS, denoiser_config_of_pipeline, family_of_config, load_frozen_teacher,
                                  vae_scale_factor)
from aria_utils.families.noise import FLOW_WEIGHTING_SCHEMES, FlowMatchingSampling
from aria_utils.families.sd3 import DEFAULT_MAX_SEQUENCE_LENGTH, DEPTH_VARIANTS
from aria_utils.method.region_tracker import RegionTrackerConfig
from aria_utils.training.config import BatchConfig, ConditioningConfig, LossWeights, OptimizerConfig, RunConfigs
from aria_utils.training.distillation_step import all_processes_agree, build_distillation_step, build_optimizer

logger = logging.getLogger("train_aria_distill")

# Never written to disk, logs or trackers.
SECRET_ARGS = ("hub_token",)


def build_parser():
    parser = argument_parser(__doc__.split("\n\n")[0], secret_flags=[f"--{name}" for name in SECRET_ARGS])
    # ----- teacher and student -----
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="Teacher Stable Diffusion pipeline: hub id (org/name), local diffusers folder, or a "
                             "single-file .safetensors checkpoint (original SD layout, converted once into "
                             "OUTPUT_DIR/teacher_diffusers).")
    parser.add_argument("--single_file_config", default=None,
                        help="For a single-file teacher: diffusers folder or hub id with the matching component configs "
                             "and tokenizer (needed offline; a copy of stable-diffusion-v1-5 without weights will do).")
    parser.add_argument("--original_config", default=None,
                        help="For a single-file teacher: the original LDM .yaml (e.g. v1-inference.yaml), instead of "
                             "--single_file_config.")
    parser.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    parser.add_argument("--variant", default=None, help="Weight variant of the teacher, e.g. fp16.")
    parser.add_argument("--student_config", choices=students.STUDENT_VARIANTS + tuple(DEPTH_VARIANTS), default="bk_small",
                        help="Student derived from the teacher's denoiser config: BK-SDM bk_base/bk_small/bk_tiny "
                             "(bk_tiny: SD-1.x/2.x only), KOALA koala_1b/koala_700m (SDXL), RC's channel-reduced "
                             "c_base/c_small/c_tiny/c_micro (SD-1.x/2.x; random init), or depth-pruned depth_1_2/"
                             "depth_1_3 (SD 3.x: a half / a third of the transformer blocks).")
    parser.add_argument("--student_model_name_or_path", default=None,
                        help="Start from this denoiser instead (diffusers folder / hub id, with or without a unet/ or "
                             "transformer/ subfolder).")
    # ----- flow-matching teachers (SD 3.x), as diffusers' SD3 training scripts -----
    parser.add_argument("--weighting_scheme", choices=FLOW_WEIGHTING_SCHEMES, default="logit_normal",
                        help="How training sigmas are drawn (logit_normal, mode, else uniform), or, for sigma_sqrt / "
                             "cosmap, how each sample's loss is weighted. Flow-matching teachers only.")
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Mean of --weighting_scheme logit_normal.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Std of --weighting_scheme logit_normal.")
    parser.add_argument("--mode_scale", type=float, default=1.29, help="Scale of --weighting_scheme mode.")
    parser.add_argument("--max_sequence_length", type=int, default=DEFAULT_MAX_SEQUENCE_LENGTH,
                        help="T5 prompt tokens of an SD 3.x teacher (diffusers' SD3 scripts: 77; its pipeline: 256).")
    # ----- paired data -----
    parser.add_argument("--train_data_dir", default=None,
                        help="Teacher latents from aria_utils.generate_teacher_data, or an imagefolder with metadata.jsonl.")
    parser.add_argument("--dataset_name", default=None, help="Hub image-caption dataset (alternative to --train_data_dir).")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--dataloader_num_workers", type=int, default=0,
                        help="DataLoader workers preparing each step's latents, noise and timesteps ahead of the "
                             "device (and decoding images for the one-time VAE encoding). 0: in the main process.")
    parser.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image resolution for image datasets and validation; default: the teacher's.")
    # ----- condition corpus and random conditioning -----
    parser.add_argument("--prompt_file", default=None, help="Condition corpus: txt, csv, tsv, json, jsonl or parquet.")
    parser.add_argument("--prompt_dataset_name", default=None, help="Condition corpus from a hub dataset.")
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--condition_sampling", choices=conditioning.CONDITION_SAMPLING_MODES, default="aria",
                        help="paired: no random conditioning; random: RC (uniform over prompts); region_uniform: "
                             "uniform over regions; aria: adaptive allocation by tracked discrepancy.")
    parser.add_argument("--random_conditioning_schedule", choices=["exp", "sigmoid"], default="exp")
    parser.add_argument("--random_conditioning_lambda", type=float, default=5.0,
                        help="lambda of p(t) = exp(-lambda (1 - t/T)).")
    parser.add_argument("--text_drop_prob", type=float, default=0.1, help="Caption dropped for classifier-free guidance.")
    # ----- loss -----
    parser.add_argument("--lambda_sd", type=float, default=1.0, help="Task loss weight (paired samples only).")
    parser.add_argument("--lambda_kd_output", type=float, default=1.0, help="Output KD weight.")
    parser.add_argument("--lambda_kd_feat", type=float, default=1.0, help="Feature KD weight.")
    # ----- ARIA -----
    parser.add_argument("--num_regions", type=int, default=16, help="K: k-means regions of the condition corpus.")
    parser.add_argument("--region_embedding_model", default="sentence-transformers/all-MiniLM-L6-v2",
                        help="Sentence-transformer for the regions: hub id or local path; or `teacher` (`teacher:mean`): "
                             "the teacher's own (first) text encoder, its pooled end-of-text state (its mean over the "
                             "tokens), so regions group prompts as the denoiser sees them.")
    parser.add_argument("--region_embedding_batch_size", type=int, default=128)
    parser.add_argument("--region_cache_dir", default=None,
                        help="Region index cache; default: OUTPUT_DIR/regions. Runs may share one: the index of another "
                             "corpus, model, K or seed goes into a subfolder, none is rebuilt in place.")
    parser.add_argument("--region_seed", type=int, default=0,
                        help="k-means seed. Separate from --seed so runs with different seeds share one region index.")
    parser.add_argument("--track_regions", action="store_true",
                        help="Track per-region discrepancy also for paired/random/region_uniform (for comparisons).")
    parser.add_argument("--aria_ema_decay", type=float, default=0.9,
                        help="Tracker EMA: d_k <- decay * d_k + (1 - decay) * batch mean of region k.")
    parser.add_argument("--aria_allocation", choices=["level", "dro", "progress"], default="level",
                        help="How tracked discrepancies become sampling probabilities: level (pi ~ d^(1/tau)), dro "
                             "(Group-DRO exponentiated weights, log q += eta d per step) or progress (pi ~ lp^(1/tau), "
                             "lp = relative fall of d between a slow and a fast EMA).")
    parser.add_argument("--aria_temperature", type=float, default=1.0, help="tau in pi ~ d^(1/tau) (and lp^(1/tau)).")
    parser.add_argument("--aria_dro_step_size", type=float, default=0.01, help="eta of --aria_allocation dro.")
    parser.add_argument("--aria_progress_decay", type=float, default=0.99,
                        help="Decay of the slow EMA that --aria_allocation progress compares the tracker's EMA with.")
    parser.add_argument("--aria_uniform_mix", type=float, default=0.1,
                        help="eps: weight of the base distribution, guarantees every region keeps being visited.")
    parser.add_argument("--aria_base", choices=["corpus", "uniform"], default="corpus",
                        help="Base distribution b: corpus mass n_k/N (RC's allocation) or uniform.")
    parser.add_argument("--aria_warmup_steps", type=int, default=50, help="Sample from the base distribution first.")
    parser.add_argument("--aria_warmup_min_visits", type=int, default=0,
                        help="Also stay in warm-up until every region has this many samples.")
    parser.add_argument("--aria_normalize_timesteps", action=argparse.BooleanOptionalAction, default=True,
                        help="Divide discrepancies by a running mean per timestep bucket before tracking.")
    parser.add_argument("--aria_timestep_buckets", type=int, default=10)
    parser.add_argument("--aria_importance_weighting", action="store_true",
                        help="Weight random-conditioned samples by b_k/pi_k so the expected gradient equals RC's.")
    # ----- optimisation -----
    parser.add_argument("--output_dir", default="aria-distill-output")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Delete the checkpoints and outputs of an earlier run in --output_dir and start over "
                             "(without it, a fresh run into such a folder is refused).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, default=16, help="Per device.")
    parser.add_argument("--num_train_epochs", type=int, default=1, help="Used only when --max_train_steps is not set.")
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--scale_lr", action="store_true", help="Multiply the lr by batch size, accumulation and processes.")
    parser.add_argument("--lr_scheduler", default="constant",
                        help='diffusers get_scheduler name: "linear", "cosine", "constant", "constant_with_warmup", ...')
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the student; it is what gets saved.")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="Default: Accelerate's config. fp16 needs a GPU.")
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    parser.add_argument("--speed_report_repeats", type=int, default=5,
                        help="At the end, time teacher and student on the training device (median of this many runs "
                             "after warm-up; 0: no timing) and count their parameters and MACs, for "
                             "train_summary.json and the model card.")
    parser.add_argument("--teacher_quantization", choices=["none", "8bit", "4bit"], default="none",
                        help="Load the frozen teacher denoiser and text encoders (SD 3.x's T5 included) with "
                             "bitsandbytes (GPU only).")
    # ----- LoRA students -----
    parser.add_argument("--use_lora", action="store_true", help="Train a LoRA adapter on the student instead of all weights.")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--lora_alpha", type=float, default=16)
    parser.add_argument("--lora_target_modules", nargs="+", default=None,
                        help="Module-name suffixes the adapter wraps. Default: the attention projections (UNet: to_q "
                             "to_k to_v to_out.0; SD 3.x also the text stream's add_q_proj add_k_proj add_v_proj "
                             "to_add_out).")
    parser.add_argument("--lora_merge", action="store_true",
                        help="Write the student with the adapter fused into its weights instead of a separate LoRA file.")
    # ----- Hugging Face Hub -----
    parser.add_argument("--push_to_hub", action="store_true", help="Upload OUTPUT_DIR (without checkpoints) at the end.")
    parser.add_argument("--hub_model_id", default=None, help="Repo id; default: the name of --output_dir.")
    parser.add_argument("--hub_token", default=None, help="Never logged or saved; prefer `hf auth login`.")
    parser.add_argument("--hub_private", action="store_true")
    parser.add_argument("--hub_base_model", default=None,
                        help="The model card's base_model (a hub id). Default: the teacher when it is a hub id; a local "
                             "folder or single file is left out, since the Hub refuses a card whose base_model is a path.")
    parser.add_argument("--hub_license", default=None,
                        help="The model card's license. Default: the teacher family's (SD-1.x creativeml-openrail-m, "
                             "SD-2.x and SDXL openrail++, SD 3.x other: stabilityai-ai-community): a distilled student is a "
                             "derivative of its teacher.")
    parser.add_argument("--hub_push_checkpoints", action="store_true",
                        help="Also push the student UNet at every checkpoint, in the background.")
    parser.add_argument("--ddp_timeout", type=int, default=7200,
                        help="Seconds a process may wait for the others (e.g. while the main process builds the region "
                             "index or encodes images on first start); the NCCL default of 600 is too short for that.")
    parser.add_argument("--on_nonfinite", choices=["skip", "stop"], default="skip",
                        help="A non-finite loss skips the update (counted and logged) or stops with a checkpoint.")
    # ----- logging, checkpoints, validation -----
    parser.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    parser.add_argument("--logging_dir", default="logs",
                        help="TensorBoard dir, relative to --output_dir (or absolute; --overwrite_output_dir never "
                             "deletes a logging dir outside --output_dir).")
    parser.add_argument("--tracker_project_name", default="aria-distill")
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help='A checkpoint-<step> folder (a bare name is looked up in --output_dir) or "latest".')
    parser.add_argument("--validation_prompts", nargs="*", default=None)
    parser.add_argument("--validation_steps", type=int, default=500,
                        help="Validation images and region heat map every this many steps.")
    parser.add_argument("--validation_inference_steps", type=int, default=25)
    parser.add_argument("--validation_guidance_scale", type=float, default=7.5)
    parser.add_argument("--eval_prompt_file", default=None,
                        help="Held-out prompts (same formats as --prompt_file) for the region-aware evaluation.")
    parser.add_argument("--eval_steps", type=int, default=None,
                        help="Run the region-aware evaluation every this many steps and log it (main process).")
    parser.add_argument("--eval_max_prompts", type=int, default=64)
    parser.add_argument("--eval_num_timesteps", type=int, default=5)
    parser.add_argument("--debug_process_states", action="store_true",
                        help="At the end every process writes process_states/rank_<i>.json (tracker, weight and "
                             "drawn-condition digests) to check data-parallel consistency.")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args, parser)
    return args


def validate_args(args, parser):
    """Everything checkable without loading a model: fail in seconds, naming the flag and the fix."""
    for find_problem in (number_problem, combination_problem, teacher_problem, data_problem, output_dir_problem):
        problem = find_problem(args)
        if problem:
            parser.error(problem)


# Flags and the values they accept; checked before anything is loaded.
AT_LEAST_ONE = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                "ddp_timeout", "num_regions", "num_train_epochs", "validation_inference_steps", "eval_max_prompts",
                "eval_num_timesteps", "aria_timestep_buckets", "lora_rank", "region_embedding_batch_size")
AT_LEAST_ONE_WHEN_SET = ("max_train_steps", "max_train_samples", "checkpoints_total_limit", "eval_steps")
POSITIVE = ("learning_rate", "adam_epsilon", "max_grad_norm", "aria_temperature", "aria_dro_step_size", "lora_alpha")
NON_NEGATIVE = ("lr_warmup_steps", "dataloader_num_workers", "adam_weight_decay", "lambda_sd", "lambda_kd_output",
                "lambda_kd_feat", "aria_warmup_steps", "aria_warmup_min_visits", "random_conditioning_lambda",
                "validation_guidance_scale", "speed_report_repeats")
DECAY_RATES = ("adam_beta1", "adam_beta2", "ema_decay", "aria_ema_decay", "aria_progress_decay")  # in [0, 1)


def number_problem(args):
    for flag in AT_LEAST_ONE:
        if getattr(args, flag) < 1:
            return f"--{flag} must be at least 1, got {getattr(args, flag)}."
    for flag in AT_LEAST_ONE_WHEN_SET:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            return f"--{flag} must be at least 1, got {getattr(args, flag)}."
    for flag in POSITIVE:
        if not getattr(args, flag) > 0:
            return f"--{flag} must be greater than 0, got {getattr(args, flag)}."
    for flag in NON_NEGATIVE:
        if getattr(args, flag) < 0:
            return f"--{flag} must be 0 or more, got {getattr(args, flag)}."
    for flag in DECAY_RATES:
        if not 0.0 <= getattr(args, flag) < 1.0:
            return f"--{flag} must be in [0, 1), got {getattr(args, flag)}."
    if not 0.0 <= args.text_drop_prob <= 1.0:
        return f"--text_drop_prob must be in [0, 1], got {args.text_drop_prob}."
    if not 0.0 < args.aria_uniform_mix <= 1.0:
        return f"--aria_uniform_mix must be in (0, 1] (eps > 0 keeps every region visited), got {args.aria_uniform_mix}."
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        return f"--resolution must be a positive multiple of 8 (the VAE's downsampling), got {args.resolution}."
    return None


def combination_problem(args):
    if args.lora_merge and not args.use_lora:
        return "--lora_merge needs --use_lora."
    if args.use_lora and not args.student_model_name_or_path and not students.inherits_teacher_weights(
            args.student_config):
        return (f"--use_lora with --student_config {args.student_config}: a channel-reduced student starts from a "
                "random init, so an adapter over its frozen weights would learn on noise. Train it whole (drop "
                "--use_lora), or use LoRA on a BK student.")
    if args.hub_push_checkpoints and not args.push_to_hub:
        return "--hub_push_checkpoints needs --push_to_hub."
    if args.eval_steps is not None and args.eval_prompt_file is None:
        return "--eval_steps needs --eval_prompt_file (held-out prompts)."
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        return ("--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would resume from; "
                "pass one of them.")
    if args.condition_sampling == "aria" and args.aria_uniform_mix == 1.0:
        return ("--aria_uniform_mix 1 puts all the weight on the base distribution, so the tracker never changes "
                "where prompts come from: that is --condition_sampling random (with --aria_base corpus) or "
                "region_uniform (with --aria_base uniform). Use one of those, or eps < 1.")
    if args.condition_sampling in conditioning.REGION_SAMPLING_MODES and args.num_regions == 1:
        return (f"--num_regions 1 with --condition_sampling {args.condition_sampling}: with one region every prompt "
                "is drawn uniformly, which is --condition_sampling random. Use K >= 2, or random.")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        return ("--hub_token with --report_to wandb would expose the token: wandb records the command line. Log in "
                "with `hf auth login` instead of passing --hub_token.")
    for tracker, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if args.report_to == tracker and importlib.util.find_spec(package) is None:
            return f"--report_to {tracker} needs the {package} package: pip install {package}, or --report_to none."
    from diffusers.optimization import SchedulerType

    names = [member.value for member in SchedulerType]
    if args.lr_scheduler not in names:
        return f"--lr_scheduler {args.lr_scheduler!r} is unknown; use one of {', '.join(names)}."
    if args.validation_prompts is not None and not all(prompt.strip() for prompt in args.validation_prompts):
        return "--validation_prompts holds an empty prompt; give non-empty prompts (quote each one)."
    return None


def teacher_problem(args):
    teacher = args.pretrained_model_name_or_path
    if single_file.is_single_file(teacher):
        return single_file.single_file_problem(teacher, args.single_file_config, args.original_config, args.revision,
                                               args.variant)
    if args.single_file_config or args.original_config:
        return (f"--single_file_config / --original_config describe a single-file .safetensors teacher; "
                f"{teacher!r} is not one.")
    required = [f"{folder}/" for folder in PIPELINE_SUBFOLDERS]
    problem = pretrained_source_problem(teacher, "--pretrained_model_name_or_path", required, args.revision)
    denoiser_configs = [f"{folder}/config.json" for folder in DENOISER_FOLDERS]
    if not problem and os.path.isdir(teacher) and not any(os.path.isfile(os.path.join(teacher, path))
                                                          for path in denoiser_configs):
        problem = (f"--pretrained_model_name_or_path {teacher!r} is a folder but lacks a denoiser "
                   f"({' or '.join(denoiser_configs)}): pass a diffusers pipeline folder (as written by save_pretrained).")
    if problem or not args.student_model_name_or_path:
        return problem
    student = args.student_model_name_or_path
    if os.path.isdir(student) and not any(os.path.isfile(os.path.join(student, path))
                                          for path in ("config.json", *denoiser_configs)):
        return (f"--student_model_name_or_path {student!r} holds neither config.json nor {' nor '.join(denoiser_configs)}: "
                "pass a denoiser folder or a pipeline folder.")
    return pretrained_source_problem(student, "--student_model_name_or_path")


def data_problem(args):
    if args.train_data_dir is None and args.dataset_name is None:
        return "Paired data is needed: --train_data_dir (teacher latents or imagefolder) or --dataset_name."
    if args.train_data_dir is not None and args.dataset_name is None:
        try:
            if is_teacher_latent_dir(args.train_data_dir):
                check_paired_set_is_finished(args.train_data_dir)
            else:
                check_image_folder(args.train_data_dir, args.caption_column)
        except PairedDataError as error:
            return str(error)
    draws_random_conditions = configs_from_args(args).conditioning.draws_random_conditions
    if draws_random_conditions and args.prompt_file is None and args.prompt_dataset_name is None:
        return (f"--condition_sampling {args.condition_sampling} draws prompts from a condition corpus: "
                "give --prompt_file or --prompt_dataset_name (or use --condition_sampling paired).")
    try:
        if args.prompt_file is not None:
            check_prompt_file(args.prompt_file)
        if args.eval_prompt_file is not None:
            check_prompt_file(args.eval_prompt_file, "--eval_prompt_file")
    except PromptCorpusError as error:
        return str(error)
    return None


def output_dir_problem(args):
    """OUTPUT_DIR must be a writable folder that is not one of the inputs, and a fresh run must not replace
    another run's work nor a folder this project did not write."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        return f"--output_dir {args.output_dir!r} is a file; pass a folder (it is created if needed)."
    problem = run_folder.same_folder_problem(args.output_dir, {
        "--pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "--student_model_name_or_path": args.student_model_name_or_path, "--train_data_dir": args.train_data_dir})
    problem = problem or writable_folder_problem(args.output_dir, "--output_dir")
    if problem:
        return problem
    foreign = run_folder.foreign_pipeline_content(args.output_dir)
    if foreign:
        return (f"--output_dir {args.output_dir!r} holds a diffusers pipeline that this project did not write "
                f"({', '.join(foreign)}; a teacher?). It is never deleted, not even with --overwrite_output_dir: "
                "choose another --output_dir.")
    try:
        resume_path = checkpointing.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, warn=False)
    except FileNotFoundError as error:
        return str(error)
    previous = run_folder.previous_run_outputs(args.output_dir)
    if resume_path is None and previous and not args.overwrite_output_dir:
        shown = ", ".join(previous[:5]) + (", ..." if len(previous) > 5 else "")
        damaged = " (none of its checkpoints is intact)" if args.resume_from_checkpoint == "latest" else ""
        return (f"--output_dir {args.output_dir!r} holds another run's work{damaged}: {shown}. Resume it with "
                "--resume_from_checkpoint latest, choose a new --output_dir, or pass --overwrite_output_dir to delete "
                "it and start over.")
    return None


FLOW_MATCHING_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")


def read_teacher_configs(args):
    """The teacher denoiser's config, read before any weights (None for a single file, converted later).

    A wrong hub id or revision, or a teacher this script cannot train against, fails here: before the
    corpus is read and the region index is built.
    """
    if single_file.is_single_file(args.pretrained_model_name_or_path):
        return None
    from diffusers import DDPMScheduler

    kwargs = dict(revision=args.revision, cache_dir=args.cache_dir)
    try:
        family, unet_config = denoiser_config_of_pipeline(args.pretrained_model_name_or_path, **kwargs)
        scheduler_config = DDPMScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                     **kwargs)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: its "
                         f"denoiser ({' or '.join(f'{folder}/' for folder in DENOISER_FOLDERS)}) and scheduler/ "
                         f"configs could not be read ({type(error).__name__}: {error}).") from None
    problem = pretrained_source_problem(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path",
                                        family.required_folders(), args.revision)
    if problem:  # e.g. an SDXL refiner: one text encoder, the second one's conditioning
        raise SystemExit(f"error: {family.missing_folders_message}; {problem}")
    if not args.student_model_name_or_path:
        try:  # a student this teacher cannot have (bk_tiny of SDXL, KOALA of SD-1.5) fails before any loading
            family.student_config(unet_config, args.student_config)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    # DDIM (validation) offsets every timestep by steps_offset: more steps would index past the schedule.
    most_steps = scheduler_config.get("num_train_timesteps", 1000) - scheduler_config.get("steps_offset", 0)
    if args.validation_prompts and args.validation_inference_steps > most_steps:
        raise SystemExit(f"error: --validation_inference_steps {args.validation_inference_steps} is more than the "
                         f"teacher's scheduler can take (at most {most_steps}); lower it.")
    problem = family.scheduler_problem(scheduler_config)
    if problem:
        raise SystemExit(f"error: {problem}")
    # Flags of another family's teachers would be recorded and then not used: refused instead.
    parser = build_parser()
    flags = [*(FLOW_MATCHING_FLAGS if not family.flow_matching else ()),
             *(("max_sequence_length",) if not family.takes_max_sequence_length else ())]
    changed = [f"--{name}" for name in flags if getattr(args, name) != parser.get_default(name)]
    if changed:
        raise SystemExit(f"error: {', '.join(changed)} apply to SD 3.x teachers (flow matching, a T5 encoder); this "
                         f"teacher is {family.name} ({family.pipeline_class_name}): drop them.")
    return unet_config


def paired_set_identity(paired):
    """What a resumed run must train on again: the same latents' captions in the same order."""
    return {"num_latents": len(paired), "captions_sha256": paired.captions.digest()}


def check_batch_fits(args, num_paired, num_processes):
    """A global batch larger than the paired set would repeat latents inside every batch."""
    global_batch = args.train_batch_size * num_processes
    if global_batch > num_paired:
        raise SystemExit(f"error: --train_batch_size {args.train_batch_size} x {num_processes} process(es) = "
                         f"{global_batch} exceeds the {num_paired} paired latents, so every batch would repeat "
                         "latents: lower --train_batch_size, or generate more paired data.")


def memory_report(teacher_unet, text_encoders, student, use_8bit_adam, feature_projectors=None):
    """Parameter and optimizer-state memory, so a user sees what will not fit before it fails."""
    def size(module, trainable_only=False):
        parameters = [p for p in module.parameters() if p.requires_grad or not trainable_only]
        return sum(p.numel() for p in parameters), sum(p.numel() * p.element_size() for p in parameters)

    teacher_count, teacher_bytes = size(teacher_unet)
    text_bytes = sum(size(text_encoder)[1] for text_encoder in text_encoders)
    student_count, student_bytes = size(student)
    trainable_count, _ = size(student, trainable_only=True)
    projector_count, projector_bytes = size(feature_projectors) if feature_projectors is not None else (0, 0)
    trainable_count += projector_count  # trained with the student, so they have optimizer state too
    optimizer_bytes = trainable_count * (2 if use_8bit_adam else 8)  # two moments, 1 or 4 bytes each
    gib = 1024 ** 3
    projectors = (f", feature projectors {projector_count / 1e6:.2f}M params {projector_bytes / gib:.2f} GiB"
                  if feature_projectors is not None else "")
    return (f"Memory: teacher denoiser {teacher_count / 1e6:.1f}M params {teacher_bytes / gib:.2f} GiB, text encoder(s) "
            f"{text_bytes / gib:.2f} GiB; student {student_count / 1e6:.1f}M params {student_bytes / gib:.2f} GiB"
            f"{projectors}, {trainable_count / 1e6:.2f}M trainable; optimizer state {optimizer_bytes / gib:.2f} GiB "
            f"({'8-bit' if use_8bit_adam else 'fp32'} AdamW)")


def check_process_group(accelerator):
    """Refuse N launched processes that each believe they are alone: they would all train rank 0's batches."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise SystemExit(
            f"{launched} processes were launched but Accelerate sees a single one, so each would train alone. "
            "On CPU launch with ACCELERATE_USE_CPU=1 (see examples/accelerate_configs/cpu_two_processes.yaml).")


def check_mixed_precision(accelerator):
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SystemExit("--mixed_precision fp16 needs a GPU: on CPU it would silently run in fp32. "
                         "Use --mixed_precision bf16 (works on CPU) or no.")


def configure_deepspeed(accelerator, args):
    """Under DeepSpeed, make its config follow the flags; returns whether DeepSpeed is in use.

    DeepSpeed reads micro-batch size, accumulation and clipping from its own config (and there is no
    DataLoader for it to infer the batch size from), so the flags are written into it before `prepare`.
    It also steps its optimizer inside `backward`, so this script cannot skip an update after a
    non-finite loss: with fp16 DeepSpeed's dynamic loss scaler skips overflowing steps itself;
    otherwise only --on_nonfinite stop is honest.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return False
    if args.on_nonfinite == "skip" and accelerator.mixed_precision != "fp16":
        raise SystemExit("error: under DeepSpeed --on_nonfinite skip cannot skip an update (DeepSpeed steps inside "
                         "backward): use --mixed_precision fp16, whose loss scaler skips overflowing steps, or "
                         "--on_nonfinite stop.")
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=args.train_batch_size,
                                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                                   gradient_clipping=args.max_grad_norm)
    plugin.deepspeed_config["train_batch_size"] = "auto"  # filled by accelerate from the three above
    accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
    return True


def public_args(args):
    return {key: value for key, value in vars(args).items() if key not in SECRET_ARGS}


def load_initial_student(args, family, teacher_path, teacher_unet=None, load_kwargs=None):
    """The student before training: --student_model_name_or_path, or its family's init from the teacher.

    `teacher_unet` (the teacher's denoiser) must hold full-precision weights; when not given it is loaded from
    `teacher_path` (the end of a LoRA run needs the untrained base again).
    """
    denoiser_class, folder = family.denoiser_class(), family.denoiser_folder
    if args.student_model_name_or_path:
        path = args.student_model_name_or_path
        subfolder = folder if os.path.isdir(os.path.join(path, folder)) else None
        return denoiser_class.from_pretrained(path, subfolder=subfolder, cache_dir=args.cache_dir)
    if teacher_unet is None:
        teacher_unet = denoiser_class.from_pretrained(teacher_path, subfolder=folder, **(load_kwargs or {}))
    return family.build_student(teacher_unet, args.student_config)


def write_card(args, teacher_path, teacher_unet, student, repo_id=None, resume_history=(), speed=None):
    family = family_of_config(teacher_unet.config)
    from aria_utils.evaluation.speed import speed_table
    from aria_utils.publishing.hub import looks_like_local_path
    from aria_utils.publishing.model_card import (
        hub_base_model,
        load_region_report,
        redacted_command,
        write_model_card,
    )

    validation_dir = os.path.join(args.output_dir, "validation")
    images = sorted(os.listdir(validation_dir), key=lambda n: int(n.split("-")[1].split(".")[0])) \
        if os.path.isdir(validation_dir) else []
    description = (f"LoRA (rank {args.lora_rank}) on a {args.student_model_name_or_path or args.student_config} student"
                   if args.use_lora else f"{family.student_origin(args.student_config)} `{args.student_config}` student"
                   if not args.student_model_name_or_path else
                   f"student {family.denoiser_description} from `{args.student_model_name_or_path}`")
    write_model_card(
        args.output_dir, teacher_path, description, students.count_parameters(teacher_unet),
        students.count_parameters(student), public_args(args), redacted_command(sys.argv[1:], [f"--{name}" for name in SECRET_ARGS]),
        region_report=load_region_report(args.output_dir), validation_images=[f"validation/{n}" for n in images[-1:]],
        lora=args.use_lora and not args.lora_merge, base_model=hub_base_model(teacher_path, args.hub_base_model),
        license=args.hub_license or family.license(teacher_unet.config),
        license_details=None if args.hub_license else family.license_details(teacher_unet.config),
        datasets=[name for name in (args.dataset_name, args.prompt_dataset_name)
                  if name and not looks_like_local_path(name) and not os.path.exists(name)],
        repo_id=repo_id, family=family, resume_history=resume_history,
        speed=speed_table(speed, family.denoiser_description) if speed is not None else None)


def peak_host_memory_bytes():
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_train_summary(path, step_times, tracker_times, total_batch_size, global_step, nonfinite_skipped,
                        first_step_finished_at=None, speed=None):
    """Throughput of this run's steps (the first few are excluded as warm-up), ARIA's share of it, the main
    process's peak host memory and the wall-clock time its first step finished, and the student's speed and
    size against the teacher (`speed`, when measured)."""
    skip = min(3, max(0, len(step_times) - 1))
    steady_steps, steady_tracker = np.asarray(step_times[skip:]), np.asarray(tracker_times[skip:])
    summary = {"global_step": global_step, "steps_timed": int(len(steady_steps)),
               "nonfinite_skipped": nonfinite_skipped, "peak_host_memory_bytes": peak_host_memory_bytes(),
               "first_step_finished_at": first_step_finished_at}
    if speed is not None:
        summary["speed"] = speed
    if len(steady_steps):
        summary.update(mean_step_time=float(steady_steps.mean()), median_step_time=float(np.median(steady_steps)),
                       samples_per_second=float(total_batch_size / steady_steps.mean()),
                       mean_tracker_time=float(steady_tracker.mean()),
                       tracker_fraction=float(steady_tracker.sum() / steady_steps.sum()))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)


def write_process_state(output_dir, accelerator, student, region_tracker, conditions_digest,
                        first_step_finished_at=None):
    weights = hashlib.sha256()
    for name, tensor in sorted(accelerator.unwrap_model(student).state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    state = {"process_index": accelerator.process_index, "student_sha256": weights.hexdigest(),
             "conditions_sha256": conditions_digest, "tracker": region_tracker.state_dict() if region_tracker is not None else None,
             "peak_host_memory_bytes": peak_host_memory_bytes(), "first_step_finished_at": first_step_finished_at}
    directory = os.path.join(output_dir, "process_states")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank_{accelerator.process_index}.json"), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)


def configs_from_args(args):
    """The flags as the typed configs the units below take (one place; the benchmark calls it too)."""
    return RunConfigs(
        batch=BatchConfig(per_device=args.train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
                          seed=args.seed, num_workers=args.dataloader_num_workers),
        conditioning=ConditioningConfig(
            sampling=args.condition_sampling, schedule=args.random_conditioning_schedule,
            strength=args.random_conditioning_lambda, text_drop_prob=args.text_drop_prob,
            importance_weighting=args.aria_importance_weighting, track_regions=args.track_regions),
        loss_weights=LossWeights(task=args.lambda_sd, kd_output=args.lambda_kd_output, kd_feat=args.lambda_kd_feat),
        optimizer=OptimizerConfig(
            learning_rate=args.learning_rate, scale_lr=args.scale_lr, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay, epsilon=args.adam_epsilon, use_8bit_adam=args.use_8bit_adam,
            max_grad_norm=args.max_grad_norm),
        region_tracker=RegionTrackerConfig(
            base=args.aria_base, ema_decay=args.aria_ema_decay, temperature=args.aria_temperature,
            uniform_mix=args.aria_uniform_mix, warmup_steps=args.aria_warmup_steps,
            warmup_min_visits=args.aria_warmup_min_visits, normalize_timesteps=args.aria_normalize_timesteps,
            timestep_buckets=args.aria_timestep_buckets, allocation=args.aria_allocation,
            dro_step_size=args.aria_dro_step_size, progress_decay=args.aria_progress_decay),
    )


@dataclass
class Run:
    """What is decided before any weights are loaded: the processes, the output folder, what is resumed."""

    args: argparse.Namespace
    configs: RunConfigs
    accelerator: object
    output_claim: object  # run_folder.OutputClaim: the folder's lock, released at the end
    uses_deepspeed: bool
    resume_path: str = None
    resumed_state: checkpointing.TrainingState = None
    # What the run is beyond its flags (processes, precision, corpus, paired set); a resume must match it.
    run_facts: dict = field(default_factory=dict)
    hub_repo_id: str = None
    hub_api: object = None
    checkpoint_pusher: object = None

    @property
    def weight_dtype(self):
        """The frozen models' dtype: the mixed-precision one."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    def refuse_changes(self, region_fingerprint=None):
        """Called again as each fact becomes known: nothing the checkpoint's state depends on may have changed."""
        if self.resumed_state is None:
            return
        mismatches = checkpointing.resume_mismatches(self.resumed_state, vars(self.args), self.run_facts,
                                                     region_fingerprint)
        if mismatches:
            raise SystemExit(f"error: {self.resume_path} was written by another configuration "
                             f"({'; '.join(mismatches)}). Resume with the checkpoint's values (README: Resuming, which "
                             "flags may change), or start a new run in another --output_dir.")


@dataclass
class Data:
    """The condition corpus, the paired latents (or the image dataset they are encoded from) and the regions."""

    teacher_unet_config: dict = None
    corpus: object = None
    paired: object = None
    image_dataset: object = None
    region_index: object = None
    caption_region_ids: np.ndarray = None

    @property
    def corpus_prompts(self):
        return self.corpus.prompts if self.corpus is not None else None


@dataclass
class Models:
    """The frozen teacher's components and the trainable student (with its EMA)."""

    family: object
    teacher_path: str  # a converted single file's folder, else --pretrained_model_name_or_path
    load_kwargs: dict
    teacher_unet: object
    vae: object
    noise_scheduler: object
    noise: object  # the teacher's training noise (families/noise.py): timesteps drawn, latents noised, the target
    text_encoders: list
    prompt_encoder: object
    student: object
    ema_student: object
    use_lora: bool
    feature_projectors: object = None  # a channel-reduced student's learned feature projections (trained too)

    def trained_parameters(self):
        projected = list(self.feature_projectors.parameters()) if self.feature_projectors is not None else []
        return trainable_parameters(self.student) + projected

    def ema_parameters(self, model):
        # With LoRA only the adapter changes: its EMA is all there is to average (and to store).
        return trainable_parameters(model) if self.use_lora else list(model.parameters())


def set_up_run(args):
    """Accelerator and logging, the output folder (one run at a time), the checkpoint to resume, the Hub repo."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    check_mixed_precision(accelerator)
    check_process_group(accelerator)
    uses_deepspeed = configure_deepspeed(accelerator, args)
    if uses_deepspeed and not args.student_model_name_or_path and not students.inherits_teacher_weights(
            args.student_config):
        # Accelerate gives DeepSpeed one engine, one model: the feature projections would be a second one.
        raise SystemExit(f"error: --student_config {args.student_config} trains feature projections beside the "
                         "student, and Accelerate's DeepSpeed integration trains one model: use DDP or FSDP.")
    if accelerator.distributed_type == "FSDP" and args.use_ema:
        # Each process holds a shard of every parameter: an EMA of it would be saved and restored incompletely.
        raise SystemExit("error: --use_ema is not supported under FSDP (the average would cover one shard per "
                         "process); use DDP or DeepSpeed ZeRO-2 for EMA, or drop --use_ema.")
    if args.teacher_quantization != "none" and accelerator.device.type != "cuda":
        raise SystemExit(f"--teacher_quantization {args.teacher_quantization} needs a CUDA GPU: diffusers only "
                         "quantizes with bitsandbytes on a GPU. Use --teacher_quantization none on this machine.")
    if args.push_to_hub:
        from aria_utils.publishing.hub import HubError, check_hub_access

        try:
            check_hub_access(args.hub_token)  # before minutes of loading and hours of training
        except HubError as error:
            raise SystemExit(f"error: {error}")

    output_claim = run_folder.claim_output_dir(accelerator, args.output_dir, args.overwrite_output_dir, args.logging_dir)
    # The launcher may hold our stderr pipe; if it goes, the output continues in a file instead of killing us.
    keep_console_when_pipe_breaks(os.path.join(args.output_dir, run_folder.BROKEN_PIPE_LOG))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    if output_claim.removed:
        logger.warning("--overwrite_output_dir: deleted %s from %s.", ", ".join(output_claim.removed), args.output_dir)
    run = Run(args=args, configs=configs_from_args(args), accelerator=accelerator, output_claim=output_claim,
              uses_deepspeed=uses_deepspeed,
              run_facts={"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision})
    # "latest" is the newest intact checkpoint (damaged newer ones are skipped with a warning).
    run.resume_path = checkpointing.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if run.resume_path is not None:
        run.resumed_state = checkpointing.read_training_state(run.resume_path)
    run.refuse_changes()

    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import HfApi

        from aria_utils.publishing.hub import CheckpointPusher, default_repo_id

        # Created now: checkpoint uploads need it, and the model card names its full id (namespace/name).
        run.hub_api = HfApi()
        run.hub_repo_id = run.hub_api.create_repo(default_repo_id(args.output_dir, args.hub_model_id),
                                                  token=args.hub_token, private=args.hub_private, exist_ok=True).repo_id
        if args.hub_push_checkpoints:
            run.checkpoint_pusher = CheckpointPusher(run.hub_api, run.hub_repo_id, token=args.hub_token)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    return run


def load_data(run):
    """Teacher configs (no weights yet), the condition corpus, the paired latents and the region index."""
    args, accelerator = run.args, run.accelerator
    data = Data(teacher_unet_config=read_teacher_configs(args))
    if args.prompt_file is not None or args.prompt_dataset_name is not None:
        data.corpus = load_prompt_corpus(args.prompt_file, args.prompt_dataset_name, args.prompt_column)
        logger.info("Condition corpus: %s", data.corpus.summary())
        run.run_facts["corpus_sha256"] = data.corpus.prompts.digest()
        if run.configs.conditioning.uses_regions and args.num_regions > len(data.corpus):
            raise SystemExit(f"--num_regions {args.num_regions} exceeds the {len(data.corpus)} distinct prompts of the "
                             "corpus; lower --num_regions.")
    if is_teacher_latent_dir(args.train_data_dir):
        # Opening reads the manifest and captions, never the latents themselves.
        data.paired = load_paired_latents(args.train_data_dir, max_samples=args.max_train_samples)
        check_batch_fits(args, len(data.paired), accelerator.num_processes)
        run.run_facts["paired_set"] = paired_set_identity(data.paired)
        in_channels = data.teacher_unet_config["in_channels"] if data.teacher_unet_config is not None else None
        if in_channels is not None and data.paired.latent_shape[0] != in_channels:
            raise SystemExit(f"error: --train_data_dir {args.train_data_dir!r} holds {data.paired.latent_shape[0]}-"
                             f"channel latents, the teacher UNet takes {in_channels}: it was made with another model; "
                             "generate the paired set with this teacher.")
    else:
        data.image_dataset = load_image_caption_dataset(args.dataset_name, args.dataset_config_name,
                                                        args.train_data_dir, args.image_column, args.caption_column,
                                                        args.cache_dir, args.max_train_samples)
    run.refuse_changes()  # the corpus and the paired set

    if run.configs.conditioning.uses_regions:
        from aria_utils.method.region_index import build_or_load_region_index, region_fingerprint

        cache_dir = args.region_cache_dir or os.path.join(args.output_dir, "regions")
        embedding_model = region_embedding_model(args, cache_dir, accelerator)
        # Checked before the index is (re)built, so the checkpoint's own cache is left alone.
        if run.resumed_state is not None:
            run.refuse_changes(region_fingerprint(data.corpus.prompts, embedding_model, args.num_regions,
                                                  args.region_seed))
        data.region_index = build_or_load_region_index(
            data.corpus.prompts, cache_dir=cache_dir,
            model_name=embedding_model, num_regions=args.num_regions, seed=args.region_seed,
            batch_size=args.region_embedding_batch_size, accelerator=accelerator,
        )
    return data


def region_embedding_model(args, cache_dir, accelerator):
    """--region_embedding_model, with `teacher` / `teacher:mean` made into a sentence-transformers folder of the
    teacher's text encoder in the region cache (by the main process; the others then find it)."""
    from aria_utils.method.region_index import teacher_embedding_model, teacher_embedding_pooling

    name = args.region_embedding_model
    if teacher_embedding_pooling(name) is None:
        return name
    if single_file.is_single_file(args.pretrained_model_name_or_path):
        raise SystemExit(f"error: --region_embedding_model {name} reads the teacher's text_encoder/ folder; a "
                         "single-file teacher has none before its conversion: convert it once (a first run does, into "
                         "OUTPUT_DIR/teacher_diffusers) and pass that folder as --pretrained_model_name_or_path.")
    with accelerator.main_process_first():
        return teacher_embedding_model(name, args.pretrained_model_name_or_path, cache_dir, args.revision)


def load_models(run):
    """The frozen teacher (converted once when a single file), the student initialised from it, EMA, LoRA."""
    from diffusers.training_utils import EMAModel

    args, accelerator, weight_dtype = run.args, run.accelerator, run.weight_dtype
    logger.info("Loading the teacher %s", args.pretrained_model_name_or_path)
    load_kwargs = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    teacher_path = args.pretrained_model_name_or_path
    if single_file.is_single_file(teacher_path):
        # Converted by the main process; the others then find the finished folder and reuse it.
        with accelerator.main_process_first():
            teacher_path = single_file.convert_single_file_teacher(
                teacher_path, args.output_dir, config=args.single_file_config, original_config=args.original_config,
                cache_dir=args.cache_dir, revision=args.revision)
        logger.info("Single-file teacher %s converted to the diffusers folder %s", args.pretrained_model_name_or_path,
                    teacher_path)
        load_kwargs = dict(cache_dir=args.cache_dir)
    teacher = load_frozen_teacher(teacher_path, **load_kwargs)
    family, teacher_unet, text_encoders = teacher.family, teacher.unet, teacher.text_encoders

    student = load_initial_student(args, family, teacher_path, teacher_unet)
    student.train()
    logger.info("Teacher %s %.1fM parameters, student %.1fM", family.denoiser_description,
                students.count_parameters(teacher_unet) / 1e6, students.count_parameters(student) / 1e6)
    if args.teacher_quantization != "none":
        # The student was initialised from the full-precision weights above; KD only needs the
        # teacher's outputs, so it now runs quantized.
        del teacher_unet, text_encoders
        teacher.unet = teacher.text_encoders = None  # frees the full-precision weights
        teacher_unet, text_encoders = family.load_quantized_denoiser_and_text_encoders(
            teacher_path, args.teacher_quantization, weight_dtype, load_kwargs)
    for frozen in (*text_encoders, teacher.vae, teacher_unet):
        if not getattr(frozen, "is_quantized", False) and not getattr(frozen, "is_loaded_in_8bit", False):
            frozen.to(accelerator.device, dtype=weight_dtype)
    if args.use_lora:
        from aria_utils.training.lora import add_lora_adapter

        # Frozen base in the compute dtype, trainable adapter in fp32 (no "unscale FP16 gradients" error).
        add_lora_adapter(student, args.lora_rank, args.lora_alpha,
                         args.lora_target_modules or list(family.lora_target_modules), base_dtype=weight_dtype)
    feature_projectors = None
    if family.needs_feature_projection(student, teacher_unet):
        from aria_utils.training.feature_projectors import FeatureProjectors

        # Drawn after the student's own random init, from the same seeded generator.
        feature_projectors = FeatureProjectors(student, teacher_unet, family.feature_layer_pairs(student, teacher_unet))
    logger.info(memory_report(teacher_unet, text_encoders, student, args.use_8bit_adam, feature_projectors))
    if args.enable_xformers_memory_efficient_attention:
        teacher_unet.enable_xformers_memory_efficient_attention()
        student.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    flow_matching_sampling = FlowMatchingSampling(args.weighting_scheme, args.logit_mean, args.logit_std,
                                                  args.mode_scale)
    models = Models(family=family, teacher_path=teacher_path, load_kwargs=load_kwargs, teacher_unet=teacher_unet,
                    vae=teacher.vae, noise_scheduler=teacher.noise_scheduler,
                    noise=family.training_noise(teacher.noise_scheduler, flow_matching_sampling),
                    text_encoders=text_encoders,
                    # Prompts -> what both denoisers are conditioned on (hidden states, and e.g. pooled embeddings).
                    prompt_encoder=family.prompt_encoder(teacher.tokenizers, text_encoders, args.max_sequence_length),
                    student=student, ema_student=None, use_lora=args.use_lora, feature_projectors=feature_projectors)
    if args.use_ema:
        models.ema_student = EMAModel(models.ema_parameters(student), decay=args.ema_decay,
                                      model_cls=None if args.use_lora else family.denoiser_class(),
                                      model_config=None if args.use_lora else student.config)
        models.ema_student.to(accelerator.device)
    checkpointing.StudentCheckpointHooks(accelerator, family.denoiser_class(), models.ema_student,
                                         student_folder=family.denoiser_folder).register()
    return models


def encode_paired_data(run, data, models):
    """An image dataset becomes paired latents (cached); every caption gets its region."""
    args, accelerator = run.args, run.accelerator
    resolution = training_resolution(args, models)
    if data.image_dataset is not None:
        with accelerator.main_process_first():
            data.paired = encode_image_dataset(
                data.image_dataset, models.vae, args.image_column, args.caption_column, resolution,
                args.train_batch_size, os.path.join(args.output_dir, "latent_cache"), models.teacher_path,
                accelerator.device, run.weight_dtype, show_progress=accelerator.is_local_main_process,
                num_workers=args.dataloader_num_workers, seed=args.seed)
        check_batch_fits(args, len(data.paired), accelerator.num_processes)
        run.run_facts["paired_set"] = paired_set_identity(data.paired)
        run.refuse_changes()
    if data.paired.latent_shape[0] != models.teacher_unet.config.in_channels:
        raise SystemExit(f"The paired latents have {data.paired.latent_shape[0]} channels, the teacher UNet expects "
                         f"{models.teacher_unet.config.in_channels}: --train_data_dir was made with another model.")
    data.caption_region_ids = np.full(len(data.paired), -1, dtype=np.int64)
    if data.region_index is not None:
        data.caption_region_ids = data.region_index.assign_prompts(data.paired.captions, data.corpus.prompts,
                                                                   accelerator=accelerator)


def training_resolution(args, models):
    return args.resolution or models.teacher_unet.config.sample_size * vae_scale_factor(models.vae.config)


class Trainer:
    """Everything the loop touches, and what it does besides the step: checkpoints, validation, evaluation."""

    def __init__(self, run, data, models):
        from diffusers.optimization import get_scheduler

        from aria_utils.method.region_tracker import RegionTracker

        args, accelerator, configs = run.args, run.accelerator, run.configs
        self.run, self.data, self.models, self.args, self.accelerator = run, data, models, args, accelerator
        self.total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        optimizer = build_optimizer(configs.optimizer, models.trained_parameters(), self.total_batch_size)
        self.max_train_steps = (args.max_train_steps
                                or args.num_train_epochs * math.ceil(len(data.paired) / self.total_batch_size))
        # The prepared scheduler steps once per process per optimisation step.
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                     num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                     num_training_steps=self.max_train_steps * accelerator.num_processes)
        self.feature_projectors = None
        if models.feature_projectors is not None:
            self.student, self.feature_projectors, self.optimizer, self.lr_scheduler = accelerator.prepare(
                models.student, models.feature_projectors, optimizer, lr_scheduler)
        else:
            self.student, self.optimizer, self.lr_scheduler = accelerator.prepare(models.student, optimizer,
                                                                                  lr_scheduler)

        self.sampler = self.region_tracker = None
        if data.corpus is not None:
            index = data.region_index
            self.sampler = conditioning.ConditionSampler(len(data.corpus), index.labels if index is not None else None,
                                                         index.num_regions if index is not None else 1)
        if data.region_index is not None:
            self.region_tracker = RegionTracker.from_config(configs.region_tracker, self.sampler,
                                                            models.noise.num_train_timesteps)
        # About ten heat-map columns per validation interval: enough to draw, and bounded in every checkpoint.
        self.region_history_stride = max(1, args.validation_steps // 10)
        self.drawn_conditions = hashlib.sha256()  # only fed with --debug_process_states
        if accelerator.is_main_process and args.report_to != "none":
            config = {key: value for key, value in public_args(args).items() if isinstance(value, (int, float, str, bool))}
            accelerator.init_trackers(args.tracker_project_name, config=config)
        self.state = checkpointing.TrainingState(args=public_args(args), run=run.run_facts, region_fingerprint=(
            data.region_index.fingerprint if data.region_index is not None else None))
        self.resume()
        self.validator = self.periodic_evaluation = None
        if accelerator.is_main_process:
            self.validator, self.periodic_evaluation = build_validation_and_evaluation(run, data, models)
        self.step_times, self.tracker_times = [], []
        self.first_step_finished_at = None  # wall clock, for start-up measurements (examples/benchmark/scale.py)
        self.grace_period_checked = False
        # Micro-conditioning of latents whose set stores none: generated at their own size, uncropped.
        latent_image_size = data.paired.latent_shape[1] * vae_scale_factor(models.vae.config)
        self.distillation_step = build_distillation_step(
            accelerator, self.student, models.teacher_unet, models.prompt_encoder, models.noise, self.optimizer,
            self.lr_scheduler, data.paired, data.caption_region_ids, data.corpus_prompts, self.sampler,
            self.region_tracker, self.max_train_steps, configs.batch, configs.conditioning, configs.loss_weights,
            configs.optimizer.max_grad_norm, start_step=self.state.global_step, ema_student=models.ema_student,
            ema_parameters=models.ema_parameters, weight_dtype=run.weight_dtype,
            default_time_ids=models.prompt_encoder.default_time_ids(latent_image_size, 1),
            feature_projectors=self.feature_projectors)

    def resume(self):
        """Restore the checkpoint's models, optimizer, schedule, EMA, RNG and tracker; this run's flags win."""
        run, args, state = self.run, self.args, self.state
        if run.resume_path is None:
            if args.resume_from_checkpoint == "latest":
                logger.info("No checkpoint in %s yet: starting a new run.", args.output_dir)
            return
        logger.info("Resuming from %s", run.resume_path)
        checkpointing.load_checkpoint(self.accelerator, run.resume_path)
        restored = run.resumed_state
        state.global_step, state.nonfinite_skipped = restored.global_step, restored.nonfinite_skipped
        if self.region_tracker is not None:
            self.region_tracker.load_state_dict(restored.tracker)
        state.region_history = [tuple(entry) for entry in restored.region_history]
        # The restored optimizer, schedule and EMA carry the checkpoint's hyperparameters: this run's flags win.
        optimizer_config = run.configs.optimizer
        checkpointing.apply_resumed_flags(
            self.optimizer, self.lr_scheduler, self.models.ema_student,
            optimizer_config.learning_rate_for(self.total_batch_size), optimizer_config.betas,
            optimizer_config.weight_decay, optimizer_config.epsilon, args.ema_decay)
        state.resume_history = restored.resume_history
        changed = checkpointing.honoured_changes(restored.args, vars(args))
        if changed:
            logger.warning("Resuming with changed flags, honoured from step %d on: %s.", state.global_step,
                           ", ".join(f"--{name} {before!r} -> {after!r}" for name, (before, after) in changed.items()))
            state.resume_history = state.resume_history + [{"step": state.global_step, "changed": {
                name: [before, after] for name, (before, after) in changed.items()}}]

    def checkpoint_state(self):
        return dataclasses.replace(self.state, tracker=(self.region_tracker.state_dict()
                                                        if self.region_tracker is not None else None))

    def save_checkpoint(self, step):
        """checkpoint-<step>, timed: a step plus a checkpoint must fit in the launcher's grace period."""
        started = time.perf_counter()
        saved = checkpointing.save_checkpoint(self.accelerator, self.args.output_dir, step, self.checkpoint_state(),
                                              self.args.checkpoints_total_limit)
        if not self.grace_period_checked and self.step_times:
            self.grace_period_checked = True
            warning = grace_period_warning(float(np.median(self.step_times)), time.perf_counter() - started)
            if warning:
                logger.warning(warning)
        if self.run.checkpoint_pusher is not None:
            student_folder = "unet_lora" if self.args.use_lora else self.models.family.denoiser_folder
            self.run.checkpoint_pusher.push(os.path.join(saved, student_folder), student_folder, step)
        return saved

    def stop_on_nonfinite(self, step):
        """--on_nonfinite stop: the last good state is checkpointed (where it still exists) and the run ends."""
        if self.run.uses_deepspeed:
            # DeepSpeed has already applied this step's update: the last good state is the last checkpoint.
            raise SystemExit(f"Stopped on a non-finite loss at step {step} (--on_nonfinite stop); resume "
                             "from the last checkpoint written before it.")
        checkpointing.save_checkpoint(self.accelerator, self.args.output_dir, step, self.checkpoint_state(),
                                      self.args.checkpoints_total_limit)
        raise SystemExit(f"Stopped on a non-finite loss at step {step} (--on_nonfinite stop); "
                         f"the last good state is in checkpoint-{step}.")

    def record_step(self, result, step_start):
        """After a step: counters, the region history for the heat map, timings; the logs for the trackers."""
        state, region_tracker = self.state, self.region_tracker
        if self.args.debug_process_states:
            self.drawn_conditions.update("\x1f".join(result.prompts).encode("utf-8"))
        if not result.is_finite:
            state.nonfinite_skipped += 1
            logger.warning("Non-finite loss at step %d: update skipped (%d so far).", state.global_step,
                           state.nonfinite_skipped)
            if self.args.on_nonfinite == "stop":
                self.stop_on_nonfinite(state.global_step)
        state.global_step += 1
        tracker_time = result.tracker_time
        if region_tracker is not None and (state.global_step % self.region_history_stride == 0
                                           or self.is_validation_step() or state.global_step == self.max_train_steps):
            tick = time.perf_counter()
            state.region_history.append((state.global_step, region_tracker.estimates().tolist(),
                                         region_tracker.probabilities().tolist()))
            tracker_time += time.perf_counter() - tick
        step_time = time.perf_counter() - step_start
        self.step_times.append(step_time)
        self.tracker_times.append(tracker_time)
        if self.first_step_finished_at is None:
            self.first_step_finished_at = time.time()
        return dict(result.logs, lr=self.lr_scheduler.get_last_lr()[0], step_time=step_time, tracker_time=tracker_time,
                    samples_per_second=self.total_batch_size / step_time, nonfinite_skipped=state.nonfinite_skipped)

    def is_validation_step(self):
        return self.state.global_step % self.args.validation_steps == 0

    @contextlib.contextmanager
    def ema_weights_applied(self):
        """Validation and evaluation look at the EMA weights when there are any, in the training precision."""
        model, ema_student = self.accelerator.unwrap_model(self.student), self.models.ema_student
        if ema_student is not None:
            ema_student.store(self.models.ema_parameters(model))
            ema_student.copy_to(self.models.ema_parameters(model))
        try:
            with self.accelerator.autocast():
                yield
        finally:
            if ema_student is not None:
                ema_student.restore(self.models.ema_parameters(model))

    def log_regions(self, step):
        """Main process: each region's tracked discrepancy, probability and visits, one scalar each (the
        estimates and probabilities `record_step` just put into the region history for this step)."""
        region_tracker = self.region_tracker
        _, estimates, probabilities = self.state.region_history[-1]
        logs = {}
        for region in range(region_tracker.num_regions):
            logs[f"aria/discrepancy/region_{region:02d}"] = estimates[region]
            logs[f"aria/probability/region_{region:02d}"] = probabilities[region]
            logs[f"aria/visits/region_{region:02d}"] = int(region_tracker.visits[region])
        self.accelerator.log(logs, step=step)

    def validate_and_plot(self, step):
        """Main process only, and free of collectives: the other processes do not wait here. A preemption
        stops the images at their next denoising step (the checkpoint comes first)."""
        from aria_utils.plots import region_heatmap
        from aria_utils.training.validation_images import log_image

        if self.validator is not None:
            logger.info("Validation at step %d: %d prompts, teacher and student.", step,
                        len(self.args.validation_prompts))
            try:
                with self.ema_weights_applied():
                    self.validator.run(self.accelerator.unwrap_model(self.student), step, self.accelerator.trackers)
            except Preempted:
                logger.warning("Validation at step %d stopped by the preemption request.", step)
        if self.region_tracker is not None and self.state.region_history and self.accelerator.is_main_process:
            index = self.data.region_index
            image = region_heatmap(self.state.region_history, os.path.join(self.args.output_dir, "aria_regions.png"),
                                   region_names=[index.label(k) for k in range(index.num_regions)])
            log_image(self.accelerator.trackers, "aria/region_discrepancy_heatmap", image, step)

    def evaluate(self, step):
        """Main process: the periodic region-aware evaluation; a preemption stops it at its next batch."""
        from aria_utils.training.validation_images import log_image

        try:
            with self.ema_weights_applied():
                logs, image = self.periodic_evaluation.run(self.accelerator.unwrap_model(self.student), step)
            self.accelerator.log(logs, step=step)
            log_image(self.accelerator.trackers, "eval/discrepancy_per_region", image, step)
        except Preempted:
            logger.warning("Evaluation at step %d stopped by the preemption request.", step)

    def after_step(self, logs):
        """Logs, validation and evaluation when they are due (main process)."""
        step, accelerator = self.state.global_step, self.accelerator
        accelerator.log(logs, step=step)
        if self.is_validation_step() and accelerator.is_main_process:
            if self.region_tracker is not None:
                self.log_regions(step)
            self.validate_and_plot(step)
        if self.periodic_evaluation is not None and step % self.args.eval_steps == 0:
            self.evaluate(step)


def build_validation_and_evaluation(run, data, models):
    """Main process: the teacher-vs-student image grids and the periodic region-aware evaluation, when asked."""
    args, accelerator = run.args, run.accelerator
    validator = periodic_evaluation = None
    if args.validation_prompts:
        from aria_utils.training.validation_images import Validator

        index, region_names = data.region_index, None
        if index is not None:  # each column says which region its prompt falls in
            regions = index.assign_prompts(args.validation_prompts, data.corpus.prompts)
            region_names = [index.label(int(region)) for region in regions]
        validator = Validator(args.validation_prompts, models.teacher_unet, models.vae, models.prompt_encoder,
                              models.noise_scheduler, training_resolution(args, models), args.seed,
                              args.validation_inference_steps, args.validation_guidance_scale, args.output_dir,
                              accelerator.device, region_names=region_names)
    if args.eval_steps is not None:
        from aria_utils.evaluation.discrepancy import PeriodicEvaluation

        index = data.region_index
        eval_prompts = load_prompt_corpus(args.eval_prompt_file, None, args.prompt_column).prompts[: args.eval_max_prompts]
        eval_regions = (index.assign_prompts(eval_prompts, data.corpus.prompts, accelerator=accelerator)
                        if index is not None else np.zeros(len(eval_prompts), dtype=np.int64))
        periodic_evaluation = PeriodicEvaluation(
            models.teacher_unet, models.prompt_encoder, models.noise_scheduler, models.vae, eval_prompts, eval_regions,
            num_regions=index.num_regions if index is not None else 1, num_timesteps=args.eval_num_timesteps,
            seed=args.seed, device=accelerator.device, dtype=run.weight_dtype, batch_size=args.train_batch_size,
            output_dir=args.output_dir,
            region_names=[index.label(k) for k in range(index.num_regions)] if index is not None else None)
    return validator, periodic_evaluation


def log_run_banner(trainer):
    args, data = trainer.args, trainer.data
    logger.info("***** Running distillation *****")
    logger.info("  Paired latents = %d, condition corpus = %s, sampling = %s", len(data.paired),
                len(data.corpus) if data.corpus is not None else 0, args.condition_sampling)
    logger.info("  Per-device batch = %d, processes = %d, accumulation = %d, effective batch = %d",
                args.train_batch_size, trainer.accelerator.num_processes, args.gradient_accumulation_steps,
                trainer.total_batch_size)
    logger.info("  Steps = %d (starting at %d)", trainer.max_train_steps, trainer.state.global_step)


def train(trainer):
    """The training loop: one distillation step at a time until --max_train_steps, or a preemption."""
    from tqdm.auto import tqdm

    state, accelerator = trainer.state, trainer.accelerator
    preemption = PreemptionFlag()
    preemption.install()
    progress_bar = tqdm(range(trainer.max_train_steps), initial=state.global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    try:
        while state.global_step < trainer.max_train_steps:
            step_start = time.perf_counter()
            try:
                result = trainer.distillation_step(state.global_step)
            except PairedDataError as error:
                # Raised on every process before this step's update: the state is still that of this step.
                trainer.save_checkpoint(state.global_step)
                raise SystemExit(f"error: {error} The state before step {state.global_step} is in "
                                 f"checkpoint-{state.global_step}.")
            logs = trainer.record_step(result, step_start)
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}")
            trainer.after_step(logs)

            # Every process must agree to stop at the same step: checkpointing is collective.
            stop_now = not all_processes_agree(accelerator, not preemption.requested)
            if state.global_step % trainer.args.checkpointing_steps == 0 or stop_now:
                trainer.save_checkpoint(state.global_step)
            if stop_now:
                logger.warning("Preempted: checkpoint-%d written; resume with --resume_from_checkpoint latest.",
                               state.global_step)
                accelerator.end_training()
                raise SystemExit(preemption.exit_status)
    finally:
        trainer.distillation_step.close()  # hooks removed, DataLoader workers stopped, however the loop ends


def finish(trainer):
    """The student pipeline (EMA weights, LoRA merged or beside), reports, the model card, the Hub upload."""
    run, models, args, accelerator, state = trainer.run, trainer.models, trainer.args, trainer.accelerator, trainer.state
    if args.debug_process_states:
        write_process_state(args.output_dir, accelerator, trainer.student, trainer.region_tracker,
                            trainer.drawn_conditions.hexdigest(), trainer.first_step_finished_at)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_student = accelerator.unwrap_model(trainer.student)
        if models.ema_student is not None:
            models.ema_student.copy_to(models.ema_parameters(final_student))
        save_student(args, models, final_student)
        if trainer.region_tracker is not None:
            from aria_utils.method.region_index import write_region_report

            write_region_report(os.path.join(args.output_dir, "aria_regions.json"), trainer.data.region_index,
                                trainer.region_tracker)
            trainer.validate_and_plot(state.global_step)
        write_json_atomically(os.path.join(args.output_dir, "training_args.json"), public_args(args))
        speed = measure_speed(trainer, final_student) if args.speed_report_repeats > 0 else None
        write_train_summary(os.path.join(args.output_dir, "train_summary.json"), trainer.step_times,
                            trainer.tracker_times, trainer.total_batch_size, state.global_step,
                            state.nonfinite_skipped, trainer.first_step_finished_at, speed)
        # The card names the teacher as the user gave it (hub id, folder or file), not its converted copy.
        write_card(args, args.pretrained_model_name_or_path, models.teacher_unet, final_student, run.hub_repo_id,
                   state.resume_history, speed)
        push_to_hub(run)
        run_folder.apply_umask_to_outputs(args.output_dir)
        logger.info("Student pipeline saved to %s", args.output_dir)
    accelerator.end_training()
    run.output_claim.release()


def measure_speed(trainer, final_student):
    """The student's size and speed against the teacher's on the training device, in the training dtype."""
    from aria_utils.evaluation.speed import speed_report

    models, args, accelerator = trainer.models, trainer.args, trainer.accelerator
    logger.info("Measuring teacher and student: parameters, MACs, latency (--speed_report_repeats %d)",
                args.speed_report_repeats)
    with accelerator.autocast():  # the fp32 student runs its matrix products in the training dtype, as it trained
        report = speed_report(models.family, models.teacher_unet, final_student, models.vae, models.prompt_encoder,
                              models.noise_scheduler.config, training_resolution(args, models), accelerator.device,
                              trainer.run.weight_dtype, repeats=args.speed_report_repeats)
    if accelerator.mixed_precision in ("fp16", "bf16"):
        report["dtype"] = f"{accelerator.mixed_precision} (teacher weights; fp32 student under autocast)"
    if args.use_lora:
        report["note"] = "the LoRA student was timed with its adapter beside the weights, not merged"
    ratio = report["student_vs_teacher"]
    logger.info("Student: %.0f%% of the teacher's parameters and %.0f%% of its MACs; %.2fx as fast per forward (batch "
                "2) and %.2fx per %d-step generation on %s", 100 * ratio["parameters"], 100 * ratio["macs"],
                ratio["speedup_forward_seconds_batch_2"], ratio["speedup_generation_seconds"],
                report["generation_steps"], report["device"])
    return report


def save_student(args, models, final_student):
    if args.use_lora:
        from aria_utils.publishing.export import save_lora_student

        base_student = load_initial_student(args, models.family, models.teacher_path, load_kwargs=models.load_kwargs)
        save_lora_student(final_student, base_student, models.teacher_path, args.output_dir, models.load_kwargs,
                          args.lora_merge)
    else:
        from aria_utils.publishing.export import save_student_pipeline

        save_student_pipeline(final_student, models.teacher_path, args.output_dir, models.load_kwargs)


def push_to_hub(run):
    args = run.args
    if run.checkpoint_pusher is not None:  # finished before the final upload: one commit at a time
        for failure in run.checkpoint_pusher.finish():
            logger.warning("A checkpoint push to the Hub failed (%s); the local checkpoint is intact.", failure)
    if args.push_to_hub:
        from aria_utils.publishing.hub import push_output_folder

        push_output_folder(run.hub_api, args.output_dir, run.hub_repo_id, token=args.hub_token,
                           private=args.hub_private)
        logger.info("Pushed %s to the Hub as %s", args.output_dir, run.hub_repo_id)


def main(args):
    run = set_up_run(args)  # processes, logging, the output folder, what is resumed
    data = load_data(run)  # corpus, paired latents, regions: checked before any weights are loaded
    models = load_models(run)  # frozen teacher, student, EMA
    encode_paired_data(run, data, models)
    trainer = Trainer(run, data, models)  # optimizer, schedule, tracker, resume, validation, the step
    log_run_banner(trainer)
    train(trainer)
    finish(trainer)


if __name__ == "__main__":
    silence_known_harmless_messages()
    # Input errors, a full or read-only disk and Ctrl-C before training end with a message, not a traceback.
    run_cli(lambda argv: main(parse_args(argv)))
