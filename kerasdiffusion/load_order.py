"""Native libraries that must be loaded before TensorFlow: Triton's.

TensorFlow 2.20 and 2.21 wheels load their core library with ``RTLD_GLOBAL`` (they ship
``tensorflow/python/pywrap_dlopen_global_flags.py``), which puts TensorFlow's statically linked LLVM in
the process's global symbol table. Triton >= 3.7 carries its own LLVM: loaded after TensorFlow, its
library binds to TensorFlow's copy and its initialisers crash the process (tensorflow/tensorflow issue
124205). PyTorch imports Triton lazily (``torch.compile``, diffusers through ``torch._dynamo``), so in a
notebook that has all three, ``import kerasdiffusion`` followed by ``import diffusers`` would end the kernel
without a message.

Loaded first, Triton's library resolves its own symbols and TensorFlow's later global ones do not
matter. So `prepare()`, called by ``kerasdiffusion/__init__.py`` before anything imports Keras or
TensorFlow, loads ``triton/_C/libtriton.so`` (about 20 ms) when three things hold: Triton is installed,
the installed TensorFlow loads itself with ``RTLD_GLOBAL``, and TensorFlow is not loaded yet. Where
TensorFlow was imported before kerasdiffusion and Triton was not, it is too late for that: `prepare()`
then makes a later ``import triton`` raise an ImportError that says what to do, instead of crashing.

Example:

>>> from kerasdiffusion import load_order
>>> load_order.prepare() in ("nothing to do", "preloaded", "guarded")
True
"""

import ctypes
import glob
import importlib.abc
import importlib.util
import os
import sys

TENSORFLOW_GLOBAL_FLAGS = "tensorflow.python.pywrap_dlopen_global_flags"

TOO_LATE = (
    "Triton cannot be loaded in this process: TensorFlow (which loads its LLVM with RTLD_GLOBAL, "
    "tensorflow/tensorflow issue 124205) was imported before it, and loading Triton now would crash the "
    "Python process. Import kerasdiffusion (or triton) before tensorflow, e.g. put `import kerasdiffusion` "
    "at the top of the script or the notebook's first cell, and restart it."
)


def _package_dir(name):
    """A top-level package's folder, found without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def tensorflow_loads_globally():
    """Whether the installed TensorFlow loads its core library with RTLD_GLOBAL."""
    if TENSORFLOW_GLOBAL_FLAGS in sys.modules:
        return True
    folder = _package_dir("tensorflow")
    return folder is not None and os.path.exists(os.path.join(folder, "python", "pywrap_dlopen_global_flags.py"))


def triton_library():
    """The path of Triton's native library, or None when Triton is not installed."""
    folder = _package_dir("triton")
    if folder is None:
        return None
    found = sorted(glob.glob(os.path.join(folder, "_C", "libtriton*.so")))
    return found[0] if found else None


def _triton_loaded():
    if "triton._C.libtriton" in sys.modules:
        return True
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libtriton" in line for line in maps)
    except OSError:
        return False


class _RefuseTriton(importlib.abc.MetaPathFinder):
    """Turns ``import triton`` after a global TensorFlow into an ImportError that says what to do."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(TOO_LATE, name=name)
        return None


def prepare():
    """Loads Triton's library before TensorFlow where both are installed; returns what it did.

    Returns:
        ``"nothing to do"``, ``"preloaded"`` or ``"guarded"`` (TensorFlow came first: ``import triton`` now
        raises an ImportError naming the fix).
    """
    if not sys.platform.startswith("linux"):
        return "nothing to do"
    library = triton_library()
    if library is None or not tensorflow_loads_globally() or _triton_loaded():
        return "nothing to do"
    if "tensorflow" in sys.modules:
        if not any(isinstance(finder, _RefuseTriton) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RefuseTriton())
        return "guarded"
    ctypes.CDLL(library, mode=os.RTLD_LOCAL)
    return "preloaded"
