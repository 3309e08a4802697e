"""Every random number of a generation, drawn on the host from each item's key alone.

An image's key is a pair ``(seed, index)``: with one integer seed ``s`` for a batch, item ``b`` has key
``(s, b)``; a batch may also mix items of different seeds (a job runner batching the images of several
prompts), each with its own key. Each key gets its own counter-based generator (Philox, keyed by
``(seed, index, counter)``): counter 0 gives the initial latents, counter ``i + 1`` the fresh noise of an
ancestral sampler's evaluation ``i``. Nothing depends on the batch size, the other items of the batch,
the backend, the device or how a batch is split over devices, so the same key gives the same image
everywhere, within floating-point tolerance of the networks.

Example:

>>> a = batch_normal(seed=7, indices=range(2), counter=0, item_shape=(8, 8, 4))
>>> b = keys_normal([(3, 0), (7, 1)], counter=0, item_shape=(8, 8, 4))
>>> bool((a[1] == b[1]).all())
True
"""

import random

import numpy as np

MAX_SEED = 2**63


def check_seed(seed):
    """A seed for a generation: `None` draws one; otherwise a non-negative integer below 2**63."""
    if seed is None:
        return random.SystemRandom().randrange(2**31)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    return int(seed)


def _check_index(index):
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < MAX_SEED:
        raise ValueError(f"an item's index must be an integer in [0, 2**63), got {index!r}")
    return int(index)


def is_item_keys(seed):
    """Whether ``seed`` is given per image (a list or tuple of ``(seed, index)`` pairs) rather than one integer."""
    return isinstance(seed, (list, tuple))


def item_keys(seed, batch_size):
    """The ``(seed, index)`` key of each of ``batch_size`` images.

    Args:
        seed: `None` (one seed drawn for the batch), an integer (item ``b`` gets ``(seed, b)``), or a list
            of ``batch_size`` pairs ``(seed, index)``, one per image.
        batch_size: the number of images.

    Returns:
        A tuple of ``batch_size`` pairs of Python ints.
    """
    if not is_item_keys(seed):
        seed = check_seed(seed)
        return tuple((seed, b) for b in range(batch_size))
    if len(seed) != batch_size:
        raise ValueError(f"seed gives {len(seed)} (seed, index) pairs but the batch has {batch_size} images")
    keys = []
    for key in seed:
        if not isinstance(key, (list, tuple)) or len(key) != 2:
            raise ValueError(f"a per-image seed must be a pair (seed, index), got {key!r}")
        if key[0] is None:
            raise ValueError("a per-image seed must be an integer in [0, 2**63), got None")
        keys.append((check_seed(key[0]), _check_index(key[1])))
    return tuple(keys)


def item_normal(seed, index, counter, shape):
    """Standard-normal float32 noise of one batch item, a function of ``(seed, index, counter)`` alone."""
    bits = np.random.Philox(np.random.SeedSequence([int(seed), int(index), int(counter)]))
    return np.random.Generator(bits).standard_normal(shape, dtype=np.float32)


def keys_normal(keys, counter, item_shape):
    """``[len(keys), *item_shape]``: `item_normal` of each ``(seed, index)`` key."""
    return np.stack([item_normal(seed, index, counter, item_shape) for seed, index in keys])


def keys_step_normals(keys, num_evaluations, item_shape):
    """``[num_evaluations, len(keys), *item_shape]``: the fresh noise of each evaluation of an ancestral run."""
    return np.stack([keys_normal(keys, i + 1, item_shape) for i in range(num_evaluations)])


def batch_normal(seed, indices, counter, item_shape):
    """`keys_normal` of one seed's items ``indices``."""
    return keys_normal([(seed, index) for index in indices], counter, item_shape)


def step_normals(seed, indices, num_evaluations, item_shape):
    """`keys_step_normals` of one seed's items ``indices``."""
    return keys_step_normals([(seed, index) for index in indices], num_evaluations, item_shape)
