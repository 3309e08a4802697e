"""Stand-ins for the built-in model ``kerasdiffusion/shapes``: converted folders of random weights, in the form
the real one ships in (our weight names, float16, an SD 1.x scheduler config, the image size in the manifest),
so that the plumbing is tested apart from the trained weights.

`write_converted_model` makes one; the ``builtin_shapes`` fixture (conftest.py) puts a tiny one under the
built-in name; ``shipped_shapes`` gives the real one, skipping where the package folder holds no weights.
"""

import dataclasses

import keras
import numpy as np

from kerasdiffusion import config as C
from kerasdiffusion import sources
from kerasdiffusion.schedulers import SchedulerConfig
from kerasdiffusion.text_encoder import build_text_encoder
from kerasdiffusion.unet import build_unet
from kerasdiffusion.vae import build_decoder, build_image_encoder
from weights_conversion.convert import Converted, save_converted

SHAPES = "kerasdiffusion/shapes"
SHAPES_IMAGE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    text_encoder: C.TextEncoderConfig
    unet: C.UNetConfig
    vae: C.VAEConfig


# Smaller than the built-in model (its sizes are `kerasdiffusion.training.shapes_model`'s), for the tests: the
# full vocabulary (the shipped tokenizer's), 64-wide heads (what the loader reads from an SD 1.x text encoder's
# width), four VAE levels (8 pixels a latent).
TINY_CONFIGS = ModelConfigs(
    text_encoder=C.TextEncoderConfig(width=64, num_layers=1, num_heads=1, mlp_dim=64),
    unet=C.UNetConfig(block_channels=(32, 32), attention_levels=(True, False), layers_per_level=1, context_dim=64,
                      num_heads=2),
    vae=C.VAEConfig(block_channels=(32, 32, 32, 32), layers_per_level=1),
)


def write_converted_model(folder, configs=TINY_CONFIGS, image_size=SHAPES_IMAGE_SIZE, seed=0, dtype="float16",
                          source=SHAPES):
    """Writes a converted folder of Keras' random initial weights for ``configs``; returns its path."""
    keras.utils.set_random_seed(seed)
    networks = {"text_encoder": [build_text_encoder(configs.text_encoder)], "unet": [build_unet(configs.unet)],
                "vae": [build_image_encoder(configs.vae), build_decoder(configs.vae)]}
    rng = np.random.default_rng(seed)
    weights = {network: {v.path: np.asarray(_drawn(v.path, keras.ops.convert_to_numpy(v.value), rng), dtype)
                         for model in models for v in model.weights}
               for network, models in networks.items()}
    scheduler = {"_class_name": "DDIMScheduler", **dataclasses.asdict(SchedulerConfig())}
    return save_converted(Converted(weights, scheduler, None, source, image_size), folder)


def _drawn(path, initial, rng):
    """Keras' initial kernels and embeddings; norm scales and biases drawn too (Keras starts them at 1 and 0, which
    would make every layer norm's output mean exactly 0, and A1111 emphasis divide by it)."""
    if path.endswith(("gamma", "beta", "bias")):
        return initial + 0.1 * rng.standard_normal(initial.shape)
    return initial


def shipped_shapes_folder():
    """The package's own folder for the built-in model (present once its weights are committed)."""
    return sources.BUILTIN_MODELS[SHAPES]
