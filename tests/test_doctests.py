"""Every docstring example of kerasdiffusion and weights_conversion runs, one test per module.

The examples run on the built-in model ``kerasdiffusion/shapes`` (64x64, a few steps) and print only what does
not depend on its weights' values (shapes, dtypes, names), so they pass with any weights of its sizes. Lines
that need what CI has not (a Hub download, a user's files, several GPUs) say ``# doctest: +SKIP``.

Where the package folder holds no weights yet, the docstrings that load the built-in model are left out and the
test says which (a skip, after the module's other examples passed).
"""

import doctest
import importlib
import inspect
import pkgutil
import re
import traceback

import pytest

import kerasdiffusion
import weights_conversion
from kerasdiffusion import sources
from kerasdiffusion.pipeline import StableDiffusion
from tests import reference as R
from tests.builtin import SHAPES, shipped_shapes_folder

PACKAGES = (kerasdiffusion, weights_conversion)
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# Modules deliberately left out, {name: reason}. None: every module's examples run here (the tokenizer's too;
# tests/test_tokenizer.py no longer runs them).
EXCLUDED = {}
# An example that loads the built-in model's weights (not one that only names it, as `sources.is_builtin` does).
_LOADS_BUILTIN = re.compile(
    r'(from_pretrained|load_components)\("kerasdiffusion/shapes"|(source|model)="kerasdiffusion/shapes"'
    r'|BUILTIN_MODELS\["kerasdiffusion/shapes"\]')


def module_names():
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(name for name in names if name not in EXCLUDED)


class _Collecting(doctest.DocTestRunner):
    """Keeps each failing example (where, source, what was expected, what came) instead of printing it."""

    def __init__(self):
        super().__init__(optionflags=OPTIONS)
        self.failed_examples = []

    def _where(self, test, example):
        line = "?" if test.lineno is None else test.lineno + example.lineno + 1
        return f"{test.name} ({test.filename}:{line})"

    def report_failure(self, out, test, example, got):
        self.failed_examples.append(f"{self._where(test, example)}\n>>> {example.source.rstrip()}\n"
                                    f"expected:\n{example.want}got:\n{got}")

    def report_unexpected_exception(self, out, test, example, exc_info):
        self.failed_examples.append(f"{self._where(test, example)}\n>>> {example.source.rstrip()}\n"
                                    f"raised:\n{''.join(traceback.format_exception(*exc_info))}")


def _loads_builtin(test):
    return any(_LOADS_BUILTIN.search(example.source) for example in test.examples)


def _set_default(monkeypatch, function, name, value):
    """Sets the default of ``function``'s positional-or-keyword argument ``name``."""
    named = [p.name for p in inspect.signature(function).parameters.values()
             if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty]
    defaults = list(function.__defaults__)
    defaults[named.index(name)] = value
    monkeypatch.setattr(function, "__defaults__", tuple(defaults))


@pytest.fixture(autouse=True)
def compile_as_the_other_tests_do(monkeypatch):
    """The examples make pipelines with the default ``jit_compile=True``; here the default follows the other
    tests (`tests.reference.JIT`: XLA on JAX, TensorFlow's graphs without XLA on TensorFlow). The examples print
    shapes and names, the same either way, and XLA would compile each example's programs again."""
    for function in (StableDiffusion.__init__, StableDiffusion.from_pretrained.__func__,
                     StableDiffusion.from_components.__func__):
        _set_default(monkeypatch, function, "jit_compile", R.JIT)


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    have_weights = sources.is_converted_folder(shipped_shapes_folder())
    runner, left_out = _Collecting(), []
    for test in doctest.DocTestFinder().find(module, name):
        if not test.examples:
            continue
        if not have_weights and _loads_builtin(test):
            left_out.append(test.name)
            continue
        runner.run(test, out=lambda text: None)
    failed = runner.failed_examples
    assert not failed, f"{len(failed)} failing example(s) in {name}:\n\n" + "\n\n".join(failed)
    if left_out:
        pytest.skip(f"{SHAPES}: its weights are not in the package folder; not run: {', '.join(left_out)}")

