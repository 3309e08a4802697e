"""Pixels in and out: uint8 <-> [-1, 1], PIL images, masks.

Example:

>>> import numpy as np
>>> to_uint8(np.array([[-1.0, 0.0, 1.0]])).tolist()
[[0, 128, 255]]
"""

import numpy as np


def to_uint8(images):
    """Decoder output in about [-1, 1] -> uint8, rounded the way diffusers does (``round(x * 255)``)."""
    images = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(images * 255).astype(np.uint8)


def _as_array(image):
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def from_uint8(image, batch_size=None):
    """A uint8 image ``[H, W, 3]``, ``[B, H, W, 3]`` or PIL image -> float32 ``[B, H, W, 3]`` in [-1, 1].

    Raises:
        ValueError: for a shape or dtype that is not an RGB image, or a batch that does not fit.
    """
    array = _as_array(image)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] or [B, H, W, 3] RGB, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got dtype {array.dtype}")
    if batch_size is not None and array.shape[0] not in (1, batch_size):
        raise ValueError(f"image batch of {array.shape[0]} does not match batch_size={batch_size}")
    if batch_size is not None and array.shape[0] == 1:
        array = np.repeat(array, batch_size, axis=0)
    return array.astype(np.float32) / 127.5 - 1.0


def mask_from_input(mask, height, width):
    """A mask ``[H, W]`` (1 or 255 where to repaint; PIL allowed) -> float32 ``[H, W]`` of 0/1 (binarized at 0.5).

    Raises:
        ValueError: if the mask is not 2-D or its size differs from the image's.
    """
    array = _as_array(mask) if not hasattr(mask, "convert") else np.asarray(mask.convert("L"))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {array.shape}")
    if array.shape != (height, width):
        raise ValueError(f"mask size {array.shape[1]}x{array.shape[0]} differs from the image's {width}x{height}")
    array = array.astype(np.float32)
    if array.max(initial=0) > 1:
        array = array / 255.0
    return (array >= 0.5).astype(np.float32)
