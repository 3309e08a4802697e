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

import ctypes
import os
import sys

import keras
import numpy as np

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


def tensor_from_file(tensor):
    """A backend tensor of ``tensor``, a file's tensor stored as its array (a
    `weights_conversion.readers.LazyTensor` with ``stored_as_is``), made without passing its bytes through
    NumPy; `None` where the backend cannot (on JAX, whose arrays are made from NumPy's: the caller reads it).

    On TensorFlow, where the file's copy is 64-byte aligned (our converted folders put nearly every tensor
    there): a tensor over the file's private memory map, handed over through DLPack, so nothing is read or
    copied until the weights are used, and then from the operating system's file cache, as PyTorch's loading
    of a safetensors file does. Otherwise: an uninitialised tensor (``Empty``) that the file is read into.
    Either way, a variable made from the tensor takes its buffer instead of copying it (TensorFlow copies
    that buffer before any write, so the file is never written). On the 2-core VM this was measured on,
    copying 4 GB of weights from NumPy arrays into TensorFlow's own memory took 8 s of a 14 s load, mostly in
    first touches of fresh memory, 4 KiB at a time.

    Example:

    >>> import numpy as np, os, tempfile
    >>> from weights_conversion.convert import write_safetensors
    >>> from weights_conversion.readers import read_safetensors_lazily
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> write_safetensors(path, {"w": np.arange(16, dtype="float32"), "a": np.ones(3, "float32"),
    ...                          "b": np.ones(3, "float32")})
    >>> tensors = read_safetensors_lazily(path)
    >>> [(key, tensor.offset % 64 == 0) for key, tensor in tensors.items()]  # 64 bytes, then 12 and 12
    [('w', True), ('a', True), ('b', False)]
    >>> made = [tensor_from_file(tensor) for tensor in tensors.values()]  # mapped, mapped, read
    >>> made[0] is None or [float(np.asarray(tensor).sum()) for tensor in made]  # None on JAX
    [120.0, 3.0, 3.0]
    """
    if name() != "tensorflow":
        return None
    import tensorflow as tf

    mapped = tensor.mapped()
    if mapped is not None:
        return tf.experimental.dlpack.from_dlpack(mapped.__dlpack__())
    made = tf.raw_ops.Empty(shape=tensor.shape, dtype=tensor.dtype.name, init=False)
    view = np.from_dlpack(_DLPack(made))  # read-only to NumPy, as DLPack's first version was
    if view.nbytes:
        _advise_huge_pages(view.ctypes.data, view.nbytes)
        tensor.read_into(memoryview((ctypes.c_char * view.nbytes).from_address(view.ctypes.data)))
    del view
    return made


class _DLPack:
    """A TensorFlow tensor seen through the DLPack protocol, for `numpy.from_dlpack`."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None, **kwargs):
        import tensorflow as tf

        return tf.experimental.dlpack.to_dlpack(self.tensor)

    def __dlpack_device__(self):
        return 1, 0  # kDLCPU, device 0


_MADV_HUGEPAGE = 14  # Linux
_HUGE_PAGE = 2 << 20


def _advise_huge_pages(address, size):
    """``madvise(MADV_HUGEPAGE)`` over the 2 MiB pages inside ``[address, address + size)``, on Linux, as
    NumPy does for its own large arrays (TensorFlow does not): a tenth of the page faults when the memory is
    first written. A hint the kernel may ignore; nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    start, end = -(-address // _HUGE_PAGE) * _HUGE_PAGE, (address + size) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(start, end - start, _MADV_HUGEPAGE)


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

