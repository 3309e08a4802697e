"""The wheel the notebooks' install cell (and any `pip install`) gets: every module, the CLIP vocabulary, the
built-in model's folder, and the console script, working from the installed files rather than from this checkout."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from kerasdiffusion.tokenizer import CLIPTokenizer
from tests.builtin import SHAPES, write_converted_model
from weights_conversion.convert import is_converted_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("kerasdiffusion", "weights_conversion")
BUILTIN = os.path.join("kerasdiffusion", "models", "shapes")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the tracked sources (the build leaves its by-products in the copy)."""
    source = tmp_path_factory.mktemp("source")
    for name in (*PACKAGES, "setup.py", "README.md"):
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source / name)
    if not is_converted_folder(source / BUILTIN):  # a checkout without the built-in model's weights: a stand-in
        shutil.rmtree(source / BUILTIN, ignore_errors=True)
        write_converted_model(source / BUILTIN)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("kerasdiffusion-*.whl")
    return path, source


def test_wheel_holds_every_module_and_the_vocabulary(wheel):
    wheel, source = wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        modules = {f"{package}/{f}" for f in os.listdir(os.path.join(REPO, package)) if f.endswith(".py")}
        assert modules <= names, sorted(modules - names)
    assert {"kerasdiffusion/data/bpe_simple_vocab_16e6.txt.gz", "kerasdiffusion/data/LICENSE-CLIP-VOCAB.txt"} <= names
    builtin = {os.path.relpath(os.path.join(root, name), source).replace(os.sep, "/")
               for root, _, files in os.walk(source / BUILTIN) for name in files}
    assert {f"kerasdiffusion/models/shapes/{name}" for name in ("kerasdiffusion.json", "unet.safetensors")} <= builtin
    assert builtin <= names, sorted(builtin - names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "kerasdiffusion = kerasdiffusion.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_files_work_without_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel[0]).extractall(site)
    prompt = "a photograph of an astronaut riding a horse"
    script = (
        "import json, kerasdiffusion, weights_conversion\n"
        "from kerasdiffusion import sources\n"
        "from kerasdiffusion.tokenizer import CLIPTokenizer\n"
        f"builtin = sources.resolve({SHAPES!r}, lazy=True)\n"
        "print(json.dumps([kerasdiffusion.__file__, weights_conversion.__file__, "
        f"CLIPTokenizer().encode({prompt!r}), sources.builtin_folder({SHAPES!r}), builtin.image_size]))\n"
    )
    # Run from an empty folder with the extracted wheel first on the path, so nothing comes from this checkout.
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")  # the built-in model needs no network
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    kd_file, wc_file, ids, builtin_folder, image_size = json.loads(result.stdout.strip().splitlines()[-1])
    assert kd_file.startswith(str(site)) and wc_file.startswith(str(site)) and builtin_folder.startswith(str(site))
    assert image_size == 64
    assert ids == CLIPTokenizer().encode(prompt)
    help_text = subprocess.run([sys.executable, "-m", "kerasdiffusion", "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120, check=True).stdout
    assert "kerasdiffusion generate" in help_text
