"""Blocks shared by several networks: residual blocks, attention, resampling, embeddings.

The builders here add named Keras layers to a functional graph; the weightless layers below do the
shape bookkeeping that a functional graph with free spatial sizes cannot express with plain ops.
Every layer with weights gets an explicit name, so that loading goes by name.
"""

import math

import keras
from keras import ops


def conv(channels, kernel_size, name, dtype, strides=1):
    """A convolution with PyTorch's symmetric padding of ``kernel_size // 2`` (for stride 1: "same")."""
    padding = "same" if strides == 1 else "valid"
    return keras.layers.Conv2D(channels, kernel_size, strides=strides, padding=padding, name=name, dtype=dtype)


def group_norm(groups, epsilon, name, dtype):
    # Keras' GroupNormalization computes its statistics in float32 whatever the policy.
    return keras.layers.GroupNormalization(groups=groups, epsilon=epsilon, name=name, dtype=dtype)


def layer_norm(epsilon, name, dtype):
    return keras.layers.LayerNormalization(epsilon=epsilon, name=name, dtype=dtype)


def dense(units, name, dtype, use_bias=True):
    return keras.layers.Dense(units, use_bias=use_bias, name=name, dtype=dtype)


def silu(x):
    return keras.layers.Activation("silu")(x)


def res_block(x, channels, name, groups, epsilon, dtype, time_embedding=None):
    """Two 3x3 convolutions with a residual path; the time embedding, when given, is added in between."""
    h = group_norm(groups, epsilon, f"{name}_norm1", dtype)(x)
    h = conv(channels, 3, f"{name}_conv1", dtype)(silu(h))
    if time_embedding is not None:
        t = dense(channels, f"{name}_time_proj", dtype)(silu(time_embedding))
        h = AddChannelBias(dtype=dtype)([h, t])
    h = group_norm(groups, epsilon, f"{name}_norm2", dtype)(h)
    h = conv(channels, 3, f"{name}_conv2", dtype)(silu(h))
    if x.shape[-1] != channels:
        x = conv(channels, 1, f"{name}_skip", dtype)(x)
    return keras.layers.Add(dtype=dtype)([x, h])


def downsample(x, name, dtype, padding=((1, 1), (1, 1))):
    """Stride-2 3x3 convolution. The UNet pads 1 on every side; the VAE encoder pads only bottom and right."""
    x = keras.layers.ZeroPadding2D(padding, dtype=dtype)(x)
    return conv(x.shape[-1], 3, name, dtype, strides=2)(x)


def upsample(x, name, dtype, like=None):
    """Nearest-neighbour 2x upsampling (cropped to ``like``'s size when given), then a 3x3 convolution."""
    x = UpsampleNearest(dtype=dtype)([x, like] if like is not None else [x])
    return conv(x.shape[-1], 3, name, dtype)(x)


def attention(q, k, v, num_heads, dtype, causal=False, upcast=False):
    return ScaledDotProductAttention(num_heads, causal=causal, upcast=upcast, dtype=dtype)([q, k, v])


class AddChannelBias(keras.layers.Layer):
    """``x [B, H, W, C] + bias [B, C]``: the time embedding added to every pixel."""

    def call(self, inputs):
        x, bias = inputs
        return x + bias[:, None, None, :]


class UpsampleNearest(keras.layers.Layer):
    """Repeats every pixel twice along each axis, then crops to the reference tensor's height and width.

    Where a level's size is odd, PyTorch upsamples to the skip connection's size with
    ``src = floor(dst * in / out)``, and for ``out = 2 * in - 1`` that is exactly "repeat, then crop".
    """

    def call(self, inputs):
        x = ops.repeat(ops.repeat(inputs[0], 2, axis=1), 2, axis=2)
        if len(inputs) == 1:
            return x
        like = ops.shape(inputs[1])
        return x[:, : like[1], : like[2], :]

    def compute_output_shape(self, input_shapes):
        x = input_shapes[0]
        if len(input_shapes) == 2:
            return (x[0], input_shapes[1][1], input_shapes[1][2], x[3])
        double = lambda n: None if n is None else 2 * n  # noqa: E731
        return (x[0], double(x[1]), double(x[2]), x[3])


class SpatialToTokens(keras.layers.Layer):
    """``[B, H, W, C] -> [B, H*W, C]``."""

    def call(self, x):
        shape = ops.shape(x)
        return ops.reshape(x, (shape[0], shape[1] * shape[2], shape[3]))

    def compute_output_shape(self, s):
        return (s[0], None if None in (s[1], s[2]) else s[1] * s[2], s[3])


class TokensToSpatial(keras.layers.Layer):
    """``[B, H*W, C] -> [B, H, W, C]`` with the height and width of a reference tensor."""

    def call(self, inputs):
        x, like = inputs
        shape = ops.shape(like)
        return ops.reshape(x, (shape[0], shape[1], shape[2], ops.shape(x)[-1]))

    def compute_output_shape(self, input_shapes):
        x, like = input_shapes
        return (x[0], like[1], like[2], x[2])


class ScaledDotProductAttention(keras.layers.Layer):
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` over already projected ``[B, N, C]`` queries, keys, values.

    The softmax always runs in float32; ``upcast`` also computes the scores in float32 (SD 2.x needs it
    under float16, where the scores overflow).
    """

    def __init__(self, num_heads, causal=False, upcast=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.causal = causal
        self.upcast = upcast

    def _split_heads(self, x):
        shape = ops.shape(x)
        x = ops.reshape(x, (shape[0], shape[1], self.num_heads, shape[2] // self.num_heads))
        return ops.transpose(x, (0, 2, 1, 3))

    def call(self, inputs):
        q, k, v = (self._split_heads(t) for t in inputs)
        scale = 1.0 / math.sqrt(inputs[0].shape[-1] // self.num_heads)
        if self.upcast:
            q, k = ops.cast(q, "float32"), ops.cast(k, "float32")
        scores = ops.cast(ops.matmul(q * ops.cast(scale, q.dtype), ops.transpose(k, (0, 1, 3, 2))), "float32")
        if self.causal:
            n = ops.shape(scores)[-1]
            keep = ops.greater_equal(ops.arange(n)[:, None], ops.arange(n)[None, :])
            scores = ops.where(keep, scores, ops.full_like(scores, -1e30))
        weights = ops.cast(ops.softmax(scores, axis=-1), v.dtype)
        out = ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3))
        shape = ops.shape(out)
        return ops.reshape(out, (shape[0], shape[1], shape[2] * shape[3]))

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], input_shapes[0][1], input_shapes[2][2])

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "causal": self.causal, "upcast": self.upcast}
