"""The CLIP text encoder: token ids ``int32 [B, 77]`` -> the context ``[B, 77, D]`` the UNet attends to.

A pre-norm transformer with a causal mask; the output is the final layer norm of the last layer (SD 2.x
checkpoints are converted with their last layer dropped, so "last" is OpenCLIP's penultimate).

Example:

>>> import numpy as np
>>> from kerasdiffusion.config import TextEncoderConfig
>>> config = TextEncoderConfig(vocab_size=100, width=64, num_layers=1, num_heads=1, mlp_dim=128)
>>> model = build_text_encoder(config)
>>> tuple(model(np.zeros((2, 77), "int32")).shape)
(2, 77, 64)
"""

import keras
from keras import ops

from kerasdiffusion.layers import attention, dense, initializers, layer_norm


@keras.saving.register_keras_serializable(package="kerasdiffusion")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding per position to ``[B, N, D]`` tokens (N up to ``max_length``)."""

    def __init__(self, max_length, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length
        self.initializer = initializers(self.name, "initializer").get("initializer", "glorot_uniform")

    def build(self, input_shape):
        self.embeddings = self.add_weight(shape=(self.max_length, input_shape[-1]), name="embeddings",
                                          initializer=self.initializer)

    def call(self, x):
        return x + ops.cast(self.embeddings[: ops.shape(x)[1]], x.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


def _activation(name):
    if name == "quick_gelu":
        return lambda x: x * ops.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: ops.gelu(x, approximate=False)
    raise ValueError(f"Unknown text encoder activation {name!r}; expected 'quick_gelu' or 'gelu'.")


def _encoder_layer(x, config, i, dtype):
    """Pre-norm self-attention and MLP, each with a residual connection."""
    name = f"layer{i}"
    h = layer_norm(config.epsilon, f"{name}_norm1", dtype)(x)
    q, k, v = (dense(config.width, f"{name}_attn_{p}", dtype)(h) for p in "qkv")
    h = attention(q, k, v, config.num_heads, dtype, causal=True)
    x = x + dense(config.width, f"{name}_attn_out", dtype)(h)
    h = layer_norm(config.epsilon, f"{name}_norm2", dtype)(x)
    h = _activation(config.activation)(dense(config.mlp_dim, f"{name}_mlp_fc1", dtype)(h))
    return x + dense(config.width, f"{name}_mlp_fc2", dtype)(h)


def build_text_encoder(config, dtype=None, name="text_encoder"):
    """Builds the text encoder as a Keras functional model.

    Args:
        config: a `TextEncoderConfig`.
        dtype: a Keras dtype policy name for every layer (`"float32"`, `"mixed_float16"`, ...);
            `None` keeps Keras' default.
        name: the model's name.
    """
    tokens = keras.Input((config.max_length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(config.vocab_size, config.width, name="token_embedding", dtype=dtype,
                               **initializers("token_embedding", "embeddings_initializer"))(tokens)
    x = PositionEmbedding(config.max_length, name="position_embedding", dtype=dtype)(x)
    for i in range(config.num_layers):
        x = _encoder_layer(x, config, i, dtype)
    x = layer_norm(config.epsilon, "final_norm", dtype)(x)
    return keras.Model(tokens, x, name=name)


def num_layers(text_encoder):
    """How many transformer layers a text encoder built by `build_text_encoder` has."""
    return sum(1 for layer in text_encoder.layers if layer.name.endswith("_norm1") and layer.name.startswith("layer"))


def skip_last_layers(text_encoder, count):
    """The same text encoder, its output taken ``count`` layers before the last, through the final layer norm.

    AUTOMATIC1111's "clip skip" (``CLIP_stop_at_last_layers = count + 1``) and diffusers' ``clip_skip=count``:
    the hidden state after layer ``L - count`` rather than ``L``. The returned model shares every weight with
    ``text_encoder`` (a LoRA fused into one is fused into both) and is the model itself for ``count == 0``.

    Example:

    >>> import numpy as np
    >>> from kerasdiffusion.config import TextEncoderConfig
    >>> full = build_text_encoder(TextEncoderConfig(vocab_size=100, width=64, num_layers=3, num_heads=1, mlp_dim=128))
    >>> tuple(skip_last_layers(full, 1)(np.zeros((1, 77), "int32")).shape)
    (1, 77, 64)
    """
    layers = num_layers(text_encoder)
    if not 0 <= count < layers:
        raise ValueError(f"Cannot skip {count} of the text encoder's {layers} layers")
    if count == 0:
        return text_encoder
    # What enters layer i's first norm is the residual stream after layers 0 .. i-1.
    hidden = text_encoder.get_layer(f"layer{layers - count}_norm1").input
    output = text_encoder.get_layer("final_norm")(hidden)
    return keras.Model(text_encoder.input, output, name=f"{text_encoder.name}_skip{count}")
