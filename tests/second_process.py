"""Suites run in a second process, beside the main one: on a small machine each process keeps about one core
busy, so a whole run takes about half the time it would in one process.

Keras picks its backend once per process, so the backend-neutral suites run again on JAX in a process of their
own. A whole TensorFlow run (one that includes `TEST`) also hands some of its own suites to the second process,
to run there after the JAX ones: suites that stand alone, among them those that hold the most memory while they
run (the full-size networks' memory goes back to the system with the process that held it).
`tests/conftest.py` starts the second process as soon as the run's tests are collected; `TEST`, last in the
main run, waits for it and fails with its report.
"""

import os
import signal
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST = "tests/test_backends.py::test_the_second_processs_suites_pass"
# What runs on both backends: schedulers, networks, the pipeline, mixed precision, the command line, LoRAs and
# the other adapters, the notebooks' code paths, one full-size network, and how a batch job is shared between
# workers. One process runs them all, so that programs compiled by one suite are reused from the compile cache
# by the next.
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
    "tests/test_batch.py::test_tasks_are_grouped_by_program_and_shared_between_workers_once",  # input_share
]
# Left out of the JAX run, each a program or more of JAX compiling for what the rest already shows there:
# - command-line tests of what does not depend on the backend once the pipeline is tested on it (reading a
#   PNG's parameters back, the built-in model's default size);
# - the whole pipeline against diffusers with more schedulers than two: tests/test_schedulers.py compares every
#   scheduler's loop with diffusers on JAX, and the pipeline's plumbing is the same for all of them;
# - the compiled loop against the steps loop for dpmpp_2m, whose history pndm's outgrows.
JAX_LEFT_OUT = [
    "tests/test_cli.py::test_from_png_makes_the_same_image_again",
    "tests/test_cli.py::test_from_png_reads_automatic1111_parameters",
    "tests/test_cli.py::test_builtin_model_generates_at_its_own_size_and_names_itself",
    *(f"tests/test_pipeline.py::test_generate_image_matches_diffusers[{name}]"
      for name in ("pndm", "lms", "euler", "euler_ancestral", "dpmpp_2m_karras")),
    *(f"tests/test_pipeline.py::test_sd2_v_prediction_pipeline_matches_diffusers[{name}]"
      for name in ("euler", "dpmpp_2m")),
    *(f"tests/test_pipeline.py::test_image_to_image_matches_diffusers[{name}]" for name in ("euler", "dpmpp_2m")),
    "tests/test_pipeline.py::test_compiled_loop_gives_the_images_of_the_steps_loop[dpmpp_2m-True]",
]
# The TensorFlow suites a whole run hands over: about a third of its time, which balances the two processes
# (the JAX suites take the other process about as long as the rest of the run takes this one).
TENSORFLOW_SUITES = [
    "tests/test_distribution.py",
    "tests/test_batch.py",
    "tests/test_full_size.py",
    "tests/test_doctests.py",
    "tests/test_notebooks.py",
    "tests/test_shapes_model.py",
]


def environment(backend):
    return dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)


def handed_over(nodeid):
    """Whether a whole TensorFlow run gives the test ``nodeid`` to the second process."""
    return nodeid.split("::")[0] in TENSORFLOW_SUITES


class Run:
    """`pytest` over the JAX suites, then over the TensorFlow tests handed over, one after the other in a
    thread; their output goes to a temporary file."""

    def __init__(self, tensorflow_tests=()):
        self._output = tempfile.TemporaryFile(mode="w+")
        jax = JAX_SUITES + [f"--deselect={test}" for test in JAX_LEFT_OUT]
        self._runs = [("jax", jax)] + ([("tensorflow", list(tensorflow_tests))] if tensorflow_tests else [])
        self.backends = [backend for backend, _ in self._runs]
        self._process = None
        self._stopped = False
        self._lock = threading.Lock()  # between starting a process and stopping the runs
        self.returncodes = {}
        self._thread = threading.Thread(target=self._run_all, daemon=True)
        self._thread.start()

    def _run_all(self):
        for backend, tests in self._runs:
            with self._lock:
                if self._stopped:
                    return
                self._output.write(f"==== {backend}: pytest {' '.join(tests)}\n")
                self._output.flush()
                command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--durations=20"]
                self._process = subprocess.Popen(command + tests, cwd=ROOT, env=environment(backend),
                                                 stdout=self._output, stderr=subprocess.STDOUT, text=True,
                                                 start_new_session=True)
            self.returncodes[backend] = self._process.wait()

    def wait(self, timeout):
        """``({backend: exit status}, output)`` once every run has finished (stopped after ``timeout`` s)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
        self._output.seek(0)
        return dict(self.returncodes), self._output.read()

    def stop(self):
        """Ends the runs, where they are still going (the session ended before `TEST`)."""
        with self._lock:
            self._stopped = True
            if self._process is not None and self._process.poll() is None:
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended since
                    pass
        self._thread.join()


_started = []


def start(tensorflow_tests=()):
    """Starts the second process; `started` gives it back."""
    _started.append(Run(tensorflow_tests))
    return _started[-1]


def started():
    """The run `start` began in this process, or None."""
    return _started[-1] if _started else None
