"""Every random number of a generation, drawn on the host from the seed and the item's index alone.

Item ``b`` of a batch generated with seed ``s`` gets its own counter-based generator (Philox, keyed by
``(s, b, counter)``): counter 0 gives the initial latents, counter ``i + 1`` the fresh noise of an
ancestral sampler's evaluation ``i``. Nothing depends on the batch size, the backend, the device or how
a batch is split over devices, so the same seed gives the same image everywhere, within floating-point
tolerance of the networks.

Example:

>>> a = batch_normal(seed=7, indices=range(2), counter=0, item_shape=(8, 8, 4))
>>> b = batch_normal(seed=7, indices=[1], counter=0, item_shape=(8, 8, 4))
>>> bool((a[1] == b[0]).all())
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


def item_normal(seed, index, counter, shape):
    """Standard-normal float32 noise of one batch item, a function of ``(seed, index, counter)`` alone."""
    bits = np.random.Philox(np.random.SeedSequence([seed, int(index), int(counter)]))
    return np.random.Generator(bits).standard_normal(shape, dtype=np.float32)


def batch_normal(seed, indices, counter, item_shape):
    """``[len(indices), *item_shape]``: `item_normal` of each item index."""
    return np.stack([item_normal(seed, index, counter, item_shape) for index in indices])


def step_normals(seed, indices, num_evaluations, item_shape):
    """``[num_evaluations, len(indices), *item_shape]``: the fresh noise of each evaluation of an ancestral run."""
    return np.stack([batch_normal(seed, indices, i + 1, item_shape) for i in range(num_evaluations)])
