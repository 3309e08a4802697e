import atexit
import os
import shutil
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Before the reference (diffusers, torch) is imported: kerasdiffusion loads Triton's library ahead of
# TensorFlow, as it does for its users (see kerasdiffusion/load_order.py).
import kerasdiffusion  # noqa: E402,F401

# The tests convert many tiny models: keep their conversion cache out of the user's cache directory.
_CACHE = tempfile.mkdtemp(prefix="kerasdiffusion-test-cache-")
os.environ["KERASDIFFUSION_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
