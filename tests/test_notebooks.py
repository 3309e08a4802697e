"""The Colab notebooks run top to bottom, so that they cannot rot.

Each notebook's cell tagged ``parameters`` holds its Colab values; as papermill does, a cell with test values is
inserted right after it (2 steps, float32, no XLA). The notebooks whose model is the built-in
``kerasdiffusion/shapes`` run with it, at its own size, as a user sees them (skipped until its weights are in the
package); the one that needs a file of the user's (conversion) gets a tiny random checkpoint. The test runs each
notebook in a fresh python3 kernel and checks that no cell failed and that images were shown.
"""

import ast
import os
import pathlib

import nbformat
import pytest
import safetensors.numpy

from tests import reference as R
from tests.builtin import SHAPES
from tests.ldm_fixtures import diffusers_to_ldm

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
# Each notebook, and how many images it shows.
NOTEBOOKS = {"text_to_image.ipynb": 4, "image_to_image_and_inpainting.ipynb": 5, "convert_your_checkpoint.ipynb": 1,
             "tpu_batch_generation.ipynb": 1}
FAST = dict(STEPS=2, JIT_COMPILE=False, PRECISION="float32")
TINY = dict(WIDTH=64, HEIGHT=64, **FAST)
# The notebooks whose default model is the built-in one, and their test values (its model and size kept).
BUILTIN_PARAMETERS = {
    "text_to_image.ipynb": FAST,
    "image_to_image_and_inpainting.ipynb": dict(STRENGTHS=(0.5, 1.0), **FAST),
    # Three images over two logical CPU devices: a batch that does not divide evenly.
    "tpu_batch_generation.ipynb": dict(PROMPTS=["a red circle on a blue background",
                                                "a small green square on the left, white background",
                                                "a large black triangle at the top, yellow background"],
                                       IMAGES_PER_PROMPT=1, BATCH_SIZE=3, CPU_DEVICES=2, **FAST),
}
CELL_TIMEOUT_S = 300


def read(name):
    return nbformat.read(COLAB / name, as_version=4)


def parameters_cell(notebook):
    cells = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected exactly one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def assignments(source):
    """``{name: value node}`` of a cell's top-level assignments."""
    return {target.id: node.value for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def assigned_names(source):
    return set(assignments(source))


def with_parameters(notebook, values):
    """The notebook with a cell setting ``values`` inserted after its parameters cell.

    Every name set must already be a parameter, so that a renamed parameter fails here instead of letting the
    notebook run with its full-size default (and download a model).
    """
    index = parameters_cell(notebook)
    unknown = set(values) - assigned_names(notebook.cells[index].source)
    assert not unknown, f"not parameters of the notebook: {sorted(unknown)}"
    cell = nbformat.v4.new_code_cell("\n".join(f"{name} = {value!r}" for name, value in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, cell)
    return notebook


def write_single_file_checkpoint(pipeline, path):
    """The pipeline's networks as an original (CompVis / LDM) single-file checkpoint, in float16 as most are."""
    parts = [R.state_dict_numpy(module) for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder)]
    ldm = {key: value.astype("float16") for key, value in diffusers_to_ldm(*parts).items()}
    safetensors.numpy.save_file(ldm, str(path))
    return str(path)


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory):
    """A tiny random single-file checkpoint, the user's file of the conversion notebook, and where to convert it."""
    folder = tmp_path_factory.mktemp("user_checkpoint")
    return {"checkpoint": write_single_file_checkpoint(R.make_reference_pipeline(), folder / "finetune.safetensors"),
            "converted": str(folder / "converted")}


def run_parameters(name, request):
    """The values ``name`` runs with in the tests: the built-in model's notebooks keep their model and its own size
    (skipped until its weights are in the package); the conversion notebook converts a tiny checkpoint."""
    if name in BUILTIN_PARAMETERS:
        request.getfixturevalue("shipped_shapes")
        return BUILTIN_PARAMETERS[name]
    models = request.getfixturevalue("user_checkpoint")
    return dict(CHECKPOINT=models["checkpoint"], CONVERTED=models["converted"], **TINY)


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel imports this checkout (so the install cell has nothing to do), never reaches the Hub, and
    runs on this test run's Keras backend."""
    import keras

    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + (os.pathsep + path if path else ""))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")


def images_shown(notebook):
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs if output.output_type in ("display_data", "execute_result"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_colab_notebook(name):
    notebook = read(name)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4 and notebook.metadata.kernelspec.name == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "outputs must be cleared"
    install = code[0].source
    assert "import kerasdiffusion" in install and "except ImportError" in install and "%pip install" in install
    assert code[1] is notebook.cells[parameters_cell(notebook)], "the parameters cell follows the install cell"
    assert {"WIDTH", "HEIGHT", "STEPS", "PRECISION", "JIT_COMPILE"} <= assigned_names(code[1].source)


@pytest.mark.parametrize("name", BUILTIN_PARAMETERS)
def test_notebook_defaults_to_the_builtin_model_at_its_own_size(name):
    notebook = read(name)
    values = assignments(notebook.cells[parameters_cell(notebook)].source)
    assert ast.literal_eval(values["MODEL"]) == SHAPES
    assert ast.literal_eval(values["WIDTH"]) is None and ast.literal_eval(values["HEIGHT"]) is None


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, request, kernel_env, tmp_path):
    from nbclient import NotebookClient

    notebook = with_parameters(read(name), run_parameters(name, request))
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    assert images_shown(notebook) == NOTEBOOKS[name], "the notebook did not show its images"
