"""The wheel the notebooks' install cell (and any `pip install`) gets: every module, the CLIP vocabulary, and
the console script, working from the installed files rather than from this checkout."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from kerasdiffusion.tokenizer import CLIPTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("kerasdiffusion", "weights_conversion")


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
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("kerasdiffusion-*.whl")
    return path


def test_wheel_holds_every_module_and_the_vocabulary(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        modules = {f"{package}/{f}" for f in os.listdir(os.path.join(REPO, package)) if f.endswith(".py")}
        assert modules <= names, sorted(modules - names)
    assert {"kerasdiffusion/data/bpe_simple_vocab_16e6.txt.gz", "kerasdiffusion/data/LICENSE-CLIP-VOCAB.txt"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "kerasdiffusion = kerasdiffusion.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_files_work_without_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    prompt = "a photograph of an astronaut riding a horse"
    script = (
        "import json, kerasdiffusion, weights_conversion\n"
        "from kerasdiffusion.tokenizer import CLIPTokenizer\n"
        "print(json.dumps([kerasdiffusion.__file__, weights_conversion.__file__, "
        f"CLIPTokenizer().encode({prompt!r})]))\n"
    )
    # Run from an empty folder with the extracted wheel first on the path, so nothing comes from this checkout.
    env = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    kd_file, wc_file, ids = json.loads(result.stdout.strip().splitlines()[-1])
    assert kd_file.startswith(str(site)) and wc_file.startswith(str(site))
    assert ids == CLIPTokenizer().encode(prompt)
    help_text = subprocess.run([sys.executable, "-m", "kerasdiffusion", "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120, check=True).stdout
    assert "kerasdiffusion generate" in help_text
