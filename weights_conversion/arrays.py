"""Raw checkpoint bytes as numpy arrays: bfloat16 widened to float32, strided views bounds-checked."""

import math

import numpy as np


def bf16_to_float32(bits):
    """The raw 16 bits of bfloat16 numbers (uint16) as float32; exact, since bf16 is float32's top half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def contiguous_strides(shape):
    """The element strides of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def strided_view(flat, offset, shape, stride, where):
    """``flat[offset:]`` seen with element ``stride``s as ``shape``: a view when contiguous, else a copy.

    Bounds are checked first, since ``as_strided`` would otherwise read memory past the storage.
    """
    if math.prod(shape) == 0:
        return np.zeros(shape, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if offset < 0 or any(s < 0 for s in stride) or last >= flat.size:
        raise CheckpointError(
            f"{where}: shape {shape}, strides {stride} at offset {offset} reach past its {flat.size}-element storage"
        )
    if all(s == c for n, s, c in zip(shape, stride, contiguous_strides(shape), strict=True) if n > 1):
        return flat[offset : offset + math.prod(shape)].reshape(shape)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=shape, strides=[s * flat.itemsize for s in stride], writeable=False
    )
    return view.copy()
