"""Triton and TensorFlow in one process: the import orders that crash without kerasdiffusion's load order.

Each case runs in its own interpreter, so a crash is a failed test (exit -11), not a dead test run.
"""

import subprocess
import sys

import pytest

from kerasdiffusion import load_order

needs_both = pytest.mark.skipif(
    load_order.triton_library() is None or not load_order.tensorflow_loads_globally(),
    reason="the crash needs Triton and a TensorFlow that loads itself with RTLD_GLOBAL installed together",
)


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin", "HOME": "/tmp"})


@needs_both
def test_kerasdiffusion_then_tensorflow_then_triton():
    result = run("import kerasdiffusion, tensorflow, triton; print('alive')")
    assert result.returncode == 0 and "alive" in result.stdout, (result.returncode, result.stderr[-2000:])


@needs_both
def test_pipeline_then_diffusers_and_torch_compile():
    code = (
        "import kerasdiffusion as kd\n"
        "kd.StableDiffusion  # imports Keras and TensorFlow\n"
        "import diffusers, torch\n"
        "import torch._dynamo, triton\n"
        "print('alive', torch.__version__, triton.__version__)\n"
    )
    result = run(code)
    assert result.returncode == 0 and "alive" in result.stdout, (result.returncode, result.stderr[-2000:])


@needs_both
def test_tensorflow_first_gets_a_clear_error_instead_of_a_crash():
    code = (
        "import tensorflow, kerasdiffusion\n"
        "try:\n"
        "    import triton\n"
        "except ImportError as error:\n"
        "    print('refused:', error)\n"
    )
    result = run(code)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "refused:" in result.stdout and "before tensorflow" in result.stdout


def test_prepare_is_idempotent():
    first = load_order.prepare()
    assert load_order.prepare() in ("nothing to do", first)
