"""Raw checkpoint bytes as numpy arrays: bfloat16 widened to float32, strided views bounds-checked.

Shapes, strides and offsets come from the file, so nothing here trusts them: `check_layout` bounds every
number before numpy sees it, and `strided_view` checks that a view stays inside its storage.
"""

import math

import numpy as np

from weights_conversion.errors import CheckpointError

# numpy 1.x's limit on dimensions; no checkpoint tensor comes near it.
MAX_DIMS = 32
# Sizes, strides and offsets fit in a signed 64-bit integer, as numpy and torch store them.
_INDEX_LIMIT = 2**63


def bf16_to_float32(bits):
    """The raw 16 bits of bfloat16 numbers (uint16) as float32; exact, since bf16 is float32's top half."""
    wide = bits.astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


def check_layout(shape, stride, offset, where):
    """``shape`` and ``stride`` as tuples of ints, after checking that they and ``offset`` are non-negative
    integers numpy can index with, with one stride per dimension."""
    shape, stride = _index_tuple(shape, "shape", where), _index_tuple(stride, "strides", where)
    if len(shape) != len(stride):
        raise CheckpointError(f"{where}: {len(shape)} dimensions but {len(stride)} strides")
    if type(offset) is not int or not 0 <= offset < _INDEX_LIMIT:
        raise CheckpointError(f"{where}: storage offset is not an integer in [0, 2**63)")
    return shape, stride


def _index_tuple(values, what, where):
    """A short sequence of non-negative 64-bit integers as a tuple; ``bool`` and floats are refused."""
    if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS:
        raise CheckpointError(f"{where}: {what} is not a sequence of at most {MAX_DIMS} integers")
    if not all(type(n) is int and 0 <= n < _INDEX_LIMIT for n in values):
        raise CheckpointError(f"{where}: {what} holds something other than integers in [0, 2**63)")
    return tuple(values)


def contiguous_strides(shape):
    """The element strides of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def is_contiguous(shape, stride):
    """Whether ``stride`` lays out ``shape`` C-contiguously (strides of length-1 dimensions do not matter)."""
    return all(s == c for n, s, c in zip(shape, stride, contiguous_strides(shape), strict=True) if n > 1)


def strided_view(flat, offset, shape, stride, where):
    """``flat[offset:]`` seen with element ``stride``s as ``shape``: a view when contiguous, else a copy.

    The layout must have passed `check_layout`. Bounds are checked first, since ``as_strided`` would
    otherwise read memory past the storage.
    """
    if math.prod(shape) == 0:
        return _empty(shape, flat.dtype, where)
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if last >= flat.size:
        raise CheckpointError(
            f"{where}: shape {shape}, strides {stride} at offset {offset} reach past its {flat.size}-element storage"
        )
    if is_contiguous(shape, stride):
        return flat[offset : offset + math.prod(shape)].reshape(shape)
    stride = [0 if n == 1 else s for n, s in zip(shape, stride)]  # a length-1 dimension's stride is never used
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=shape, strides=[s * flat.itemsize for s in stride], writeable=False
    )
    return view.copy()


def _empty(shape, dtype, where):
    """An array with no elements; numpy still refuses one whose other dimensions multiply past its limit."""
    try:
        return np.zeros(shape, dtype)
    except ValueError as e:
        raise CheckpointError(f"{where}: numpy cannot hold shape {shape}: {e}") from None
