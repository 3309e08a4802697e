"""Blocks shared by several networks: residual blocks, attention, resampling, embeddings.

The builders here add named Keras layers to a functional graph; the weightless layers below do the
shape bookkeeping that a functional graph with free spatial sizes cannot express with plain ops.
Every layer with weights gets an explicit name, so that loading goes by name.
"""

import contextlib
import contextvars
import math

import keras
import numpy as np
from keras import ops

from kerasdiffusion import backend

_TO_BE_LOADED = contextvars.ContextVar("kerasdiffusion_to_be_loaded", default=None)
# A layer's initializer arguments -> the name of the variable each one makes.
_VARIABLES = {"kernel_initializer": "kernel", "bias_initializer": "bias", "gamma_initializer": "gamma",
              "beta_initializer": "beta", "embeddings_initializer": "embeddings", "initializer": "embeddings"}


@keras.saving.register_keras_serializable(package="kerasdiffusion")
class Unset(keras.initializers.Initializer):
    """Zeros made by NumPy, for variables about to be assigned: no random draw to pay for and, on JAX, no
    program compiled per shape (Keras' random initializers compile one each)."""

    def __call__(self, shape, dtype=None):
        dtype = keras.backend.standardize_dtype(dtype or "float32")
        if dtype in ("float32", "float16", "float64", "int32", "int64"):
            return np.zeros(shape, dtype)
        return ops.zeros(shape, dtype)


@keras.saving.register_keras_serializable(package="kerasdiffusion")
class Loaded(Unset):
    """A variable's value from the checkpoint being loaded, read when the variable is made, so the weights
    are never held twice (a file's tensor stored as it is goes to the backend without NumPy:
    `backend.tensor_from_file`); `Unset` where the checkpoint has no tensor of that name and shape, which the strict
    check after building then reports (`weights.check_weights`). It lets go of the checkpoint once used, and
    a saved network carries its values, so it serializes as nothing more than `Unset`."""

    def __init__(self, weights=None, path=None):
        self.weights, self.path = weights, path

    def __call__(self, shape, dtype=None):
        tensor = (self.weights or {}).get(self.path)
        self.weights = None
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            return super().__call__(shape, dtype)
        dtype = keras.backend.standardize_dtype(dtype or "float32")
        if getattr(tensor, "stored_as_is", False) and tensor.dtype == dtype:  # a file's tensor, as it is stored
            made = backend.tensor_from_file(tensor)
            if made is not None:
                return made
        return np.asarray(tensor).astype(dtype, copy=False)

    def get_config(self):
        return {}


@contextlib.contextmanager
def to_be_loaded(weights=None):
    """Networks built inside skip Keras' random initialisation: each variable is made from ``weights``
    (``{variable path: array}``, e.g. ``{"input_conv/kernel": ...}``, read lazily one at a time) or, without
    them, as zeros to be assigned right after. Check the result with `weights.check_weights`.

    Example:

    >>> from kerasdiffusion import config as C, text_encoder
    >>> config = C.TextEncoderConfig(vocab_size=10, width=8, num_layers=1, num_heads=1, mlp_dim=16, max_length=4)
    >>> with to_be_loaded({"token_embedding/embeddings": np.ones((10, 8), "float32")}):
    ...     model = text_encoder.build_text_encoder(config)
    >>> float(model.get_layer("token_embedding").embeddings.numpy().min())
    1.0
    >>> float(abs(model.get_layer("final_norm").gamma.numpy()).max())
    0.0
    """
    token = _TO_BE_LOADED.set({} if weights is None else weights)
    try:
        yield
    finally:
        _TO_BE_LOADED.reset(token)


def initializers(layer, *arguments):
    """Inside `to_be_loaded`, ``{argument: Loaded(...)}`` for layer ``layer``'s initializer arguments (its
    variables' values from the weights being loaded); elsewhere ``{}``, Keras' own random initialisers."""
    weights = _TO_BE_LOADED.get()
    if weights is None:
        return {}
    return {argument: Loaded(weights, f"{layer}/{_VARIABLES[argument]}") for argument in arguments}


def conv(channels, kernel_size, name, dtype, strides=1):
    """A convolution with PyTorch's symmetric padding of ``kernel_size // 2`` (for stride 1: "same")."""
    padding = "same" if strides == 1 else "valid"
    return keras.layers.Conv2D(channels, kernel_size, strides=strides, padding=padding, name=name, dtype=dtype,
                               **initializers(name, "kernel_initializer", "bias_initializer"))


def group_norm(groups, epsilon, name, dtype):
    # Keras' GroupNormalization computes its statistics in float32 whatever the policy.
    return keras.layers.GroupNormalization(groups=groups, epsilon=epsilon, name=name, dtype=dtype,
                                           **initializers(name, "gamma_initializer", "beta_initializer"))


def layer_norm(epsilon, name, dtype):
    return keras.layers.LayerNormalization(epsilon=epsilon, name=name, dtype=dtype,
                                           **initializers(name, "gamma_initializer", "beta_initializer"))


def dense(units, name, dtype, use_bias=True):
    return keras.layers.Dense(units, use_bias=use_bias, name=name, dtype=dtype,
                              **initializers(name, "kernel_initializer", "bias_initializer"))


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


@keras.saving.register_keras_serializable(package="kerasdiffusion")
class AddChannelBias(keras.layers.Layer):
    """``x [B, H, W, C] + bias [B, C]``: the time embedding added to every pixel."""

    def call(self, inputs):
        x, bias = inputs
        return x + bias[:, None, None, :]


@keras.saving.register_keras_serializable(package="kerasdiffusion")
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


@keras.saving.register_keras_serializable(package="kerasdiffusion")
class SpatialToTokens(keras.layers.Layer):
    """``[B, H, W, C] -> [B, H*W, C]``."""

    def call(self, x):
        shape = ops.shape(x)
        return ops.reshape(x, (shape[0], shape[1] * shape[2], shape[3]))

    def compute_output_shape(self, s):
        return (s[0], None if None in (s[1], s[2]) else s[1] * s[2], s[3])


@keras.saving.register_keras_serializable(package="kerasdiffusion")
class TokensToSpatial(keras.layers.Layer):
    """``[B, H*W, C] -> [B, H, W, C]`` with the height and width of a reference tensor."""

    def call(self, inputs):
        x, like = inputs
        shape = ops.shape(like)
        return ops.reshape(x, (shape[0], shape[1], shape[2], ops.shape(x)[-1]))

    def compute_output_shape(self, input_shapes):
        x, like = input_shapes
        return (x[0], like[1], like[2], x[2])


@keras.saving.register_keras_serializable(package="kerasdiffusion")
class ScaledDotProductAttention(keras.layers.Layer):
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` over already projected ``[B, N, C]`` queries, keys, values.

    The softmax always runs in float32; ``upcast`` also computes the scores in float32 (SD 2.x needs it
    under float16, where the scores overflow).

    Short sequences build the whole score matrix in one batched product. Long ones (the UNet's 64x64 level
    at 512x512 has 4096 tokens, i.e. a 2 x 8 x 4096 x 4096 score matrix of 1 GiB) are computed one block of
    queries at a time, for one batch item and head, in a loop that XLA keeps rolled: a block's scores (at
    most ``block_scores`` numbers) stay in cache from the product through the softmax to the product with
    the values, instead of making several passes over memory. Each query still sees every key in one
    softmax, so the result is the full formulation's up to float rounding (this is not an online softmax).
    Blocks are used only when the default device is a CPU. On GPUs and TPUs the backend's fused attention
    (`keras.ops.dot_product_attention`: cuDNN's flash attention on JAX/GPU where it applies) runs instead: it
    never materialises the scores, which at batch is what made our UNet slower than diffusers' SDPA on an
    H100 (PERF_NOTES). On CPU the fused op is the whole-matrix formulation (TensorFlow) or close to it, and
    the blocked loop is 2.3x faster (benchmarks/attention.py), so CPUs keep it.

    ``block_scores`` and ``fused`` are class attributes: ``block_scores = 0`` always builds the whole
    matrix where the fused op is not used; ``fused = True`` / ``False`` forces the fused op on or off on
    every device (``None``, the default, picks by device type).
    """

    # 512 queries x 4096 keys of float32: 8 MiB, a block that fits the last-level cache of a server CPU.
    # Measured on a 2-core Zen 3 at 4096 tokens x 40 dims, 8 heads, batch 2 (benchmarks/attention.py): 2.3x
    # less time than the whole matrix under XLA, on par with torch's SDPA; 256 and 512 query rows per block
    # time the same, 1024 is slower.
    block_scores = 2**21
    fused = None

    def __init__(self, num_heads, causal=False, upcast=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.causal = causal
        self.upcast = upcast

    def _split_heads(self, x):
        shape = ops.shape(x)
        x = ops.reshape(x, (shape[0], shape[1], self.num_heads, shape[2] // self.num_heads))
        return ops.transpose(x, (0, 2, 1, 3))

    def _scores(self, q, k):
        """``q k^T / sqrt(d)`` as float32; ``k`` is ``[..., N_k, d]``."""
        if self.upcast:
            q, k = ops.cast(q, "float32"), ops.cast(k, "float32")
        scale = ops.cast(1.0 / math.sqrt(q.shape[-1]), q.dtype)
        return ops.cast(ops.matmul(q * scale, ops.swapaxes(k, -1, -2)), "float32")

    def _blocked(self, q, k):
        """Whether to loop over query blocks: on CPU, for long, statically known sequences, never causal."""
        batch, queries, keys = q.shape[0], q.shape[2], k.shape[2]
        if self.causal or not self.block_scores or None in (batch, queries, keys):
            return False
        on_cpu = keras.distribution.list_devices()[0].lower().startswith("cpu")
        return on_cpu and batch * self.num_heads * queries * keys > 2 * self.block_scores

    def _fused(self):
        if self.fused is not None:
            return self.fused
        return not keras.distribution.list_devices()[0].lower().startswith("cpu")

    def call(self, inputs):
        if self._fused():
            return self._fused_attention(*inputs)
        q, k, v = (self._split_heads(t) for t in inputs)
        out = self._blocked_attention(q, k, v) if self._blocked(q, k) else self._full_attention(q, k, v)
        out = ops.transpose(out, (0, 2, 1, 3))
        shape = ops.shape(out)
        return ops.reshape(out, (shape[0], shape[1], shape[2] * shape[3]))

    def _fused_attention(self, q, k, v):
        """`keras.ops.dot_product_attention` over ``[B, N, heads, d]``, the layout it takes, in and out."""
        dtype = q.dtype
        if self.upcast:  # a fused kernel's float16 scores could overflow like ours; float32 throughout
            q, k, v = (ops.cast(t, "float32") for t in (q, k, v))

        def heads(x):
            shape = ops.shape(x)
            return ops.reshape(x, (shape[0], shape[1], self.num_heads, shape[2] // self.num_heads))

        out = ops.dot_product_attention(heads(q), heads(k), heads(v), is_causal=self.causal)
        shape = ops.shape(out)
        return ops.cast(ops.reshape(out, (shape[0], shape[1], shape[2] * shape[3])), dtype)

    def _full_attention(self, q, k, v):
        scores = self._scores(q, k)
        if self.causal:
            n = ops.shape(scores)[-1]
            keep = ops.greater_equal(ops.arange(n)[:, None], ops.arange(n)[None, :])
            scores = ops.where(keep, scores, ops.full_like(scores, -1e30))
        weights = ops.cast(ops.softmax(scores, axis=-1), v.dtype)
        return ops.matmul(weights, v)

    def _blocked_attention(self, q, k, v):
        """``[B, H, N_q, d]`` queries in blocks of at most ``block_scores // N_k`` rows, one (batch, head) each."""
        batch, heads, queries, depth = q.shape
        keys, value_depth = k.shape[2], v.shape[3]
        blocks = -(-queries * keys // self.block_scores)  # per (batch, head); balanced, so padding is < blocks
        rows = -(-queries // blocks)
        q = ops.pad(q, ((0, 0), (0, 0), (0, blocks * rows - queries), (0, 0)))  # zero queries, dropped below
        q = ops.reshape(q, (batch * heads * blocks, rows, depth))
        k = ops.reshape(k, (batch * heads, keys, depth))
        v = ops.reshape(v, (batch * heads, keys, value_depth))

        def block(args):
            q_block, index = args
            head = index // blocks
            scores = self._scores(q_block, ops.take(k, head, axis=0))
            weights = ops.exp(scores - ops.max(scores, axis=-1, keepdims=True))
            total = ops.sum(weights, axis=-1, keepdims=True)
            if keras.backend.standardize_dtype(v.dtype) == "float32":
                # Normalising the [rows, d] product instead of the [rows, N_k] weights saves a pass.
                return ops.matmul(weights, ops.take(v, head, axis=0)) / total
            return ops.matmul(ops.cast(weights / total, v.dtype), ops.take(v, head, axis=0))

        out = ops.map(block, (q, ops.arange(batch * heads * blocks, dtype="int32")))
        out = ops.reshape(out, (batch, heads, blocks * rows, value_depth))
        return out[:, :, :queries]

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], input_shapes[0][1], input_shapes[2][2])

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "causal": self.causal, "upcast": self.upcast}
