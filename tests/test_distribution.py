"""`distribution=`: two logical CPU devices give the images of one, on TensorFlow and on JAX.

Logical devices must be set up before the backend starts, so each backend's check runs in a fresh process
(`tests/distribution_worker.py`); both start when this module's first test asks and run side by side. They
compare, item by item, a one-device run with runs over two replicas (TensorFlow's `MirroredStrategy` with the
networks copied into its scope, the steps loop at batch size 2 and the compiled loop at 1 and 3; JAX's
`DataParallel`, batch size 3) and over one (`OneDeviceStrategy`, networks loaded under its scope). 1 and 3 do
not divide between two replicas: the batch is padded and the padding dropped. TensorFlow runs without XLA
there, which cannot place programs on a second CPU device; JAX compiles with XLA.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

import kerasdiffusion as kd
from tests import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """The two workers' processes, started together over one tiny model: ``{backend: Popen}``."""
    folder = tmp_path_factory.mktemp("tiny") / "diffusers"
    R.make_reference_pipeline().save_pretrained(folder)
    processes = {}
    for backend in ("tensorflow", "jax"):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
        processes[backend] = subprocess.Popen([sys.executable, "-m", "tests.distribution_worker", str(folder)],
                                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True)
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def report(workers, backend):
    stdout, stderr = workers[backend].communicate(timeout=TIMEOUT)
    assert workers[backend].returncode == 0, stdout[-3000:] + stderr[-5000:]
    return json.loads(stdout.strip().splitlines()[-1])


def assert_same_images(differences):
    print(differences)
    assert set(differences) and max(differences.values()) <= 1, differences


def test_mirrored_strategy_over_two_devices_gives_the_images_of_one(workers):
    result = report(workers, "tensorflow")
    assert result["devices"] == ["cpu:0", "cpu:1"]
    assert set(result["mirrored"]) == {"steps/2", "compiled/1", "compiled/3"}
    assert_same_images(result["mirrored"])
    assert result["mirrored_placement"].startswith("MirroredVariable")
    assert "cannot run a tf.distribute strategy's replicas on several CPU devices" in result["xla_on_two_cpus"]
    assert_same_images(result["one_device"])
    assert result["one_device_placement"].endswith("CPU:1")


def test_data_parallel_over_two_devices_gives_the_images_of_one(workers):
    result = report(workers, "jax")
    assert result["devices"] == ["cpu:0", "cpu:1"]
    assert set(result["data_parallel"]) == {"compiled/3"}
    assert_same_images(result["data_parallel"])
    assert result["data_parallel_placement"] == "2 devices, replicated=True"


def test_a_wrong_kind_of_distribution_is_a_type_error_naming_what_is_accepted():
    import tensorflow as tf

    backend = keras.backend.backend()
    accepted, other_backends = {
        "tensorflow": ("tf.distribute.Strategy", keras.distribution.DataParallel()),
        "jax": ("keras.distribution.DataParallel", tf.distribute.OneDeviceStrategy("/cpu:0")),
    }[backend]
    for wrong in (object(), other_backends):
        with pytest.raises(TypeError, match=f"distribution= on Keras' {backend} backend takes a {accepted}"):
            kd.StableDiffusion(distribution=wrong)
    with pytest.raises(TypeError, match="got builtins.str"):
        kd.StableDiffusion(distribution="mirrored")
