"""The backend-neutral tests again on Keras' JAX backend, and the same seed giving the same image on both.

Keras picks its backend once per process, so the JAX runs happen in subprocesses: `pytest` alone (the
README's command) tests both backends. Run `KERAS_BACKEND=jax pytest tests/test_pipeline.py` to see one
JAX suite's own output.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import reference as R

# What runs on both backends: schedulers, networks, the pipeline, mixed precision, the command line, LoRAs and
# the other adapters, the notebooks' code paths, and one full-size network. One process runs them all, so
# that programs compiled by one suite are reused from the compile cache by the next.
JAX_SUITES = [
    "tests/test_schedulers.py",
    "tests/test_networks.py",
    "tests/test_attention.py",
    "tests/test_pipeline.py",
    "tests/test_precision.py",
    "tests/test_cli.py",
    "tests/test_adapters.py",
    "tests/test_notebooks.py::test_notebook_runs_top_to_bottom[text_to_image.ipynb]",
    "tests/test_full_size.py::test_full_unet",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
on_tensorflow = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                   reason="runs the JAX suites from a TensorFlow run (this run is already on JAX)")


def run_on(backend, args, timeout=2400):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@on_tensorflow
def test_suites_pass_on_jax():
    result = run_on("jax", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *JAX_SUITES])
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"JAX: {summary}")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


GENERATE = """
import json, sys
import numpy as np
import kerasdiffusion as kd
folder, scheduler, out = sys.argv[1:4]
sd = kd.StableDiffusion.from_pretrained(folder, img_width=64, img_height=64, precision="float32",
                                        scheduler=scheduler, progress=False)
images = sd.text_to_image(["a red circle", "a blue square"], num_steps=8, seed=1234, verbose=False)
single = sd.text_to_image("a red circle", num_steps=8, seed=1234, verbose=False)
np.save(out, np.stack([images, np.concatenate([single, images[1:]])]))
import keras
print(json.dumps({"backend": keras.backend.backend()}))
"""


@on_tensorflow
@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_ancestral"])
def test_same_seed_same_image_on_tensorflow_and_jax(tmp_path, scheduler):
    """Initial latents and ancestral noise come from the seed and the item's index alone: both backends,
    and a batch of two against its first image alone, draw the same, so the pictures agree to float rounding."""
    folder = tmp_path / "tiny"
    R.make_reference_pipeline(seed=9).save_pretrained(folder)
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    jax_run = run_on("jax", [str(script), str(folder), scheduler, str(tmp_path / "jax.npy")], timeout=600)
    assert jax_run.returncode == 0, jax_run.stderr[-3000:]
    assert json.loads(jax_run.stdout.strip().splitlines()[-1])["backend"] == "jax"
    tf_run = run_on("tensorflow", [str(script), str(folder), scheduler, str(tmp_path / "tf.npy")], timeout=600)
    assert tf_run.returncode == 0, tf_run.stderr[-3000:]
    on_jax, on_tf = np.load(tmp_path / "jax.npy").astype(int), np.load(tmp_path / "tf.npy").astype(int)
    difference = np.abs(on_jax - on_tf)
    print(f"{scheduler}: TensorFlow against JAX, same seed: mean {difference.mean():.4f}, max {difference.max()} "
          f"of 255; first of a batch of 2 against 1 image: max {np.abs(on_tf[1, 0] - on_tf[0, 0]).max()}")
    assert on_tf.std() > 20
    assert difference.mean() <= 0.05 and difference.max() <= 2
    assert np.abs(on_tf[1, 0] - on_tf[0, 0]).max() <= 1 and np.abs(on_jax[1, 0] - on_jax[0, 0]).max() <= 1
    assert np.abs(on_tf[0, 0] - on_tf[0, 1]).mean() > 1  # the two items differ
