"""Full-size Stable Diffusion 1.5 `Components` with Keras' random initializers, for timing only.

Timing does not depend on the weights' values, so the benchmarks build the networks from our SD 1.5
configs instead of loading a checkpoint: nothing is downloaded and no conversion is timed.
"""

import kerasdiffusion as kd
from kerasdiffusion import config as C
from kerasdiffusion.text_encoder import build_text_encoder
from kerasdiffusion.unet import build_unet
from kerasdiffusion.vae import build_decoder, build_image_encoder


def random_components(precision="float32"):
    """SD 1.5-sized `Components` (text encoder, UNet, VAE encoder and decoder) with random weights."""
    return kd.Components(
        tokenizer=kd.CLIPTokenizer(),
        text_encoder=build_text_encoder(C.SD1_TEXT_ENCODER, dtype=precision),
        diffusion_model=build_unet(C.SD1_UNET, dtype=precision),
        image_encoder=build_image_encoder(C.SD_VAE, dtype=precision),
        decoder=build_decoder(C.SD_VAE, dtype=precision),
        precision=precision,
        source="random SD 1.5-sized weights",
    )
