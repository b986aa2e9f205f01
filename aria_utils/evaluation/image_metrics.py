"""The field's image metrics: FID, IS (Inception-v3) and CLIP score, computed by well-kept libraries.

- The Inception network, its preprocessing and the FID and IS arithmetic are torchmetrics' (which
  runs torch-fidelity's port of the 2015-12-05 TensorFlow graph, the weights every published FID
  uses). One forward gives both the 2048-d pool features (FID) and the unbiased logits (IS).
- CLIP score is the cosine of a transformers `CLIPModel`'s image and text embeddings, as BK-SDM and
  RC report it (0.2677, not torchmetrics' 100 x max(cos, 0) = 26.77). It is computed here with the
  model directly, per image (splits and regions need per-image numbers), because torchmetrics 1.9's
  `CLIPScore` fails on transformers 5's feature outputs; the tests check both agree. Prompts longer
  than 77 tokens are truncated by the tokenizer, keeping the end token the pooled embedding is read at.
- Every network can come from a local file, for air-gapped clusters: `inception_weights` is a
  safetensors file of the Inception state dict; the CLIP model is any `from_pretrained` folder. With
  neither, the libraries' own downloads are used.

Statistics are accumulated in float64 the way torchmetrics does (sums of features and of their
outer products), so an image set of any size is summarised in constant memory, and FID can compare
with a pytorch-fid `.npz` (`mu`, `sigma`) of reference images such as MS-COCO's.
"""

import importlib.util
import os
import sys
import types
import warnings
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch

from aria_utils.cli import UserInputError

FID_FEATURES = "2048"
IS_FEATURES = "logits_unbiased"
INCEPTION_FEATURE_SIZE = 2048
INCEPTION_SCORE_SPLITS = 10  # the field's default (Salimans et al.; torch-fidelity, torchmetrics)
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIP score model


class MetricSetupError(UserInputError):
    """A metric network or reference that cannot be used; the message names the flag and the fix."""


def _import_torch_fidelity():
    """Make `torch_fidelity.feature_extractor_inceptionv3` importable without torchvision.

    torch-fidelity's package `__init__` imports every feature extractor, and its CLIP, VGG and DINOv2
    ones import torchvision, which is missing or broken on some CPU builds of torch. The Inception
    extractor that FID and IS use needs only torch, so where the package import fails for that
    reason, the package is registered without running its `__init__` and the submodule imports alone.
    """
    try:
        import torch_fidelity  # noqa: F401
        return
    except ImportError as error:
        if "torchvision" not in str(error):
            raise
    except RuntimeError:  # a torchvision built for another torch fails while registering its operators
        pass
    spec = importlib.util.find_spec("torch_fidelity")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["torch_fidelity"] = package


def import_torchmetrics_inception():
    """torchmetrics' `NoTrainInceptionV3`, FID arithmetic and `InceptionScore`."""
    if importlib.util.find_spec("torch_fidelity") is None or importlib.util.find_spec("torchmetrics") is None:
        raise MetricSetupError("FID and IS need torchmetrics and torch-fidelity: pip install torchmetrics "
                               "torch-fidelity (see requirements.txt), or leave fid / is out of --metrics.")
    _import_torch_fidelity()
    from torchmetrics.image.fid import NoTrainInceptionV3, _compute_fid
    from torchmetrics.image.inception import InceptionScore

    return NoTrainInceptionV3, _compute_fid, InceptionScore


@contextmanager
def _weights_from_safetensors(path):
    """Inside: torch-fidelity's download of the Inception weights reads `path` (safetensors) instead.

    torch-fidelity loads a local weights file with `torch.load(weights_only=False)`, i.e. unrestricted
    pickle; we never do that, so a local file is given to the network as the download's result.
    """
    from safetensors.torch import load_file

    module = sys.modules["torch_fidelity.feature_extractor_inceptionv3"]
    with mock.patch.object(module, "load_state_dict_from_url", lambda *args, **kwargs: load_file(path)):
        yield


def load_inception(weights_path=None, features=(FID_FEATURES, IS_FEATURES), device="cpu"):
    """The library's Inception-v3 feature extractor; `weights_path` (safetensors) or the library's download."""
    NoTrainInceptionV3, _, _ = import_torchmetrics_inception()
    if weights_path is not None and not os.path.isfile(weights_path):
        raise MetricSetupError(f"--inception_weights {weights_path!r} does not exist; give the safetensors file "
                               "of the Inception weights (README: Image metrics) or leave the flag out to download.")
    # antialias=False: the resize to 299 px of the TensorFlow graph, torch-fidelity and pytorch-fid, which the
    # published numbers come from (torchmetrics' default antialias only differs for images larger than 299 px).
    build = lambda: NoTrainInceptionV3(name="inception-v3-compat", features_list=list(features),  # noqa: E731
                                       antialias=False)
    if weights_path is None:
        network = build()
    else:
        with _weights_from_safetensors(weights_path):
            try:
                network = build()
            except (RuntimeError, OSError) as error:
                raise MetricSetupError(
                    f"--inception_weights {weights_path!r} is not a state dict of the FID Inception-v3 network "
                    f"({str(error).splitlines()[0]}); convert the published .pth as the README's Image metrics "
                    "section shows.") from None
    return network.to(device)


def inception_features(network, images):
    """(pool features (N, 2048), unbiased logits (N, 1008)) of uint8 images (N, 3, H, W).

    torchmetrics' public `forward` returns only the first requested feature; its `_torch_fidelity_forward`
    returns all of them from one pass (the tests check the result equals the public metrics').
    """
    with torch.no_grad():
        pool, logits = network._torch_fidelity_forward(images.to(next(network.parameters()).device))
    return pool.reshape(len(images), -1).float().cpu(), logits.reshape(len(images), -1).float().cpu()


class FeatureStatistics:
    """Mean and covariance of features in float64, from sums (constant memory, any number of images)."""

    def __init__(self, size=INCEPTION_FEATURE_SIZE):
        self.total = torch.zeros(size, dtype=torch.float64)
        self.outer_total = torch.zeros(size, size, dtype=torch.float64)
        self.count = 0

    def add(self, features):
        features = torch.as_tensor(features).double()
        self.total += features.sum(0)
        self.outer_total += features.T @ features
        self.count += len(features)

    def mean_and_covariance(self):
        if self.count < 2:
            raise ValueError("FID needs at least 2 images")
        mean = self.total / self.count
        covariance = (self.outer_total - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, covariance


def frechet_distance(first, second):
    """FID between two (mean, covariance) pairs, by torchmetrics' arithmetic."""
    _, compute_fid, _ = import_torchmetrics_inception()
    (mean_a, cov_a), (mean_b, cov_b) = first, second
    distance = float(compute_fid(mean_a.double(), cov_a.double(), mean_b.double(), cov_b.double()))
    # A set against its own statistics gives -1e-7 or so from rounding; FID itself is never negative.
    return max(distance, 0.0)


def inception_score(logits, seed, splits=INCEPTION_SCORE_SPLITS):
    """(mean, std) of the Inception score over `splits` random splits, by torchmetrics' `InceptionScore`.

    Fewer images than splits use one split per image pair at most; the permutation is seeded, so a
    report is reproducible.
    """
    _, _, InceptionScore = import_torchmetrics_inception()
    logits = torch.as_tensor(logits)
    state = torch.random.get_rng_state()
    with warnings.catch_warnings():
        # "will save all extracted features": we hand it one split's logits, already in memory;
        # "degrees of freedom": the std of a single split, reported as 0.
        warnings.filterwarnings("ignore", message="Metric `InceptionScore` will save all extracted features")
        warnings.filterwarnings("ignore", message="std\\(\\): degrees of freedom")
        metric = InceptionScore(feature=torch.nn.Identity(), splits=max(1, min(splits, len(logits) // 2)))
        metric.update(logits)
        torch.manual_seed(seed)
        try:
            mean, std = metric.compute()
        finally:
            torch.random.set_rng_state(state)
    return float(mean), float(std) if torch.isfinite(std) else 0.0


def save_reference_statistics(path, statistics):
    """pytorch-fid's `.npz` format: `mu` (2048,), `sigma` (2048, 2048), float64."""
    mean, covariance = statistics.mean_and_covariance()
    temporary = path + ".tmp.npz"
    np.savez(temporary, mu=mean.numpy(), sigma=covariance.numpy())
    os.replace(temporary, path)


def load_reference_statistics(path):
    """(mean, covariance) from a pytorch-fid `.npz`; arrays only, never pickled objects."""
    try:
        with np.load(path, allow_pickle=False) as data:
            mean, covariance = torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["sigma"]).double()
    except (OSError, ValueError, KeyError) as error:
        raise MetricSetupError(f"--fid_reference {path!r} is not a pytorch-fid statistics file with arrays 'mu' and "
                               f"'sigma' ({error}); give such an .npz, a folder of reference images, or "
                               "'teacher'.") from None
    if mean.shape != (INCEPTION_FEATURE_SIZE,) or covariance.shape != (INCEPTION_FEATURE_SIZE,) * 2:
        raise MetricSetupError(f"--fid_reference {path!r} holds mu {tuple(mean.shape)} and sigma "
                               f"{tuple(covariance.shape)}; FID statistics are 2048-d pool features "
                               "(pytorch-fid's default --dims 2048).")
    return mean, covariance


def load_clip(name_or_path, device="cpu"):
    """A transformers CLIP model and processor: a local folder or a hub id (the library's download)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name_or_path).to(device).eval().requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise MetricSetupError(f"--clip_model_name_or_path {name_or_path!r} could not be loaded as a transformers "
                               f"CLIPModel with its processor ({str(error).splitlines()[0]}); give such a folder or "
                               "hub id (offline: a folder saved with save_pretrained).") from None
    return model, processor


def _embedding(output):
    """Projected embeddings: a tensor (transformers 4) or an output's pooler_output (5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def clip_cosines(model, processor, images, prompts):
    """Cosine of image and prompt embeddings per image; images are PIL images or uint8 (N, 3, H, W)."""
    device = next(model.parameters()).device
    if torch.is_tensor(images):
        images = list(images)
    with torch.no_grad():
        image_inputs = processor(images=images, return_tensors="pt")
        text_inputs = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        image_embeddings = _embedding(model.get_image_features(pixel_values=image_inputs["pixel_values"].to(device)))
        text_embeddings = _embedding(model.get_text_features(
            input_ids=text_inputs["input_ids"].to(device), attention_mask=text_inputs["attention_mask"].to(device)))
    image_embeddings = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    text_embeddings = torch.nn.functional.normalize(text_embeddings.float(), dim=-1)
    return (image_embeddings * text_embeddings).sum(-1).cpu()


def resize_for_scoring(image, resolution):
    """A PIL image as a uint8 (3, R, R) tensor: centre-cropped to a square, then bicubic-resized to `resolution`
    (BK-SDM scores 512 px generations at 256 px). `resolution` None keeps the size."""
    from PIL import Image

    image = image.convert("RGB")
    if image.width != image.height:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if resolution is not None and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
