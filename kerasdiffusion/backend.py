"""The one place that names TensorFlow or JAX: compiling a function, and what device runs it.

Everything else is written in `keras.ops`. A compiled function here has the signature of the Python
function it wraps; what differs per backend is how the networks' weights reach the program:

- TensorFlow: `tf.function(..., jit_compile=...)` captures the Keras variables by reference, so weights
  assigned later (a LoRA fused in place) are read by the same program without tracing it again.
- JAX: `jax.jit` over a stateless version of the function. The variables' current values are passed as
  the program's first argument and stand in for the variables through `keras.StatelessScope` (as
  keras-hub's generate functions do), so weights are arguments of the program rather than constants
  baked into it, and assigning new values traces nothing again.

Example:

>>> import keras, numpy as np
>>> layer = keras.layers.Dense(2)
>>> layer.build((None, 3))
>>> double = compile_function(lambda x: 2 * layer(x), layer.weights)
>>> double(np.ones((1, 3), "float32")).shape
(1, 2)
"""

import keras

BACKENDS = ("tensorflow", "jax")


def name():
    """The Keras backend in use; a clear error for one this package does not run on."""
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise RuntimeError(f"kerasdiffusion runs on Keras' {' and '.join(BACKENDS)} backends, not {backend!r}; "
                           "set KERAS_BACKEND before Python starts.")
    return backend


def device_type():
    """``"cpu"``, ``"gpu"`` or ``"tpu"``: the kind of Keras' first device."""
    return keras.distribution.list_devices()[0].split(":")[0].lower()


def compile_function(function, variables, jit_compile=True):
    """``function`` compiled for the current backend; ``variables`` are every Keras variable it reads.

    Args:
        function: a Python function of tensors (and nested tuples of tensors or None) in `keras.ops`.
        variables: the Keras variables the function reads (the networks' weights).
        jit_compile: compile with XLA. Without it, TensorFlow builds a graph and JAX runs op by op.
    """
    if name() == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=jit_compile)
    if not jit_compile:
        return function
    import jax

    variables = list(variables)

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args)

    compiled = jax.jit(stateless)

    def call(*args):
        return compiled([variable.value for variable in variables], *args)

    return call
