"""The persistent compile cache: a second process reads what the first compiled; off means no files.

Each case is a fresh process (XLA's flags are read once per process), on TensorFlow and on JAX.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program that takes XLA a noticeable time to compile: JAX caches only programs slower than 0.25 s, and on an
# idle 2-core Xeon with AMX, 500 layers compiled faster than that (nothing cached, no hit); 1,500 took 3 s.
PROGRAM = """
import json, time
import numpy as np
import keras
from keras import ops
from kerasdiffusion import backend

def many_layers(x):
    for _ in range(1500):
        x = ops.sin(layer(x)) + x
    return x

hits = []
if keras.backend.backend() == "jax":  # JAX skips writing a program it already has: count its cache hits
    import jax
    jax.monitoring.register_event_listener(lambda event, **_: hits.append(event) if "cache_hits" in event else None)
layer = keras.layers.Dense(64)
layer.build((None, 64))
compiled = backend.compile_function(many_layers, layer.weights)
start = time.perf_counter()
out = np.asarray(compiled(np.ones((8, 64), "float32")))
print(json.dumps({"seconds": time.perf_counter() - start, "dir": backend.use_compile_cache(),
                  "finite": bool(np.isfinite(out).all()), "jax_hits": len(hits)}))
"""


def run(backend, tmp_path, **env):
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    # Not TF_XLA_FLAGS either: importing the pipeline in this process (other test modules do) put this
    # session's cache directory there, and a child that inherits it would write its programs there.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("KERASDIFFUSION_") and k != "TF_XLA_FLAGS"}
    env = dict(inherited, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT,
               KERASDIFFUSION_CACHE=str(tmp_path / "cache"), **env)
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def files_under(path):
    """``{path: modification time}``: a program compiled again would be written again."""
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, names in os.walk(path)
            for f in names}


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_second_process_reads_the_first_ones_programs(backend, tmp_path):
    first = run(backend, tmp_path)
    assert first["dir"] == str(tmp_path / "cache" / "xla" / backend) and first["finite"]
    written = files_under(first["dir"])
    assert written, "the first process wrote no compiled program"
    second = run(backend, tmp_path)
    print(f"{backend}: first call {first['seconds']:.2f} s with an empty cache, {second['seconds']:.2f} s "
          f"from the cache ({len(written)} files)")
    if backend == "tensorflow":
        assert files_under(first["dir"]) == written  # read, not compiled and written again
    else:  # JAX keeps access times for its eviction beside the programs; it reports hits instead
        assert first["jax_hits"] == 0 and second["jax_hits"] >= 1
        assert any("jit_stateless" in name for name in written)  # the compiled function itself


def test_turned_off_writes_nothing(tmp_path):
    off = run("tensorflow", tmp_path, KERASDIFFUSION_NO_COMPILE_CACHE="1")
    assert off["dir"] is None
    assert not files_under(tmp_path / "cache")
