"""BK-SDM's distillation objective as a small callable, plus the forward hooks that collect features.

    L = lambda_sd * MSE(eps_S, target)            (paired samples only)
      + lambda_kd_output * MSE(eps_S, eps_T)
      + lambda_kd_feat * sum_l MSE(F_S^l, F_T^l)

Every term is computed per sample first: the per-sample output-KD error is the teacher-student
discrepancy that the ARIA tracker consumes, so tracking costs no extra forward pass.
"""

from dataclasses import dataclass

import torch


def per_sample_mse(prediction, target):
    """Mean squared error per sample, in fp32 whatever the compute dtype."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class DistillationLossOutput:
    loss: torch.Tensor  # the scalar to backpropagate
    task: torch.Tensor  # detached scalars, for logging
    kd_output: torch.Tensor
    kd_feat: torch.Tensor
    per_sample_kd_output: torch.Tensor  # (batch,) detached: the teacher-student discrepancy per sample


class DistillationLoss:
    """Task loss on paired samples + output KD + feature KD, with optional per-sample weights."""

    def __init__(self, lambda_sd=1.0, lambda_kd_output=1.0, lambda_kd_feat=1.0):
        self.lambda_sd = lambda_sd
        self.lambda_kd_output = lambda_kd_output
        self.lambda_kd_feat = lambda_kd_feat

    def __call__(self, student_pred, teacher_pred, target, student_features, teacher_features, is_paired,
                 sample_weights=None):
        batch_size = student_pred.shape[0]
        weights = torch.ones(batch_size, device=student_pred.device) if sample_weights is None else sample_weights
        weights = weights.float()
        paired = is_paired.float()

        # Random conditioning replaced the caption of unpaired samples: the noise target no longer
        # belongs to their condition, so only paired samples carry the task loss.
        task = (paired * weights * per_sample_mse(student_pred, target)).sum() / paired.sum().clamp(min=1.0)
        kd_output_per_sample = per_sample_mse(student_pred, teacher_pred.detach())
        kd_output = (weights * kd_output_per_sample).mean()
        kd_feat = student_pred.new_zeros((), dtype=torch.float32)
        for student_feature, teacher_feature in zip(student_features, teacher_features):
            kd_feat = kd_feat + (weights * per_sample_mse(student_feature, teacher_feature.detach())).mean()

        loss = self.lambda_sd * task + self.lambda_kd_output * kd_output + self.lambda_kd_feat * kd_feat
        return DistillationLossOutput(
            loss=loss,
            task=task.detach(),
            kd_output=kd_output.detach(),
            kd_feat=kd_feat.detach(),
            per_sample_kd_output=kd_output_per_sample.detach(),
        )


def block_output(output):
    """The feature map in a hooked module's output: a tuple's first entry, an output object's `sample`, or the
    tensor itself (UNet blocks and layers)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "sample", output)


class FeatureRecorder:
    """Forward hooks that keep the outputs of named submodules during one forward pass.

    Hooks are registered on the *unwrapped* model's submodules by name, so they fire the same
    whether or not the model is later wrapped by DDP / FSDP (which forward into the same modules).
    """

    def __init__(self, model, module_names, select_output=block_output):
        """`select_output`: the tensor to keep from a hooked module's output (the model family's choice, e.g. one
        stream of a joint transformer block)."""
        self.module_names = list(module_names)
        self._select_output = select_output
        self._outputs = {}
        self._handles = [
            model.get_submodule(name).register_forward_hook(self._make_hook(name)) for name in self.module_names
        ]

    def _make_hook(self, name):
        def hook(module, inputs, output):
            self._outputs[name] = self._select_output(output)

        return hook

    def clear(self):
        self._outputs = {}

    def features(self):
        """Outputs in `module_names` order; raises if a hooked module did not run."""
        missing = [name for name in self.module_names if name not in self._outputs]
        if missing:
            raise RuntimeError(f"Feature KD hooks did not fire for {missing}")
        return [self._outputs[name] for name in self.module_names]

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
