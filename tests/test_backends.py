"""The second process's suites (the backend-neutral ones again on Keras' JAX backend, and those a whole run hands
over), and the same seed giving the same image on both backends.

Keras picks its backend once per process, so the JAX runs happen in subprocesses: `pytest` alone (the
README's command) tests both backends (`tests/second_process.py`). Run `KERAS_BACKEND=jax pytest
tests/test_pipeline.py` to see one JAX suite's own output.
"""

import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import reference as R
from tests import second_process

on_tensorflow = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                   reason="runs the JAX suites from a TensorFlow run (this run is already on JAX)")


@on_tensorflow
def test_the_second_processs_suites_pass(request):
    """The second process that `tests/conftest.py` started with the run: the JAX suites, then the TensorFlow
    tests this run handed over, each run ending in pytest's summary line. A handed-over test that fails is
    recorded among this run's last failures, so that ``--lf`` runs it again."""
    run = second_process.started() or second_process.start()
    returncodes, output = run.wait(timeout=3000)
    print(output)  # with -s: each run's slowest tests and its summary
    failed = re.findall(r"^(?:FAILED|ERROR) (tests/.+?)(?: - .*)?$", output, re.M)
    last_failed = request.config.pluginmanager.get_plugin("lfplugin")
    if last_failed is not None:
        last_failed.lastfailed.update(dict.fromkeys(failed, True))
    segments = re.findall(r"^==== (\w+): .*?\n(.*?)(?=^==== |\Z)", output, re.M | re.S)
    summaries = {backend: re.findall(r"^=*\s*(\d+ \w+.* in [\d.]+s.*?)\s*=*$", segment, re.M)[-1:]
                 for backend, segment in segments}
    assert set(returncodes) == set(summaries) == set(run.backends), ("not every run finished", output[-11000:])
    assert all(code == 0 for code in returncodes.values()), output[-11000:]
    for backend, summary in summaries.items():
        assert summary and " passed" in summary[0], (backend, output[-11000:])
        assert "skipped" not in summary[0] and "failed" not in summary[0], (backend, summary)


# An ancestral scheduler draws both kinds of noise: the initial latents and fresh noise at every step.
SCHEDULERS = ["euler_ancestral"]
GENERATE = """
import json, sys
import numpy as np
import kerasdiffusion as kd
folder, out, *schedulers = sys.argv[1:]
sd = kd.StableDiffusion.from_pretrained(folder, img_width=64, img_height=64, precision="float32", progress=False)
runs = []
for scheduler in schedulers:
    sd.scheduler = scheduler
    images = sd.text_to_image(["a red circle", "a blue square"], num_steps=8, seed=1234, verbose=False)
    single = sd.text_to_image("a red circle", num_steps=8, seed=1234, verbose=False)
    runs.append(np.stack([images, np.concatenate([single, images[1:]])]))
np.save(out, np.stack(runs))
import keras
print(json.dumps({"backend": keras.backend.backend()}))
"""


@on_tensorflow
def test_same_seed_same_image_on_tensorflow_and_jax(tmp_path):
    """Initial latents and ancestral noise come from the seed and the item's index alone: both backends,
    and a batch of two against its first image alone, draw the same, so the pictures agree to float rounding.
    One process per backend generates with each scheduler of `SCHEDULERS` in turn."""
    folder = tmp_path / "tiny"
    R.make_reference_pipeline(seed=9).save_pretrained(folder)
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    processes = {}  # one per backend, side by side
    for backend in ("jax", "tensorflow"):
        command = [sys.executable, str(script), str(folder), str(tmp_path / f"{backend}.npy"), *SCHEDULERS]
        processes[backend] = subprocess.Popen(command, cwd=second_process.ROOT,
                                              env=second_process.environment(backend), stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
    runs = {}
    try:
        for backend, process in processes.items():
            stdout, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-3000:]
            assert json.loads(stdout.strip().splitlines()[-1])["backend"] == backend
            runs[backend] = np.load(tmp_path / f"{backend}.npy").astype(int)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    for scheduler, on_jax, on_tf in zip(SCHEDULERS, runs["jax"], runs["tensorflow"]):
        difference = np.abs(on_jax - on_tf)
        print(f"{scheduler}: TensorFlow against JAX, same seed: mean {difference.mean():.4f}, max "
              f"{difference.max()} of 255; first of a batch of 2 against 1 image: max "
              f"{np.abs(on_tf[1, 0] - on_tf[0, 0]).max()}")
        assert on_tf.std() > 20, scheduler
        assert difference.mean() <= 0.05 and difference.max() <= 2, scheduler
        assert np.abs(on_tf[1, 0] - on_tf[0, 0]).max() <= 1 and np.abs(on_jax[1, 0] - on_jax[0, 0]).max() <= 1
        assert np.abs(on_tf[0, 0] - on_tf[0, 1]).mean() > 1, scheduler  # the two items differ
