"""Trainable low-rank factors for the kernels of a frozen network, and their export as `LoraUpdate`s.

A `LowRankUpdate` holds, for one Dense or Conv2D kernel ``W`` of our layout (``[in, out]`` or HWIO), a
``down`` factor shaped like ``W`` with ``out`` replaced by the rank and an ``up`` factor ``[rank, out]``;
the adapted kernel is ``W + (alpha / rank) · down @ up``. The trainer computes it in each step and runs the
network with it in place of ``W`` (the network's own variables never change). In PyTorch's layout the same
factors are a LoRA's ``down`` (``lora_A``) ``[r, in(, kh, kw)]`` and ``up`` (``lora_B``) ``[out, r]``.

Targets are named by what they adapt; the layers they stand for are our own layer names:

- ``"attention"``: the q, k, v and output projections of the UNet's attention (and the text encoder's);
- ``"feed_forward"``: the UNet's GEGLU feed-forward (and the text encoder's MLP);
- ``"convolutions"``: the UNet's residual-block, skip and resampling convolutions (LoCon).

Example:

>>> update = LowRankUpdate((8, 16), rank=2, alpha=2.0)
>>> tuple(update.down.shape), tuple(update.up.shape), tuple(update.delta().shape)
((8, 2), (2, 16), (8, 16))
"""

import re

import keras
import numpy as np
from keras import ops

from weights_conversion.lora import LoraUpdate

TARGETS = ("attention", "feed_forward", "convolutions")
DEFAULT_TARGETS = ("attention",)
# Our layer names per target and network.
_UNET_LAYERS = {
    "attention": r"_(self|cross)_(q|k|v|out)",
    "feed_forward": r"_ff_(in|out)",
    "convolutions": r"_res\d+_(conv1|conv2|skip)|_(downsample|upsample)",
}
_TEXT_ENCODER_LAYERS = {
    "attention": r"_attn_(q|k|v|out)",
    "feed_forward": r"_mlp_fc\d",
}


def check_targets(targets):
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"Unknown LoRA targets {unknown or targets!r}; expected some of {', '.join(TARGETS)}")
    return targets


def target_kernels(network, targets, text_encoder=False):
    """The kernel variables of ``network`` that ``targets`` adapt, in the network's order.

    Raises:
        ValueError: when the targets match no kernel (a network without attention, say).
    """
    table = _TEXT_ENCODER_LAYERS if text_encoder else _UNET_LAYERS
    patterns = [table[t] for t in targets if t in table]
    pattern = re.compile(rf"(?:{'|'.join(patterns)})/kernel$") if patterns else None
    kernels = [v for v in network.weights if pattern is not None and pattern.search(v.path)]
    if not kernels:
        raise ValueError(f"The LoRA targets {targets} match no kernel of {network.name}")
    return kernels


@keras.saving.register_keras_serializable(package="kerasdiffusion")
class LowRankUpdate(keras.layers.Layer):
    """``(alpha / rank) · down @ up``: a trainable low-rank update of one kernel of shape ``kernel_shape``.

    ``down`` starts gaussian with standard deviation ``1 / rank`` (PEFT's ``init_lora_weights="gaussian"``, as
    diffusers' LoRA training scripts use) and ``up`` at zero, so training starts from the network as it is.

    Args:
        kernel_shape: the adapted kernel's shape, ``[in, out]`` or ``[kh, kw, in, out]``.
        rank: the inner dimension.
        alpha: the update is scaled by ``alpha / rank``.
        seed: the initial ``down`` factor's seed.
    """

    def __init__(self, kernel_shape, rank, alpha, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.kernel_shape = tuple(int(n) for n in kernel_shape)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.down = self.add_weight(shape=(*self.kernel_shape[:-1], self.rank), name="down", dtype="float32",
                                    initializer=keras.initializers.RandomNormal(stddev=1.0 / self.rank, seed=seed))
        self.up = self.add_weight(shape=(self.rank, self.kernel_shape[-1]), name="up", dtype="float32",
                                  initializer="zeros")
        self.built = True

    @property
    def scale(self):
        return self.alpha / self.rank

    def delta(self):
        """The update in the kernel's layout, float32."""
        return self.scale * ops.matmul(self.down, self.up)

    def lora_update(self, path):
        """This update as a `LoraUpdate` of our kernel ``path``, factors in PyTorch's layout."""
        down = np.asarray(ops.convert_to_numpy(self.down), np.float32)  # [in, r] or [kh, kw, in, r]
        up = np.asarray(ops.convert_to_numpy(self.up), np.float32)  # [r, out]
        if down.ndim == 4:
            torch_shape = (self.kernel_shape[3], self.kernel_shape[2], *self.kernel_shape[:2])
            torch_down = np.transpose(down, (3, 2, 0, 1))  # HWIr -> r I H W
        else:
            torch_shape = (self.kernel_shape[1], self.kernel_shape[0])
            torch_down = down.T
        return LoraUpdate(path=path, torch_shape=torch_shape, up=np.ascontiguousarray(up.T),
                          down=np.ascontiguousarray(torch_down), scale=self.scale)

    def get_config(self):
        return {**super().get_config(), "kernel_shape": self.kernel_shape, "rank": self.rank, "alpha": self.alpha}
