"""BK-SDM students: block-removed UNets derived from the teacher's config, initialised from its weights.

- bk_base:  one resnet(+attention) fewer in every stage (down stages keep 1 of 2, up stages 2 of 3).
- bk_small: bk_base without the mid block.
- bk_tiny:  bk_small without the innermost stage (the plain DownBlock2D and its UpBlock2D partner).

KOALA students (Lee et al. 2023) for SDXL teachers:

- koala_1b:   one resnet(+attention) fewer in every stage, as bk_base, and the innermost stage's
              transformers (and the mid block's) cut to 6/10 of their depth (SDXL-base: 10 -> 6).
- koala_700m: the same with depth 5/10 (10 -> 5) and no mid block.

From SDXL-base's UNet (2,567M parameters) these give KOALA's 1,161M and 783M.

Random Conditioning's channel-reduced students (Kim et al., CVPR 2025) for SD-1.x/2.x teachers:

- c_base / c_small / c_tiny / c_micro: the teacher's whole block layout with every stage's width
  scaled by 0.8 / 0.7 / 0.6 / 0.5 (SD-1.x 320-640-1280-1280 -> 256-512-1024-1024, 224-448-896-896,
  192-384-768-768, 160-320-640-640), rounded to a multiple of the GroupNorm group count. Other widths
  than the teacher's: no weight can be copied, so they start from a seeded random init, and feature
  KD goes through learned projections (`feature_projectors.py`) at RC's layers
  (`channel_feature_layer_pairs`).

Works for any SD-1.x/2.x- or SDXL-style config: only the block layout changes, every other field
(attention heads, linear projection, cross-attention width, added conditions, sample size) is kept
from the teacher.

Initialisation (`student_to_teacher_key_map`): down stages copy the teacher's first layers, up
stages its outer layers (student layer j <- teacher layer j, the student's last <- the teacher's
last), and a shortened transformer keeps blocks spread evenly over the teacher's depth, first and
last included (SDXL 10 -> 6: blocks 0, 2, 4, 5, 7, 9; 10 -> 5: 0, 2, 5, 7, 9), so the student's
transformer still starts where the teacher's starts and ends where it ends.
"""

import re

BK_VARIANTS = ("bk_base", "bk_small", "bk_tiny")
# variant -> (fraction of the innermost stage's transformer depth kept, mid block kept)
KOALA_VARIANTS = {"koala_1b": (0.6, True), "koala_700m": (0.5, False)}
# variant -> the fraction of every stage's width kept
CHANNEL_VARIANTS = {"c_base": 0.8, "c_small": 0.7, "c_tiny": 0.6, "c_micro": 0.5}
STUDENT_VARIANTS = BK_VARIANTS + tuple(KOALA_VARIANTS) + tuple(CHANNEL_VARIANTS)

# Config fields holding one value per down stage (outermost first).
_PER_STAGE_FIELDS = (
    "block_out_channels", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
    "cross_attention_dim", "layers_per_block", "only_cross_attention",
)
# Config fields holding one value per up stage (innermost first).
_PER_UP_STAGE_FIELDS = ("reverse_transformer_layers_per_block",)


def _without_innermost_stage(value, num_stages, innermost_first=False):
    if isinstance(value, (list, tuple)) and len(value) == num_stages:
        return list(value[1:]) if innermost_first else list(value[:-1])
    return value


def student_config_from_teacher(teacher_config, variant):
    """The BK-SDM student UNet config for `variant`, derived from a teacher UNet config dict."""
    if variant not in STUDENT_VARIANTS:
        raise ValueError(f"--student_config {variant!r} is not a student of a UNet teacher (SD-1.x/2.x, SDXL); choose "
                         f"one of {', '.join(STUDENT_VARIANTS)}.")
    config = {key: value for key, value in dict(teacher_config).items() if not key.startswith("_")}
    if variant in CHANNEL_VARIANTS:
        return _narrowed(config, variant)
    num_stages = len(config["down_block_types"])
    layers = config.get("layers_per_block", 2)
    config["layers_per_block"] = [1] * num_stages if isinstance(layers, (list, tuple)) else 1
    if variant in ("bk_small", "bk_tiny"):
        config["mid_block_type"] = None
    if variant in KOALA_VARIANTS:
        _apply_koala(config, variant)
    if variant == "bk_tiny":
        if config["down_block_types"][-1] != "DownBlock2D" or config["up_block_types"][0] != "UpBlock2D":
            raise ValueError(
                "--student_config bk_tiny removes the innermost plain stage (DownBlock2D / UpBlock2D) of an SD-1.x/2.x "
                f"UNet, but this teacher has down={config['down_block_types']} up={config['up_block_types']}; "
                "use bk_base or bk_small."
            )
        config["down_block_types"] = list(config["down_block_types"][:-1])
        config["up_block_types"] = list(config["up_block_types"][1:])
        for key in _PER_STAGE_FIELDS:
            if key in config:
                config[key] = _without_innermost_stage(config[key], num_stages)
        for key in _PER_UP_STAGE_FIELDS:
            if key in config:
                config[key] = _without_innermost_stage(config[key], num_stages, innermost_first=True)
    return config


def student_family(variant):
    """The paper a student variant comes from, for the model card."""
    if variant in CHANNEL_VARIANTS:
        return "Random Conditioning channel-reduced"
    return "KOALA" if variant in KOALA_VARIANTS else "BK-SDM"


def inherits_teacher_weights(variant):
    """Whether a variant's weights are copied from the teacher (the same widths) or start at random."""
    return variant not in CHANNEL_VARIANTS


def _narrowed(config, variant):
    """Every stage's width times CHANNEL_VARIANTS[variant]; the block layout and the mid block are kept.

    Attention heads: the teacher's head count is kept where it divides the new width (SD-1.x: 8 heads,
    so 40/80/160-dim heads become 32/64/128 in c_base); where it does not (SD-2.x's 64-dim heads, 5/10/20
    of them), the teacher's head width is kept, halved until it divides the new width (c_small: 224 = 7
    heads of 32).
    """
    if config.get("addition_embed_type") is not None:
        raise ValueError(f"--student_config {variant} is a channel-reduced student of an SD-1.x/2.x teacher; this "
                         "teacher adds conditions to its time embedding (SDXL): use koala_1b or koala_700m.")
    fraction = CHANNEL_VARIANTS[variant]
    groups = config.get("norm_num_groups", 32)
    teacher_widths = list(config["block_out_channels"])
    widths = [max(groups, int(width * fraction / groups + 0.5) * groups) for width in teacher_widths]
    num_stages = len(widths)
    heads_field = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    heads = config.get(heads_field) or 8
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * num_stages
    new_heads = []
    for teacher_width, width, count in zip(teacher_widths, widths, heads):
        if width % count == 0:
            new_heads.append(count)
            continue
        head_width = teacher_width // count
        while head_width > 1 and width % head_width:
            head_width //= 2
        new_heads.append(width // head_width)
    config["block_out_channels"] = widths
    original = config.get(heads_field)
    config[heads_field] = original if isinstance(original, int) and set(new_heads) == {original} else new_heads
    return config


def _apply_koala(config, variant):
    if config.get("addition_embed_type") != "text_time":
        raise ValueError(f"--student_config {variant} is a KOALA student of an SDXL teacher, but this teacher's UNet "
                         "is SD-1.x/2.x (no pooled text embeddings / time ids); use bk_base, bk_small or bk_tiny.")
    if config.get("reverse_transformer_layers_per_block") is not None:
        raise ValueError(f"--student_config {variant}: this teacher sets reverse_transformer_layers_per_block (an "
                         "already-pruned SDXL such as SSD-1B); KOALA is defined for SDXL-base's layout. Use bk_base.")
    fraction, keep_mid = KOALA_VARIANTS[variant]
    num_stages = len(config["down_block_types"])
    depths = config.get("transformer_layers_per_block", 1)
    depths = list(depths) if isinstance(depths, (list, tuple)) else [depths] * num_stages
    # The mid block has the innermost stage's depth (diffusers reads it from the last entry).
    depths[-1] = max(1, int(depths[-1] * fraction + 0.5))
    config["transformer_layers_per_block"] = depths
    if not keep_mid:
        config["mid_block_type"] = None


def kept_transformer_blocks(num_student, num_teacher):
    """Teacher transformer blocks a shortened student transformer starts from: evenly spread, ends included."""
    if num_student >= num_teacher:
        return list(range(num_student))
    if num_student == 1:
        return [0]
    return [int(i * (num_teacher - 1) / (num_student - 1) + 0.5) for i in range(num_student)]


_BLOCK_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
_UP_BLOCK = re.compile(r"^up_blocks\.(\d+)\.(.*)$")
_TRANSFORMER_BLOCK = re.compile(r"^(.*\.attentions\.\d+)\.transformer_blocks\.(\d+)\.(.*)$")


def _count_transformer_blocks(model, attention_path):
    return len(model.get_submodule(attention_path).transformer_blocks)


def student_to_teacher_key_map(student, teacher):
    """Map every student state-dict key to the teacher key it is initialised from (BK-SDM's rule).

    Down stages copy the teacher's first layers; up stages keep the teacher's outer layers (student
    layer j <- teacher layer j, except the student's last <- the teacher's last); when the student
    has fewer up stages (bk_tiny), its up stage i is the teacher's up stage i + the difference.
    """
    up_offset = len(teacher.up_blocks) - len(student.up_blocks)
    mapping = {}
    for key in student.state_dict():
        match = _BLOCK_LAYER.match(key)
        if match:
            kind, stage, layer_kind, layer, rest = match.groups()
            stage, layer = int(stage), int(layer)
            if kind == "up_blocks":
                teacher_stage = stage + up_offset
                num_student = len(getattr(student.up_blocks[stage], layer_kind))
                num_teacher = len(getattr(teacher.up_blocks[teacher_stage], layer_kind))
                teacher_layer = layer if layer < num_student - 1 else num_teacher - 1
            else:
                teacher_stage, teacher_layer = stage, layer
            mapping[key] = f"{kind}.{teacher_stage}.{layer_kind}.{teacher_layer}.{rest}"
            continue
        match = _UP_BLOCK.match(key)
        if match:
            mapping[key] = f"up_blocks.{int(match.group(1)) + up_offset}.{match.group(2)}"
            continue
        mapping[key] = key
    for key, teacher_key in mapping.items():
        match = _TRANSFORMER_BLOCK.match(teacher_key)
        if match:
            attention, block, rest = match.groups()
            num_student = _count_transformer_blocks(student, _TRANSFORMER_BLOCK.match(key).group(1))
            num_teacher = _count_transformer_blocks(teacher, attention)
            if num_student != num_teacher:
                block = kept_transformer_blocks(num_student, num_teacher)[int(block)]
                mapping[key] = f"{attention}.transformer_blocks.{block}.{rest}"
    return mapping


def init_student_from_teacher(student, teacher):
    """Copy teacher weights into the student by `student_to_teacher_key_map`. Fails loudly on any gap."""
    return copy_mapped_weights(student, teacher, student_to_teacher_key_map(student, teacher))


def copy_mapped_weights(student, teacher, mapping):
    """Load every student weight from the teacher weight `mapping` names for it; fails loudly on any gap."""
    import torch

    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    new_state = {}
    for student_key, teacher_key in mapping.items():
        if teacher_key not in teacher_state:
            raise KeyError(f"Student weight {student_key} maps to {teacher_key}, which the teacher does not have.")
        source = teacher_state[teacher_key]
        if source.shape != student_state[student_key].shape:
            raise ValueError(
                f"Shape mismatch initialising {student_key} {tuple(student_state[student_key].shape)} "
                f"from {teacher_key} {tuple(source.shape)}."
            )
        new_state[student_key] = source.detach().to(dtype=student_state[student_key].dtype)
    with torch.no_grad():
        student.load_state_dict(new_state, strict=True)
    return student


def build_student(teacher_unet, variant):
    """The student UNet (fp32): initialised from `teacher_unet` (BK-SDM, KOALA), or, for a channel-reduced
    variant, from torch's random generator (seeded by the caller)."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(student_config_from_teacher(teacher_unet.config, variant))
    if not inherits_teacher_weights(variant):
        return student
    return init_student_from_teacher(student, teacher_unet)


def needs_feature_projection(student, teacher):
    """A narrower student (channel-reduced: the teacher's stages, other widths) compares its features through
    learned projections. Block-removed students keep the widths of the stages they keep."""
    student_widths, teacher_widths = list(student.config.block_out_channels), list(teacher.config.block_out_channels)
    return len(student_widths) == len(teacher_widths) and student_widths != teacher_widths


def feature_layer_pairs(student, teacher):
    """(student module name, teacher module name) pairs whose outputs feature KD compares.

    A channel-reduced student: RC's layers (`channel_feature_layer_pairs`). Otherwise:

    Outputs of every down and up stage. A student stage that lost its downsampler (bk_tiny's
    innermost kept stage) does not match the teacher's stage output in resolution; there, as in
    BK-SDM's and RC's scripts, the last attention's output projection (before its residual) is
    compared: teacher `down_blocks.2.attentions.1.proj_out` with student
    `down_blocks.2.attentions.0.proj_out` for SD-1.x.
    """
    if needs_feature_projection(student, teacher):
        return channel_feature_layer_pairs(student)
    pairs = []
    for index, block in enumerate(student.down_blocks):
        teacher_block = teacher.down_blocks[index]
        if block.downsamplers is None and teacher_block.downsamplers is not None:
            if getattr(block, "attentions", None) and getattr(teacher_block, "attentions", None):
                pairs.append((f"down_blocks.{index}.attentions.{len(block.attentions) - 1}.proj_out",
                              f"down_blocks.{index}.attentions.{len(teacher_block.attentions) - 1}.proj_out"))
            else:  # a plain stage: its output is its last resnet's, which the teacher's last resnet matches
                pairs.append((f"down_blocks.{index}", f"down_blocks.{index}.resnets.{len(teacher_block.resnets) - 1}"))
            continue
        pairs.append((f"down_blocks.{index}", f"down_blocks.{index}"))
    up_offset = len(teacher.up_blocks) - len(student.up_blocks)
    for index in range(len(student.up_blocks)):
        pairs.append((f"up_blocks.{index}", f"up_blocks.{index + up_offset}"))
    return pairs


def channel_feature_layer_pairs(student):
    """Random Conditioning's feature-KD layers of a channel-reduced student, which has the teacher's layout (so
    each name is the same in both): the down- and up-samplers' convolutions, the mid block's attention output,
    the innermost down stage's last resnet and the outermost up stage's last attention output. For SD-1.x:
    down_blocks.{0,1,2}.downsamplers.0.conv, down_blocks.3.resnets.1.conv2, mid_block.attentions.0.proj_out,
    up_blocks.{0,1,2}.upsamplers.0.conv, up_blocks.3.attentions.2.proj_out."""
    names = [f"down_blocks.{index}.downsamplers.0.conv" for index, block in enumerate(student.down_blocks)
             if block.downsamplers is not None]
    innermost = len(student.down_blocks) - 1
    names.append(f"down_blocks.{innermost}.resnets.{len(student.down_blocks[innermost].resnets) - 1}.conv2")
    if student.mid_block is not None and getattr(student.mid_block, "attentions", None):
        names.append("mid_block.attentions.0.proj_out")
    names += [f"up_blocks.{index}.upsamplers.0.conv" for index, block in enumerate(student.up_blocks)
              if block.upsamplers is not None]
    outermost = student.up_blocks[-1]
    if getattr(outermost, "attentions", None):
        names.append(f"up_blocks.{len(student.up_blocks) - 1}.attentions.{len(outermost.attentions) - 1}.proj_out")
    else:
        names.append(f"up_blocks.{len(student.up_blocks) - 1}.resnets.{len(outermost.resnets) - 1}.conv2")
    return [(name, name) for name in names]


def count_parameters(module):
    return sum(parameter.numel() for parameter in module.parameters())
