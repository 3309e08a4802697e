"""The KL autoencoder: the image encoder (pixels -> latent moments) and the decoder (latents -> pixels).

Both are residual convolution stacks with one single-head self-attention in the middle. The encoder ends
in the 1x1 ``quant_conv`` and returns mean and log-variance; the decoder starts with ``post_quant_conv``
and takes latents already divided by the scaling factor.

Example:

>>> import numpy as np
>>> from kerasdiffusion.config import VAEConfig
>>> config = VAEConfig(block_channels=(32, 64))
>>> tuple(build_decoder(config)(np.zeros((1, 4, 6, 4), "float32")).shape)
(1, 8, 12, 3)
>>> tuple(build_image_encoder(config)(np.zeros((1, 8, 12, 3), "float32")).shape)
(1, 4, 6, 8)
"""

import keras

from kerasdiffusion import layers as L


def _res(x, channels, name, config, dtype):
    return L.res_block(x, channels, name, config.norm_groups, config.epsilon, dtype)


def _self_attention(x, name, config, dtype):
    """Single-head attention over all pixels, with a residual connection."""
    channels = x.shape[-1]
    h = L.group_norm(config.norm_groups, config.epsilon, f"{name}_norm", dtype)(x)
    h = L.SpatialToTokens(dtype=dtype)(h)
    q, k, v = (L.dense(channels, f"{name}_{p}", dtype)(h) for p in "qkv")
    h = L.dense(channels, f"{name}_out", dtype)(L.attention(q, k, v, 1, dtype))
    return x + L.TokensToSpatial(dtype=dtype)([h, x])


def _middle(x, prefix, config, dtype):
    channels = x.shape[-1]
    x = _res(x, channels, f"{prefix}_mid_res0", config, dtype)
    x = _self_attention(x, f"{prefix}_mid_attn", config, dtype)
    return _res(x, channels, f"{prefix}_mid_res1", config, dtype)


def _output(x, channels, prefix, config, dtype):
    x = L.group_norm(config.norm_groups, config.epsilon, f"{prefix}_output_norm", dtype)(x)
    return L.conv(channels, 3, f"{prefix}_output_conv", dtype)(L.silu(x))


def build_image_encoder(config, dtype=None, name="image_encoder"):
    """Builds the encoder: images ``[B, H, W, 3]`` in [-1, 1] -> moments ``[B, H/8, W/8, 2 * latent]``."""
    images = keras.Input((None, None, config.image_channels), name="images")
    x = L.conv(config.block_channels[0], 3, "encoder_input_conv", dtype)(images)
    last = len(config.block_channels) - 1
    for level, channels in enumerate(config.block_channels):
        for i in range(config.layers_per_level):
            x = _res(x, channels, f"encoder_down{level}_res{i}", config, dtype)
        if level != last:
            x = L.downsample(x, f"encoder_down{level}_downsample", dtype, padding=((0, 1), (0, 1)))
    x = _middle(x, "encoder", config, dtype)
    x = _output(x, 2 * config.latent_channels, "encoder", config, dtype)
    moments = L.conv(2 * config.latent_channels, 1, "quant_conv", dtype)(x)
    return keras.Model(images, moments, name=name)


def split_weights(weights):
    """Converted VAE weights -> (encoder's, decoder's): ``encoder_*`` and ``quant_conv`` go to the encoder.

    Example:
    >>> encoder, decoder = split_weights({"quant_conv/bias": 0, "encoder_input_conv/bias": 0, "post_quant_conv/bias": 0})
    >>> sorted(encoder), sorted(decoder)
    (['encoder_input_conv/bias', 'quant_conv/bias'], ['post_quant_conv/bias'])
    """
    def encoder_part(path):
        return path.startswith(("encoder_", "quant_conv/"))

    encoder = {path: array for path, array in weights.items() if encoder_part(path)}
    decoder = {path: array for path, array in weights.items() if not encoder_part(path)}
    return encoder, decoder


def build_decoder(config, dtype=None, name="decoder"):
    """Builds the decoder: latents ``[B, h, w, 4]`` (already unscaled) -> images ``[B, 8h, 8w, 3]`` in about [-1, 1]."""
    latents = keras.Input((None, None, config.latent_channels), name="latents")
    x = L.conv(config.latent_channels, 1, "post_quant_conv", dtype)(latents)
    x = L.conv(config.block_channels[-1], 3, "decoder_input_conv", dtype)(x)
    x = _middle(x, "decoder", config, dtype)
    levels = len(config.block_channels)
    for up, level in enumerate(reversed(range(levels))):
        for i in range(config.layers_per_level + 1):
            x = _res(x, config.block_channels[level], f"decoder_up{up}_res{i}", config, dtype)
        if up != levels - 1:
            x = L.upsample(x, f"decoder_up{up}_upsample", dtype)
    x = _output(x, config.image_channels, "decoder", config, dtype)
    return keras.Model(latents, x, name=name)
