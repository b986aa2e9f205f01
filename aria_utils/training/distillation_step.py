"""One optimisation step of the distillation, shared by the training script and the benchmark runner.

    step = DistillationStep(...)
    result = step(global_step)

A step: the region distribution for this step (from the region tracker as it stands after the previous
step), then for every micro-batch the loader's prepared half plus freshly drawn conditions, teacher and
student forward passes, the loss and its backward pass; the update once the gradients are
accumulated (skipped on every process when any process saw a non-finite loss); then one all-reduce
of the per-region discrepancy statistics and the region tracker's update, and the EMA update.
"""

import math
import time
from dataclasses import dataclass, field

import torch

from aria_utils.training.losses import DistillationLoss, FeatureRecorder
from aria_utils.data.paired_data import PairedDataError

LOGGED_TERMS = ("loss", "loss/task", "loss/kd_output", "loss/kd_feat", "random_fraction")


def all_processes_agree(accelerator, flag):
    """True when `flag` holds on every process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    flags = accelerator.gather(torch.tensor([float(flag)], device=accelerator.device))
    return bool(flags.min().item() > 0)


@dataclass
class StepResult:
    logs: dict  # the LOGGED_TERMS, averaged over micro-batches
    is_finite: bool  # False: the update (optimizer, tracker, EMA) was skipped on every process
    tracker_time: float  # seconds spent on ARIA's own work: allocation, statistics, update
    prompts: list = field(default_factory=list)  # every condition drawn this step, in order
    region_probabilities: object = None  # the distribution random conditions were drawn from (None: paired)


class DistillationStep:
    """Callable once per optimisation step; holds references to everything a step touches."""

    def __init__(self, accelerator, student, teacher_unet, prompt_encoder, noise, optimizer, lr_scheduler,
                 loss_fn, student_features, teacher_features, assemble_micro_batch, micro_batches, sampler,
                 conditioning, region_tracker=None, ema_student=None, ema_parameters=None,
                 gradient_accumulation_steps=1, max_grad_norm=1.0, weight_dtype=torch.float32, feature_projectors=None):
        self.accelerator = accelerator
        self.student, self.teacher_unet, self.prompt_encoder = student, teacher_unet, prompt_encoder
        self.noise = noise  # the teacher's training noise (families/noise.py)
        self.family = prompt_encoder.family
        self.optimizer, self.lr_scheduler, self.loss_fn = optimizer, lr_scheduler, loss_fn
        self.student_features, self.teacher_features = student_features, teacher_features
        self.assemble_micro_batch, self.micro_batches = assemble_micro_batch, micro_batches
        self.sampler, self.conditioning, self.region_tracker = sampler, conditioning, region_tracker
        self.ema_student, self.ema_parameters = ema_student, ema_parameters
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.weight_dtype = weight_dtype
        self.feature_projectors = feature_projectors  # prepared; None when the widths match the teacher's
        self.trained_models = [student] + ([feature_projectors] if feature_projectors is not None else [])
        # Listed once: clipping runs every optimisation step.
        self.trained_parameters = [parameter for model in self.trained_models for parameter in model.parameters()]

    def region_distribution(self):
        if self.sampler is None or not self.conditioning.draws_random_conditions:
            return None
        return self.sampler.region_distribution(self.conditioning.sampling, self.region_tracker)

    def __call__(self, global_step):
        accelerator = self.accelerator
        tick = time.perf_counter()
        region_probabilities = self.region_distribution()
        tracker_time = time.perf_counter() - tick
        statistics, prompts = None, []
        logs = dict.fromkeys(LOGGED_TERMS, 0.0)
        locally_finite = step_is_finite = True
        # Latents, noise and timesteps were prepared ahead by the loader. Damaged paired data stops every
        # process together before this step's first forward pass (one agreement per step, not per micro-batch).
        step_batches = [next(self.micro_batches) for _ in range(self.gradient_accumulation_steps)]
        problems = [prepared["data_problem"] for prepared in step_batches if "data_problem" in prepared]
        if not all_processes_agree(accelerator, not problems):
            raise PairedDataError(problems[0] if problems else "another process read damaged paired data (its "
                                  "message names the shard)")
        for micro_step, prepared in enumerate(step_batches):
            # The conditions are drawn now, from the region tracker's allocation after the previous step.
            batch = self.assemble_micro_batch(prepared, global_step, micro_step, region_probabilities,
                                              accelerator.device)
            prompts.extend(batch.conditions.prompts)
            noisy_latents = self.noise.noisy_latents(batch.latents, batch.noise, batch.timesteps)
            target = self.noise.target(batch.latents, batch.noise, batch.timesteps)
            sample_weights = batch.conditions.sample_weights.to(accelerator.device)
            noise_weights = self.noise.loss_weights(batch.timesteps)  # flow matching's sigma_sqrt / cosmap
            if noise_weights is not None:
                sample_weights = sample_weights * noise_weights.to(sample_weights.device)
            with accelerator.accumulate(*self.trained_models):
                with torch.no_grad():
                    # added_cond_kwargs: SDXL's pooled text embeddings and time ids, SD 3.x's pooled projections
                    # (None for SD-1.x/2.x).
                    encoder_hidden_states, added_cond_kwargs = self.prompt_encoder.encode(batch.input_ids,
                                                                                          batch.time_ids)
                    teacher_pred = self.family.denoise(self.teacher_unet, noisy_latents.to(self.weight_dtype),
                                                       batch.timesteps, encoder_hidden_states, added_cond_kwargs)
                student_pred = self.family.denoise(self.student, noisy_latents, batch.timesteps, encoder_hidden_states,
                                                   added_cond_kwargs)
                student_features = self.student_features.features()
                if self.feature_projectors is not None:
                    student_features = self.feature_projectors(student_features)
                losses = self.loss_fn(student_pred, teacher_pred, target, student_features,
                                      self.teacher_features.features(),
                                      batch.conditions.is_paired.to(accelerator.device), sample_weights)
                self.student_features.clear()
                self.teacher_features.clear()
                accelerator.backward(losses.loss)
                # One device sync for every logged term (each .item() would be one).
                loss_value, task_value, kd_output_value, kd_feat_value = torch.stack(
                    [losses.loss.detach(), losses.task, losses.kd_output, losses.kd_feat]).tolist()
                locally_finite = locally_finite and math.isfinite(loss_value)
                if accelerator.sync_gradients:
                    # Every process must take the same decision, or DDP replicas drift apart.
                    step_is_finite = all_processes_agree(accelerator, locally_finite)
                    if step_is_finite:
                        accelerator.clip_grad_norm_(self.trained_parameters, self.max_grad_norm)
                        self.optimizer.step()
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)

            if self.region_tracker is not None:
                tick = time.perf_counter()
                micro_statistics = self.region_tracker.step_statistics(batch.conditions.region_ids,
                                                                losses.per_sample_kd_output.cpu(),
                                                                batch.timesteps.cpu())
                statistics = micro_statistics if statistics is None else statistics + micro_statistics
                tracker_time += time.perf_counter() - tick
            random_fraction = 1.0 - batch.conditions.is_paired.float().mean().item()  # a CPU tensor: no device sync
            for key, value in zip(LOGGED_TERMS, (loss_value, task_value, kd_output_value, kd_feat_value,
                                                 random_fraction)):
                logs[key] += value / self.gradient_accumulation_steps

        if self.region_tracker is not None and step_is_finite:
            tick = time.perf_counter()
            self.region_tracker.update_from_statistics(accelerator.reduce(statistics.to(accelerator.device), "sum").cpu())
            tracker_time += time.perf_counter() - tick
        if self.ema_student is not None and step_is_finite:
            self.ema_student.step(self.ema_parameters(accelerator.unwrap_model(self.student)))
        return StepResult(logs=logs, is_finite=step_is_finite, tracker_time=tracker_time, prompts=prompts,
                          region_probabilities=region_probabilities)

    def close(self):
        """Remove the feature hooks from student and teacher, and stop the DataLoader's workers.

        The workers ignore SIGTERM (see step_batches), so they must be stopped through the loader, here,
        before the interpreter exits: at exit multiprocessing would terminate them with that very signal
        and wait for them forever.
        """
        self.student_features.remove()
        self.teacher_features.remove()
        shutdown_workers = getattr(self.micro_batches, "_shutdown_workers", None)  # the loader's own clean-up
        if shutdown_workers is not None:
            shutdown_workers()


def build_distillation_step(accelerator, student, teacher_unet, prompt_encoder, noise, optimizer,
                            lr_scheduler, paired, caption_region_ids, corpus_prompts, sampler, region_tracker, max_train_steps,
                            batch, conditioning, loss_weights, max_grad_norm, start_step=0, ema_student=None,
                            ema_parameters=None, weight_dtype=torch.float32, default_time_ids=None,
                            feature_projectors=None):
    """The step a run's configs describe (`batch`: BatchConfig, `conditioning`: ConditioningConfig,
    `loss_weights`: LossWeights), with its data pipeline positioned at `start_step`.

    `noise` is the teacher's training noise (`families/noise.py`); `student`, `optimizer` and `lr_scheduler` are
    the prepared ones. The feature hooks sit on the
    unwrapped modules; call `step.close()` to remove them. `default_time_ids` are the micro-conditioning
    of latents whose paired set stores none (families that take image sizes, e.g. SDXL);
    `feature_projectors` (prepared) map a narrower student's features to the teacher's widths.
    """
    from aria_utils.data.step_batches import ConditionAssembler, PairedMicroBatches, micro_batch_loader
    family = prompt_encoder.family
    feature_pairs = family.feature_layer_pairs(accelerator.unwrap_model(student), teacher_unet)
    student_features = FeatureRecorder(accelerator.unwrap_model(student), [pair[0] for pair in feature_pairs],
                                       family.feature_output)
    teacher_features = FeatureRecorder(teacher_unet, [pair[1] for pair in feature_pairs], family.feature_output)
    num_train_timesteps = noise.num_train_timesteps
    accumulation = batch.gradient_accumulation_steps
    micro_batches = PairedMicroBatches(
        paired, batch.per_device, accumulation, accelerator.process_index, accelerator.num_processes, batch.seed,
        noise, caption_region_ids, max_train_steps * accumulation, default_time_ids=default_time_ids)
    micro_batch_iterator = iter(micro_batch_loader(
        micro_batches, start_step * accumulation, num_workers=batch.num_workers,
        pin_memory=accelerator.device.type == "cuda"))
    assemble_micro_batch = ConditionAssembler(conditioning, sampler, corpus_prompts, prompt_encoder, batch.seed,
                                              accelerator.process_index, num_train_timesteps)
    return DistillationStep(
        accelerator, student, teacher_unet, prompt_encoder, noise, optimizer, lr_scheduler,
        DistillationLoss(loss_weights.task, loss_weights.kd_output, loss_weights.kd_feat), student_features,
        teacher_features, assemble_micro_batch, micro_batch_iterator, sampler, conditioning,
        region_tracker=region_tracker, ema_student=ema_student, ema_parameters=ema_parameters,
        gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm, weight_dtype=weight_dtype,
        feature_projectors=feature_projectors)


def build_optimizer(config, parameters, total_batch_size):
    """AdamW (8-bit with `config.use_8bit_adam`) over `parameters`; `config` is an OptimizerConfig."""
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(parameters, lr=config.learning_rate_for(total_batch_size), betas=config.betas,
                           weight_decay=config.weight_decay, eps=config.epsilon)
