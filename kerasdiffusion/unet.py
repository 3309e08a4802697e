"""The denoising UNet: ``[latents [B, h, w, C_in], timesteps [B], context [B, N, D]] -> [B, h, w, C_out]``.

Read top to bottom it is the figure of the latent diffusion paper: a timestep embedding, a down path of
residual blocks and cross-attention transformers that halves the size at each level, a middle block,
and an up path that concatenates the down path's outputs (the skip connections) and doubles the size.
Any latent size works; where a level's size is odd, the up path upsamples to its skip connection's size.

Example:

>>> import numpy as np
>>> from kerasdiffusion.config import UNetConfig
>>> config = UNetConfig(block_channels=(32, 64), attention_levels=(True, False), context_dim=32)
>>> unet = build_unet(config)
>>> out = unet([np.zeros((1, 8, 12, 4), "float32"), np.zeros((1,), "float32"), np.zeros((1, 77, 32), "float32")])
>>> tuple(out.shape)
(1, 8, 12, 4)
"""

import math

import keras
from keras import ops

from kerasdiffusion import layers as L


@keras.saving.register_keras_serializable(package="kerasdiffusion")
class TimestepEmbedding(keras.layers.Layer):
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first (DDPM, Ho et al. 2020)."""

    def __init__(self, dim, max_period=10000, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.max_period = max_period

    def call(self, timesteps):
        half = self.dim // 2
        frequencies = ops.exp(-math.log(self.max_period) * ops.arange(half, dtype="float32") / half)
        angles = ops.cast(timesteps, "float32")[:, None] * frequencies[None, :]
        return ops.concatenate([ops.cos(angles), ops.sin(angles)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "max_period": self.max_period}


def _transformer_block(x, context, config, heads, name, dtype):
    """Self-attention, cross-attention on the context, and a GEGLU feed-forward, each pre-norm and residual."""
    width = x.shape[-1]
    for kind, source in (("self", None), ("cross", context)):
        h = L.layer_norm(1e-5, f"{name}_norm{1 if kind == 'self' else 2}", dtype)(x)
        source = h if source is None else source
        q = L.dense(width, f"{name}_{kind}_q", dtype, use_bias=False)(h)
        k = L.dense(width, f"{name}_{kind}_k", dtype, use_bias=False)(source)
        v = L.dense(width, f"{name}_{kind}_v", dtype, use_bias=False)(source)
        h = L.attention(q, k, v, heads, dtype, upcast=config.upcast_attention)
        x = x + L.dense(width, f"{name}_{kind}_out", dtype)(h)
    h = L.layer_norm(1e-5, f"{name}_norm3", dtype)(x)
    h, gate = ops.split(L.dense(8 * width, f"{name}_ff_in", dtype)(h), 2, axis=-1)
    return x + L.dense(width, f"{name}_ff_out", dtype)(h * ops.gelu(gate, approximate=False))


def _spatial_transformer(x, context, config, heads, name, dtype):
    """Group norm, projection to tokens, transformer blocks, projection back, plus the input."""
    h = L.group_norm(config.norm_groups, config.attention_epsilon, f"{name}_norm", dtype)(x)
    h = L.dense(x.shape[-1], f"{name}_proj_in", dtype)(L.SpatialToTokens(dtype=dtype)(h))
    for depth in range(config.transformer_depth):
        h = _transformer_block(h, context, config, heads, f"{name}_block{depth}", dtype)
    h = L.dense(x.shape[-1], f"{name}_proj_out", dtype)(h)
    return x + L.TokensToSpatial(dtype=dtype)([h, x])


def _res(x, channels, name, config, dtype, time_embedding):
    return L.res_block(x, channels, name, config.norm_groups, config.epsilon, dtype, time_embedding)


def _down_path(x, context, emb, config, dtype):
    """Returns the deepest features and every intermediate output, for the skip connections."""
    skips = [x]
    last = len(config.block_channels) - 1
    for level, channels in enumerate(config.block_channels):
        for i in range(config.layers_per_level):
            x = _res(x, channels, f"down{level}_res{i}", config, dtype, emb)
            if config.attention_levels[level]:
                x = _spatial_transformer(x, context, config, config.heads(level), f"down{level}_attn{i}", dtype)
            skips.append(x)
        if level != last:
            x = L.downsample(x, f"down{level}_downsample", dtype)
            skips.append(x)
    return x, skips


def _middle(x, context, emb, config, dtype):
    channels = config.block_channels[-1]
    x = _res(x, channels, "mid_res0", config, dtype, emb)
    x = _spatial_transformer(x, context, config, config.heads(len(config.block_channels) - 1), "mid_attn0", dtype)
    return _res(x, channels, "mid_res1", config, dtype, emb)


def _up_path(x, context, emb, skips, config, dtype):
    """Mirrors the down path: each level consumes its skips in reverse, then upsamples to the next skip's size."""
    levels = len(config.block_channels)
    for up, level in enumerate(reversed(range(levels))):
        channels = config.block_channels[level]
        for i in range(config.layers_per_level + 1):
            x = keras.layers.Concatenate(axis=-1, dtype=dtype)([x, skips.pop()])
            x = _res(x, channels, f"up{up}_res{i}", config, dtype, emb)
            if config.attention_levels[level]:
                x = _spatial_transformer(x, context, config, config.heads(level), f"up{up}_attn{i}", dtype)
        if up != levels - 1:
            x = L.upsample(x, f"up{up}_upsample", dtype, like=skips[-1])
    return x


def build_unet(config, dtype=None, name="diffusion_model"):
    """Builds the UNet as a Keras functional model.

    Args:
        config: a `UNetConfig`.
        dtype: a Keras dtype policy name for every layer; `None` keeps Keras' default.
        name: the model's name.
    """
    latents = keras.Input((None, None, config.in_channels), name="latents")
    timesteps = keras.Input((), dtype="float32", name="timesteps")
    context = keras.Input((None, config.context_dim), name="context")

    emb = TimestepEmbedding(config.block_channels[0], dtype="float32")(timesteps)
    emb = L.dense(config.time_embedding_dim, "time_embed_dense1", dtype)(emb)
    emb = L.dense(config.time_embedding_dim, "time_embed_dense2", dtype)(L.silu(emb))

    x = L.conv(config.block_channels[0], 3, "input_conv", dtype)(latents)
    x, skips = _down_path(x, context, emb, config, dtype)
    x = _middle(x, context, emb, config, dtype)
    x = _up_path(x, context, emb, skips, config, dtype)

    x = L.group_norm(config.norm_groups, config.epsilon, "output_norm", dtype)(x)
    x = L.conv(config.out_channels, 3, "output_conv", dtype)(L.silu(x))
    return keras.Model([latents, timesteps, context], x, name=name)
