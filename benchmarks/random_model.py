"""Full-size Stable Diffusion 1.5 `Components` with Keras' random initializers, for timing only.

Timing does not depend on the weights' values, so the benchmarks build the networks from our SD 1.5
configs instead of loading a checkpoint: nothing is downloaded and no conversion is timed.
"""

import kerasdiffusion as kd
from kerasdiffusion import config as C
from kerasdiffusion.text_encoder import build_text_encoder
from kerasdiffusion.unet import build_unet
from kerasdiffusion.vae import build_decoder, build_image_encoder


def random_components(precision="float32", text_encoder=C.SD1_TEXT_ENCODER, unet=C.SD1_UNET, vae=C.SD_VAE):
    """`Components` (text encoder, UNet, VAE encoder and decoder) with random weights; SD 1.5-sized unless
    other network configs are given."""
    return kd.Components(
        tokenizer=kd.CLIPTokenizer(),
        text_encoder=build_text_encoder(text_encoder, dtype=precision),
        diffusion_model=build_unet(unet, dtype=precision),
        image_encoder=build_image_encoder(vae, dtype=precision),
        decoder=build_decoder(vae, dtype=precision),
        vae_config=vae,
        precision=precision,
        source="random weights",
    )
