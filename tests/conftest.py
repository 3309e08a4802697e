import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Before the reference (diffusers, torch) is imported: kerasdiffusion loads Triton's library ahead of
# TensorFlow, as it does for its users (see kerasdiffusion/load_order.py).
import kerasdiffusion  # noqa: E402,F401

# The tests convert many tiny models: keep their conversion cache out of the user's cache directory.
_CACHE = tempfile.mkdtemp(prefix="kerasdiffusion-test-cache-")
os.environ["KERASDIFFUSION_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Options under which this run's own choice and order of tests must stand: the second process then runs the
# JAX suites alone (with --lf, a handed-over test that failed is among the last failures, see `TEST`).
_KEEP_EVERY_TEST_HERE = ("lf", "failedfirst", "newfirst", "stepwise", "collectonly")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A TensorFlow run that includes `tests.second_process.TEST` starts the second process once every other
    plugin has chosen and ordered the tests (the outermost wrapper's code after ``yield`` comes last). The tests
    it hands over leave this run (reported as deselected), and `TEST` goes last: by the time it waits, everything
    else here is done. An xdist worker starts nothing: `TEST` starts a JAX-only run where it lands."""
    import keras

    from tests import second_process

    result = yield
    waiting = [item for item in items if item.nodeid == second_process.TEST]
    if not waiting or keras.backend.backend() != "tensorflow" or hasattr(config, "workerinput"):
        return result
    keep = any(config.getoption(option, False) for option in _KEEP_EVERY_TEST_HERE)
    handed_over = [] if keep else [item for item in items if second_process.handed_over(item.nodeid)]
    items[:] = [item for item in items if item not in handed_over and item not in waiting] + waiting
    if handed_over:
        config.hook.pytest_deselected(items=handed_over)
    if not config.getoption("collectonly", False):
        second_process.start([item.nodeid for item in handed_over])
    return result


def pytest_sessionfinish(session):
    from tests import second_process

    if second_process.started():
        second_process.started().stop()


@pytest.fixture(scope="session")
def tiny_shapes_folder(tmp_path_factory):
    """A tiny converted folder of random weights in the built-in model's form (tests/builtin.py)."""
    from tests.builtin import write_converted_model

    return write_converted_model(tmp_path_factory.mktemp("builtin") / "shapes")


@pytest.fixture
def builtin_shapes(tiny_shapes_folder, monkeypatch):
    """The built-in name ``kerasdiffusion/shapes`` pointing at `tiny_shapes_folder`, for the plumbing's tests
    (they pass with or without the real weights in the package)."""
    from kerasdiffusion import sources
    from tests.builtin import SHAPES

    monkeypatch.setitem(sources.BUILTIN_MODELS, SHAPES, tiny_shapes_folder)
    return SHAPES


@pytest.fixture
def shipped_shapes():
    """The real built-in model, as the package ships it; skipped where its weights are not in this checkout."""
    from kerasdiffusion import sources
    from tests.builtin import SHAPES, shipped_shapes_folder

    if not sources.is_converted_folder(shipped_shapes_folder()):
        pytest.skip("the built-in model's weights are not in kerasdiffusion/models/shapes/")
    return SHAPES
