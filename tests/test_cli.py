"""The command line on a tiny random model: PNGs with their parameters, convert, and one-line errors.

Only two commands run in a child process (each pays for importing TensorFlow); the rest call `main()` here,
with stdout and stderr captured at the file-descriptor level.
"""

import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kerasdiffusion import SCHEDULER_NAMES, images, sources
from kerasdiffusion.cli import main, output_paths
from tests import reference as R

PROMPT = "a red cube, on a table"
NEGATIVE = "blurry, low quality"
TINY = ["--steps", "2", "--width", "64", "--height", "64", "--precision", "float32", "--no-xla", "--quiet"]
SETTINGS = [*TINY, "--negative-prompt", NEGATIVE, "--scheduler", "euler_ancestral"]
# What TensorFlow's C++ side prints by itself while it starts (it cannot be turned off from Python).
TF_STARTUP_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} |To enable the following)")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-model") / "tiny-sd"
    R.make_reference_pipeline(seed=9).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "kd-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "kd-cache"


def run_child(args):
    return subprocess.run([sys.executable, "-m", "kerasdiffusion", *[str(a) for a in args]], capture_output=True,
                          text=True, env=dict(os.environ), timeout=300, check=False)


def run_here(args):
    try:
        return main([str(a) for a in args])
    except SystemExit as exit:  # argparse exits by itself on malformed arguments
        return exit.code


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not TF_STARTUP_LOG.match(line)]


def read_png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


@pytest.fixture(scope="module")
def batch(model, tmp_path_factory):
    """``python -m kerasdiffusion generate`` of two images, in a child process as a user runs it."""
    folder = tmp_path_factory.mktemp("batch")
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{sources.CACHE_ENV: str(folder / "kd-cache")})
    result = subprocess.run(
        [sys.executable, "-m", "kerasdiffusion", "generate", PROMPT, "--model", str(model),
         "--out", str(folder / "out.png"), *SETTINGS, "--batch-size", "2", "--seed", "1"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    return folder


def test_generate_writes_a_batch_of_pngs_with_their_parameters(batch, model):
    assert sorted(os.listdir(batch)) == ["kd-cache", "out-0.png", "out-1.png"]  # no temporary files left
    pixels = []
    for index in range(2):
        array, text = read_png(batch / f"out-{index}.png")
        assert array.shape == (64, 64, 3)
        pixels.append(array)
        assert text == {
            "parameters": f"{PROMPT}\nNegative prompt: {NEGATIVE}\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, "
                          f"Seed: 1, Size: 64x64, Model: tiny-sd, Batch size: 2, Batch pos: {index}",
            "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": "2", "guidance": "7.5", "seed": "1",
            "scheduler": "euler_ancestral", "model": str(model), "width": "64", "height": "64",
            "batch_size": "2", "batch_index": str(index),
        }
    assert np.abs(pixels[0].astype(int) - pixels[1].astype(int)).mean() > 1


def assert_same_image(ours, expected):
    """Equal up to the one-level rounding differences a batch of 1 may have with item 0 of a batch of 2."""
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1


def test_convert_then_generate_from_the_converted_folder(batch, model, tmp_path, capfd):
    converted = tmp_path / "converted"
    assert run_here(["convert", model, converted]) == 0
    assert (converted / "kerasdiffusion.json").is_file()
    bars = capfd.readouterr().err  # without --quiet: a bar per file read, then one for writing, each to 100%
    for part in ("reading diffusion_pytorch_model.safetensors", "reading model.safetensors", "writing"):
        assert re.search(re.escape(part) + r": *100%", bars), bars
    out = tmp_path / "from-converted.png"
    assert run_here(["generate", PROMPT, "--model", converted, "--out", out, *SETTINGS, "--seed", "1"]) == 0
    pixels, text = read_png(out)
    assert_same_image(pixels, read_png(batch / "out-0.png")[0])
    assert text["model"] == str(converted) and "Model: converted" in text["parameters"]
    assert error_lines(capfd.readouterr().err) == []


def test_a_random_seed_is_recorded_and_used(batch, model, tmp_path, monkeypatch, private_cache):
    monkeypatch.setattr(random.SystemRandom, "randrange", lambda self, stop: 1)
    out = tmp_path / "random.png"
    assert run_here(["generate", PROMPT, "--model", model, "--out", out, *SETTINGS, "--no-cache"]) == 0
    pixels, text = read_png(out)
    assert text["seed"] == "1" and "Seed: 1," in text["parameters"]
    assert_same_image(pixels, read_png(batch / "out-0.png")[0])
    assert not private_cache.exists()  # --no-cache: nothing written


def test_bad_checkpoint_in_a_real_process_is_one_error_line(tmp_path, private_cache):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    result = run_child(["generate", PROMPT, "--model", bad, "--out", tmp_path / "out.png", *TINY])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: ") and "broken.safetensors" in line
    assert not (tmp_path / "out.png").exists()
    assert not (private_cache / "converted").exists() or os.listdir(private_cache / "converted") == []


@pytest.mark.parametrize("case", [
    "unknown scheduler", "size not a multiple of 8", "zero steps", "zero batch", "negative seed", "missing model",
    "unsupported file", "folder of nothing", "truncated checkpoint", "output folder missing", "output not writable",
    "output not png", "malformed number", "revision of a local model",
])
def test_bad_input_is_one_error_line_and_no_file(case, model, tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "truncated.safetensors").write_bytes(b"\x00\x01\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "out" / "image.png"
    out.parent.mkdir()
    args = {
        "unknown scheduler": ["--scheduler", "k_euler"],
        "size not a multiple of 8": ["--width", "60"],
        "zero steps": ["--steps", "0"],
        "zero batch": ["--batch-size", "0"],
        "negative seed": ["--seed", "-5"],
        "missing model": ["--model", tmp_path / "nowhere" / "model.safetensors"],
        "unsupported file": ["--model", tmp_path / "notes.txt"],
        "folder of nothing": ["--model", tmp_path / "empty"],
        "truncated checkpoint": ["--model", tmp_path / "truncated.safetensors"],
        "output folder missing": ["--out", tmp_path / "missing" / "image.png"],
        "output not writable": ["--out", tmp_path / "a-file" / "image.png"],
        "output not png": ["--out", tmp_path / "out" / "image.jpg"],
        "malformed number": ["--guidance", "lots"],
        "revision of a local model": ["--revision", "v2"],
    }[case]
    status = run_here(["generate", PROMPT, "--model", model, "--out", out, *TINY, *args])
    captured = capfd.readouterr()
    assert status != 0
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert os.listdir(out.parent) == []


def test_unknown_hub_model_offline_is_one_error_line(tmp_path, monkeypatch, capfd):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "out.png"
    assert run_here(["generate", PROMPT, "--model", "tiny-org/not-downloaded", "--out", out, *TINY]) != 0
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Could not get 'tiny-org/not-downloaded'")
    assert "pass a local path" in lines[0] and not out.exists()


def test_convert_quietly_prints_nothing(model, tmp_path, capfd):
    assert run_here(["convert", model, tmp_path / "converted", "--quiet"]) == 0
    captured = capfd.readouterr()
    assert captured.out == "" and error_lines(captured.err) == []


def test_convert_refuses_a_non_empty_output(model, tmp_path, capfd):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    assert run_here(["convert", model, tmp_path / "taken"]) != 0
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not empty" in lines[0]


def test_help_explains_with_examples(capsys):
    assert run_here(["--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "kerasdiffusion generate" in text and "kerasdiffusion convert" in text
    assert run_here(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--model", "--negative-prompt", "--steps", "--guidance", "--seed", "--batch-size",
                   "--scheduler", "--precision", "--no-xla", "DPM++ 2M Karras", "Euler a"):
        assert option in text


def test_parameters_text_follows_automatic1111():
    assert set(images.A1111_SAMPLERS) == set(SCHEDULER_NAMES)
    text = images.a1111_parameters("a fox, at night", "", 20, 7.0, 5, "dpmpp_2m_karras", "my,model: v2", 512, 768)
    assert text == 'a fox, at night\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x768, ' \
                   'Model: "my,model: v2"'
    assert output_paths("x/out.png", 1) == ["x/out.png"]
    assert output_paths("x/out.png", 2) == ["x/out-0.png", "x/out-1.png"]
