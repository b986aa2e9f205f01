"""Learned projections from a narrower student's features to its teacher's width, for feature KD.

A channel-reduced student (RC's `--channel_mapping`) has the teacher's layout but fewer channels, so its
features cannot be compared with the teacher's directly: each one goes through a 1x1 convolution (a
linear layer for features laid out as tokens, e.g. SD-2.x's linear attention projections) to the
teacher's width first. The projections train with the student, are saved in every checkpoint
(`feature_projectors.safetensors`) and are not part of the exported pipeline.
"""

import torch

WEIGHTS_NAME = "feature_projectors.safetensors"


def _width_and_kind(module):
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels, "conv"
    if isinstance(module, torch.nn.Linear):
        return module.out_features, "linear"
    raise ValueError(f"Feature KD can project the output of a Conv2d or Linear layer, not of {type(module).__name__}.")


class FeatureProjectors(torch.nn.Module):
    """One projection per (student layer, teacher layer) pair; `forward` maps the list of student features."""

    def __init__(self, student, teacher, layer_pairs):
        super().__init__()
        projections = []
        for student_name, teacher_name in layer_pairs:
            student_width, kind = _width_and_kind(student.get_submodule(student_name))
            teacher_width, _ = _width_and_kind(teacher.get_submodule(teacher_name))
            projections.append(torch.nn.Conv2d(student_width, teacher_width, kernel_size=1) if kind == "conv"
                               else torch.nn.Linear(student_width, teacher_width))
        self.projections = torch.nn.ModuleList(projections)

    def forward(self, student_features):
        return [projection(feature) for projection, feature in zip(self.projections, student_features)]


def save_feature_projectors(projectors, directory):
    import os

    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({key: value.detach().contiguous().cpu() for key, value in projectors.state_dict().items()},
              os.path.join(directory, WEIGHTS_NAME))


def load_feature_projectors(projectors, directory):
    import os

    from safetensors.torch import load_file

    projectors.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME)))
