"""The one place that names TensorFlow or JAX: compiling a function, and what device runs it.

Everything else is written in `keras.ops`. A compiled function here has the signature of the Python
function it wraps; what differs per backend is how the networks' weights reach the program:

- TensorFlow: `tf.function(..., jit_compile=...)` captures the Keras variables by reference, so weights
  assigned later (a LoRA fused in place) are read by the same program without tracing it again.
- JAX: `jax.jit` over a stateless version of the function. The variables' current values are passed as
  the program's first argument and stand in for the variables through `keras.StatelessScope` (as
  keras-hub's generate functions do), so weights are arguments of the program rather than constants
  baked into it, and assigning new values traces nothing again.

Compiled programs are also kept on disk, so that a machine compiles a program once, not once per process
(`use_compile_cache`): XLA's persistent cache on TensorFlow, JAX's compilation cache on JAX, under
``<cache>/xla/<backend>`` (the conversion cache's directory, `kerasdiffusion.sources.cache_dir`).
``KERASDIFFUSION_NO_COMPILE_CACHE=1`` turns it off; ``KERASDIFFUSION_COMPILE_CACHE=DIR`` moves it.

Example:

>>> import keras, numpy as np
>>> layer = keras.layers.Dense(2)
>>> layer.build((None, 3))
>>> double = compile_function(lambda x: 2 * layer(x), layer.weights)
>>> tuple(double(np.ones((1, 3), "float32")).shape)
(1, 2)
"""

import os

import keras

from kerasdiffusion import sources

BACKENDS = ("tensorflow", "jax")
COMPILE_CACHE_ENV = "KERASDIFFUSION_COMPILE_CACHE"
NO_COMPILE_CACHE_ENV = "KERASDIFFUSION_NO_COMPILE_CACHE"
# JAX: programs that compile faster than this are not worth a file (Keras' eager ops each compile a tiny
# program); the text encoder, a denoising step and the decoder take seconds.
JAX_CACHE_MIN_COMPILE_SECONDS = 0.25
JAX_CACHE_MAX_BYTES = 4 << 30  # least recently used programs are evicted beyond this
_compile_cache = {}  # the process's choice, made once: {"dir": path or None}


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


def compile_cache_dir():
    """Where compiled programs are kept: ``$KERASDIFFUSION_COMPILE_CACHE``, else ``<cache>/xla/<backend>``;
    `None` when ``$KERASDIFFUSION_NO_COMPILE_CACHE`` is set."""
    if os.environ.get(NO_COMPILE_CACHE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    if os.environ.get(COMPILE_CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[COMPILE_CACHE_ENV]))
    return os.path.join(sources.cache_dir(), "xla", name())


def use_compile_cache():
    """Turns on the persistent compilation cache for this process (once; later calls return the same).

    Runs when this module is first imported. TensorFlow reads ``TF_XLA_FLAGS`` once, the first time
    anything asks for an XLA flag (building a Keras model does), so this adds the cache flags to the
    environment then: in a process that ran TensorFlow work before importing kerasdiffusion's pipeline,
    set the flags yourself (see the README). Flags the user set in ``TF_XLA_FLAGS`` win. On a
    cache hit XLA:CPU logs a spurious "machine feature +prefer-no-gather is not supported" line (an XLA
    quirk; the program runs); ``TF_CPP_MIN_LOG_LEVEL=3`` hides it.

    Returns:
        The cache directory, or `None` when the cache is off.
    """
    if "dir" in _compile_cache:
        return _compile_cache["dir"]
    directory = compile_cache_dir()
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        if name() == "tensorflow":
            flags = os.environ.get("TF_XLA_FLAGS", "")
            if "--tf_xla_persistent_cache_directory" not in flags:
                # The default device types leave XLA:CPU out.
                os.environ["TF_XLA_FLAGS"] = (f"{flags} --tf_xla_persistent_cache_directory={directory} "
                                              "--tf_xla_persistent_cache_device_types=CPU,GPU,TPU").strip()
        else:
            import jax

            jax.config.update("jax_compilation_cache_dir", directory)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", JAX_CACHE_MIN_COMPILE_SECONDS)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
            jax.config.update("jax_compilation_cache_max_size", JAX_CACHE_MAX_BYTES)
    _compile_cache["dir"] = directory
    return directory


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


# TensorFlow parses its XLA flags the first time anything asks for one, which building and filling the
# networks already does; so the cache is set up when this module is first imported, before any of that.
if keras.backend.backend() in BACKENDS:
    use_compile_cache()


def process_index_and_count():
    """``(index, count)`` of this process among the hosts of a multi-host run: JAX's process index and count
    once `jax.distributed` is initialised, else ``(0, 1)`` (TensorFlow's hosts are described by ``TF_CONFIG``)."""
    if name() == "jax":
        import jax

        return jax.process_index(), jax.process_count()
    return 0, 1

