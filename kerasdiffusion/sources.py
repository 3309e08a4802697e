"""Where weights come from: Hub ids, local diffusers folders, single checkpoint files, converted folders.

Everything ends as a `weights_conversion.Converted`: our weights per network, plus the scheduler config and
tokenizer files when the source has them. The model family and every size are read from the weights.

Example:

>>> from kerasdiffusion.sources import is_hub_id
>>> is_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5"), is_hub_id("./my-model")
(True, False)
"""

import os
import re

from weights_conversion.convert import convert_source

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The files a diffusers repository needs for our pipeline, safetensors preferred.
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
]
HUB_WEIGHT_PATTERNS = {
    "safetensors": ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors"],
    "fp16": ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "vae/diffusion_pytorch_model.fp16.safetensors"],
}


def is_hub_id(source):
    """``org/name`` that is not an existing local path."""
    source = os.fspath(source)
    return not os.path.exists(source) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def download(repo_id, half_precision=False):
    """Downloads the diffusers files we need from the Hub (or finds them in its local cache)."""
    from huggingface_hub import snapshot_download

    weights = HUB_WEIGHT_PATTERNS["fp16" if half_precision else "safetensors"]
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS + weights)
    except Exception as error:  # huggingface_hub raises many kinds: offline, missing repo, network
        raise OSError(
            f"Could not get {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Pass a local diffusers folder, a converted folder or a .safetensors / .ckpt file instead."
        ) from error


def resolve(source, half_precision=False):
    """Reads (and converts, where needed) the weights of any supported source."""
    source = os.fspath(source)
    if is_hub_id(source):
        folder = download(source, half_precision)
        converted = convert_source(folder)
        converted.source = source
        return converted
    return convert_source(source)
