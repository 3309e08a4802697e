"""Strict, name-based assignment of converted weights to our Keras models.

Converted weights are a flat ``{variable path: numpy array}`` mapping (``down0_res0_conv1/kernel``), the
format `weights_conversion` produces and our converted folders store. Assignment goes by name, never by
position: every model variable must receive exactly one array of its own shape.

Example:

>>> import numpy as np, keras
>>> inputs = keras.Input((3,))
>>> model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(inputs))
>>> sorted(variable.path for variable in model.weights)
['fc/bias', 'fc/kernel']
>>> assign_weights(model, {"fc/kernel": np.ones((3, 2)), "fc/bias": np.zeros(2)}, "example")
>>> assign_weights(model, {"fc/kernel": np.ones((2, 2))}, "example")
Traceback (most recent call last):
...
weights_conversion.errors.CheckpointError: example weights do not fit the model: missing tensors: fc/bias;
mis-shaped tensors: fc/kernel (checkpoint (2, 2), model (3, 2))
"""

import numpy as np

from weights_conversion.errors import CheckpointError


def _describe(names, limit=20):
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_weights(model, weights, network):
    """Raises `CheckpointError` naming every missing, unexpected and mis-shaped tensor."""
    expected = {v.path: tuple(v.shape) for v in model.weights}
    problems = []
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    mis_shaped = [
        f"{name} (checkpoint {tuple(weights[name].shape)}, model {shape})"
        for name, shape in expected.items()
        if name in weights and tuple(weights[name].shape) != shape
    ]
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {_describe(mis_shaped)}")
    if problems:
        raise CheckpointError(f"{network} weights do not fit the model: " + "; ".join(problems))


def assign_weights(model, weights, network):
    """Assigns ``weights`` to ``model``'s variables by path, casting to each variable's dtype.

    Raises:
        CheckpointError: if any tensor is missing, unexpected or mis-shaped (nothing is assigned then).
    """
    check_weights(model, weights, network)
    for variable in model.weights:
        variable.assign(np.asarray(weights[variable.path]).astype(variable.dtype, copy=False))


def check_all(checks):
    """Checks every ``(model, weights, network)``; one `CheckpointError` lists every network's problems."""
    problems = []
    for model, weights, network in checks:
        try:
            check_weights(model, weights, network)
        except CheckpointError as error:
            problems.append(str(error))
    if problems:
        raise CheckpointError("\n".join(problems))


def assign_all(assignments):
    """Checks every ``(model, weights, network)`` first (`check_all`), then assigns."""
    check_all(assignments)
    for model, weights, network in assignments:
        assign_weights(model, weights, network)
