"""Every docstring example of kerasdiffusion and weights_conversion runs, one test per module.

The examples run on the built-in model ``kerasdiffusion/shapes`` (64x64, a few steps) and print only what does
not depend on its weights' values (shapes, dtypes, names), so they pass with any weights of its sizes. Lines
that need what CI has not (a Hub download, a user's files, several GPUs) say ``# doctest: +SKIP``.

Where the package folder holds no weights yet, the docstrings that load the built-in model are left out and the
test says which (a skip, after the module's other examples passed).
"""

import doctest
import importlib
import pkgutil
import re
import traceback

import pytest

import kerasdiffusion
import weights_conversion
from kerasdiffusion import sources
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

