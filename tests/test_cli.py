"""The command line on a tiny random model: PNGs with their parameters, convert, and one-line errors.

Only two commands run in a child process (each pays for importing TensorFlow); the rest call `main()` here,
with stdout and stderr captured at the file-descriptor level.
"""

import hashlib
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from kerasdiffusion import SCHEDULER_NAMES, images, sources
from kerasdiffusion.cli import main, output_paths
from tests import reference as R

PROMPT = "a red cube, on a table"
NEGATIVE = "blurry, low quality"
TINY = ["--steps", "2", "--width", "64", "--height", "64", "--precision", "float32", "--no-xla", "--quiet"]
SETTINGS = [*TINY, "--negative-prompt", NEGATIVE, "--scheduler", "euler_ancestral"]
RUN = ["--precision", "float32", "--no-xla", "--quiet"]  # what --from-png does not set
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
                          f"Seed: 1, Size: 64x64, Model hash: {folder_hash(model)}, Model: tiny-sd, Batch size: 2, "
                          f"Batch pos: {index}",
            "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": "2", "guidance": "7.5", "seed": "1",
            "scheduler": "euler_ancestral", "model": "tiny-sd", "width": "64", "height": "64",
            "batch_size": "2", "batch_index": str(index), "clip_skip": "1", "prompt_syntax": "a1111",
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
    assert text["model"] == "converted" and "Model: converted" in text["parameters"]
    assert str(tmp_path) not in str(text)  # no local path in a shared image
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


# ------------------------------------------------------------------- LoRAs, embeddings, clip skip, --from-png


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def folder_hash(folder):
    """Our "Model hash" of a folder, as the README defines it: the sha256 of "<path> <sha256>\\n" lines of its weight
    files, sorted, first 10 hex digits."""
    lines = sorted(f"{file.relative_to(folder).as_posix()} {sha256(file.read_bytes())}\n"
                   for file in folder.rglob("*") if file.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth"))
    return sha256("".join(lines).encode())[:10]


def addnet_hash(path):
    """AUTOMATIC1111's LoRA hash of a .safetensors file: the sha256 of what follows the header, 12 hex digits."""
    data = path.read_bytes()
    return sha256(data[8 + int.from_bytes(data[:8], "little"):])[:12]


def write_lora(path, seed, unet_width=32, text_width=64):
    """A kohya LoRA of the tiny model: one UNet attention projection and one text encoder projection."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, width in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", unet_width),
                       ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", text_width)):
        tensors[f"{key}.lora_down.weight"] = rng.standard_normal((4, width)).astype(np.float32) / np.sqrt(width)
        tensors[f"{key}.lora_up.weight"] = rng.standard_normal((width, 4)).astype(np.float32)
        tensors[f"{key}.alpha"] = np.array(4.0, np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def adapters_run(model, tmp_path_factory):
    """A generation with a LoRA from --lora, one from a <lora:...> tag found in --lora-dir, an embedding, emphasis
    and clip skip."""
    folder = tmp_path_factory.mktemp("adapters")
    (folder / "loras" / "styles").mkdir(parents=True)
    files = dict(detail=write_lora(folder / "loras" / "detail.safetensors", 1),
                 ink=write_lora(folder / "loras" / "styles" / "ink.safetensors", 2),
                 sparkle=folder / "my-sparkle.safetensors")
    save_file({"emb_params": np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)},
              str(files["sparkle"]))
    prompt = "a (red:1.3) cube <lora:ink:0.7>, my-sparkle, on a [table]"
    args = ["generate", prompt, "--model", model, "--out", folder / "out.png", *SETTINGS, "--seed", "3",
            "--lora", f"{files['detail']}:0.5", "--lora-dir", folder / "loras", "--embedding", files["sparkle"],
            "--clip-skip", "2"]
    assert run_here(args) == 0
    return dict(folder=folder, files=files, prompt=prompt)


def test_loras_embeddings_and_clip_skip_are_applied_and_recorded(adapters_run, model):
    from kerasdiffusion import StableDiffusion

    files, prompt = adapters_run["files"], adapters_run["prompt"]
    pixels, text = read_png(adapters_run["folder"] / "out.png")
    hashes = f'Lora hashes: "detail: {addnet_hash(files["detail"])}, ink: {addnet_hash(files["ink"])}"'
    assert text["parameters"] == (
        f"{prompt}\nNegative prompt: {NEGATIVE}\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 64x64, "
        f'Model hash: {folder_hash(model)}, Model: tiny-sd, Clip skip: 2, {hashes}, '
        f'TI hashes: "my-sparkle: {sha256(files["sparkle"].read_bytes())[:12]}", Lora scales: "detail: 0.5"')
    assert str(adapters_run["folder"]) not in str(text) and str(model) not in str(text)
    sd = StableDiffusion.from_pretrained(model, img_width=64, img_height=64, jit_compile=False, precision="float32",
                                         scheduler="euler_ancestral", prompt_syntax="a1111", clip_skip=2,
                                         progress=False)
    sd.load_lora(files["detail"], scale=0.5)
    sd.load_lora(files["ink"])
    assert sd.load_textual_inversion(files["sparkle"]) == "my-sparkle"
    expected = sd.text_to_image(prompt, negative_prompt=NEGATIVE, num_steps=2, seed=3, verbose=False)
    assert_same_image(pixels, expected[0])
    sd.unload_lora("ink")  # the tag's LoRA changes the image
    untagged = sd.text_to_image(prompt.replace(" <lora:ink:0.7>", ""), negative_prompt=NEGATIVE, num_steps=2, seed=3,
                                verbose=False)
    assert np.abs(pixels.astype(int) - untagged[0].astype(int)).mean() > 1


def test_from_png_makes_the_same_image_again(adapters_run, batch, model, tmp_path):
    folder, files = adapters_run["folder"], adapters_run["files"]
    again = tmp_path / "again.png"
    assert run_here(["generate", "--from-png", folder / "out.png", "--out", again, "--model", model,
                     "--lora-dir", folder / "loras", "--embedding", files["sparkle"], *RUN]) == 0
    pixels, text = read_png(folder / "out.png")
    pixels_again, text_again = read_png(again)
    np.testing.assert_array_equal(pixels_again, pixels)
    assert text_again == text
    # The second image of a batch: the batch is made again and that image kept.
    second = tmp_path / "second.png"
    assert run_here(["generate", "--from-png", batch / "out-1.png", "--out", second, "--model", model, *RUN]) == 0
    assert_same_image(read_png(second)[0], read_png(batch / "out-1.png")[0])
    assert read_png(second)[1] == read_png(batch / "out-1.png")[1]


def test_from_png_reads_automatic1111_parameters(model, tmp_path):
    """A1111 1.6+'s wording (sampler and schedule type apart, fields we do not use) runs what it says."""
    from PIL import PngImagePlugin

    parameters = ("a red cube, (on a table:1.2)\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, "
                  "Schedule type: Karras, CFG scale: 6.5, Seed: 7, Size: 64x48, Model hash: 0123456789, "
                  "Model: sd15, Clip skip: 2, Denoising strength: 0.5, Version: v1.10.1")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a1111.png", pnginfo=info)
    assert run_here(["generate", "--from-png", tmp_path / "a1111.png", "--out", tmp_path / "again.png",
                     "--model", model, *RUN]) == 0
    assert run_here(["generate", "a red cube, (on a table:1.2)", "--negative-prompt", "blurry", "--steps", "2",
                     "--scheduler", "dpmpp_2m_karras", "--guidance", "6.5", "--seed", "7", "--width", "64",
                     "--height", "48", "--clip-skip", "2", "--model", model, "--out", tmp_path / "direct.png",
                     *RUN]) == 0
    np.testing.assert_array_equal(read_png(tmp_path / "again.png")[0], read_png(tmp_path / "direct.png")[0])


def write_png_with(path, parameters=None):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("case", [
    "lora file missing", "lora scale not a number", "lora tag without --lora-dir", "lora tag not in --lora-dir",
    "lora that does not fit", "embedding missing", "clip skip zero", "unknown prompt syntax", "no prompt",
    "from-png not a png", "from-png without parameters", "from-png of an unsupported sampler",
    "from-png of an unknown model", "from-png naming a missing embedding",
])
def test_bad_adapter_input_is_one_error_line_and_no_file(case, model, tmp_path, capfd):
    out = tmp_path / "out" / "image.png"
    out.parent.mkdir()
    (tmp_path / "loras").mkdir()
    (tmp_path / "notes.png").write_text("not a png")
    sd2_lora = write_lora(tmp_path / "wide.safetensors", 4, unet_width=48)
    settings = "Steps: 2, Sampler: {}, CFG scale: 7, Seed: 1, Size: 64x64, Model: {}"
    prompt, args = PROMPT, {
        "lora file missing": ["--lora", tmp_path / "nowhere.safetensors:0.5"],
        "lora scale not a number": ["--lora", f"{sd2_lora}:strong"],
        "lora tag without --lora-dir": [],
        "lora tag not in --lora-dir": ["--lora-dir", tmp_path / "loras"],
        "lora that does not fit": ["--lora", sd2_lora],
        "embedding missing": ["--embedding", tmp_path / "nowhere.pt"],
        "clip skip zero": ["--clip-skip", "0"],
        "unknown prompt syntax": ["--prompt-syntax", "comfy"],
        "no prompt": [],
        "from-png not a png": ["--from-png", tmp_path / "notes.png"],
        "from-png without parameters": ["--from-png", write_png_with(tmp_path / "bare.png")],
        "from-png of an unsupported sampler": ["--from-png", write_png_with(
            tmp_path / "heun.png", "a cat\n" + settings.format("Heun", "x"))],
        "from-png of an unknown model": ["--from-png", write_png_with(
            tmp_path / "other.png", "a cat\n" + settings.format("Euler", "my-own-model"))],
        "from-png naming a missing embedding": ["--from-png", write_png_with(
            tmp_path / "ti.png", "a cat\n" + settings.format("Euler", "x") + ', TI hashes: "my-sparkle: 0123"')],
    }[case]
    if case.startswith("lora tag"):
        prompt = PROMPT + " <lora:ink:0.5>"
    model_args = [] if case == "from-png of an unknown model" else ["--model", model]
    command = ["generate", *([prompt] if case != "no prompt" and "from-png" not in case else []), *model_args,
               "--out", out, *TINY, *args]
    status = run_here(command)
    captured = capfd.readouterr()
    assert status != 0
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert os.listdir(out.parent) == []
    expected = {"lora file missing": "nowhere.safetensors", "lora scale not a number": "strong",
                "lora tag without --lora-dir": "--lora-dir", "lora tag not in --lora-dir": "'ink'",
                "lora that does not fit": "mis-shaped", "embedding missing": "nowhere.pt", "clip skip zero": "clip-skip",
                "unknown prompt syntax": "comfy", "no prompt": "prompt", "from-png not a png": "notes.png",
                "from-png without parameters": "no generation parameters",
                "from-png of an unsupported sampler": "Unsupported sampler 'Heun'",
                "from-png of an unknown model": "'my-own-model'", "from-png naming a missing embedding": "'my-sparkle'"}
    assert expected[case] in lines[0]


def test_model_hash_of_a_file_is_automatic1111s(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"w": np.arange(6, dtype=np.float32)}, str(checkpoint))
    assert sources.model_hash(checkpoint) == sha256(checkpoint.read_bytes())[:10]
    assert sources.model_hash("org/name") is None


def test_parameters_text_follows_automatic1111():
    assert set(images.A1111_SAMPLERS) == set(SCHEDULER_NAMES)
    text = images.a1111_parameters("a fox, at night", "", 20, 7.0, 5, "dpmpp_2m_karras", "my,model: v2", 512, 768)
    assert text == 'a fox, at night\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x768, ' \
                   'Model: "my,model: v2"'
    assert output_paths("x/out.png", 1) == ["x/out.png"]
    assert output_paths("x/out.png", 2) == ["x/out-0.png", "x/out-1.png"]


# ------------------------------------------------------------------------------------------ the built-in model
# Each command takes --model kerasdiffusion/shapes; here the name points at a tiny stand-in (tests/builtin.py).

SHAPES_PROMPT = "a small red circle on the left, blue background"


def test_builtin_model_generates_at_its_own_size_and_names_itself(builtin_shapes, tiny_shapes_folder, tmp_path, capfd):
    out = tmp_path / "shapes.png"
    assert run_here(["generate", SHAPES_PROMPT, "--model", builtin_shapes, "--out", out, "--steps", "2", "--seed", "3",
                     *RUN]) == 0
    pixels, text = read_png(out)
    assert pixels.shape == (64, 64, 3)  # no --width / --height: the model's own size
    assert text["model"] == builtin_shapes and (text["width"], text["height"]) == ("64", "64")
    assert text["parameters"].endswith(f"Size: 64x64, Model hash: {sources.model_hash(tiny_shapes_folder)}, "
                                       f"Model: {builtin_shapes}")
    again = tmp_path / "again.png"  # the PNG names the built-in model: --from-png needs no --model
    assert run_here(["generate", "--from-png", out, "--out", again, *RUN]) == 0
    np.testing.assert_array_equal(read_png(again)[0], pixels)
    wide = tmp_path / "wide.png"
    assert run_here(["generate", SHAPES_PROMPT, "--model", builtin_shapes, "--out", wide, "--steps", "1",
                     "--width", "96", *RUN]) == 0
    assert read_png(wide)[0].shape == (64, 96, 3)
    assert error_lines(capfd.readouterr().err) == []


def test_builtin_model_in_batch_convert_export_and_train(builtin_shapes, tmp_path, monkeypatch):
    import json

    from kerasdiffusion.training import run as training_run
    from tests.test_training import write_images

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": SHAPES_PROMPT}) + "\n" + json.dumps({"prompt": "a square", "width": 32})
                       + "\n")
    renders = tmp_path / "renders"
    assert run_here(["batch", prompts, "--out", renders, "--model", builtin_shapes, "--steps", "1", "--seed", "1",
                     *RUN]) == 0
    made = [json.loads(line) for line in (renders / "manifest.jsonl").read_text().splitlines()]
    assert sorted((entry["width"], entry["height"]) for entry in made) == [(32, 64), (64, 64)]
    assert sorted(read_png(renders / entry["file"])[0].shape for entry in made) == [(64, 32, 3), (64, 64, 3)]
    assert json.loads((renders / "job.json").read_text())["model"] == builtin_shapes
    assert run_here(["batch", prompts, "--out", renders, "--model", builtin_shapes, "--steps", "1", "--seed", "1",
                     "--width", "64", "--height", "64", *RUN]) == 0  # the same job, its size now given: resumed

    assert run_here(["convert", builtin_shapes, tmp_path / "copy", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "copy" / "kerasdiffusion.json").read_text())
    assert (manifest["source"], manifest["image_size"]) == (builtin_shapes, 64)

    assert run_here(["export", builtin_shapes, tmp_path / "diffusers", "--quiet"]) == 0
    assert json.loads((tmp_path / "diffusers" / "unet" / "config.json").read_text())["sample_size"] == 8
    assert json.loads((tmp_path / "diffusers" / "vae" / "config.json").read_text())["sample_size"] == 64

    resolutions = []
    dataset = training_run.image_caption_dataset
    monkeypatch.setattr(training_run, "image_caption_dataset",
                        lambda *args, **kwargs: resolutions.append(kwargs["resolution"]) or dataset(*args, **kwargs))
    assert run_here(["train", "lora", "--model", builtin_shapes, "--data", write_images(tmp_path / "images", count=2),
                     "--out", tmp_path / "lora", "--steps", "1", "--precision", "float32", "--eager", "--quiet"]) == 0
    assert resolutions == [64]  # no --resolution: the model's own size
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_missing_builtin_model_is_one_error_line(tmp_path, monkeypatch, capfd):
    name = "kerasdiffusion/shapes"
    monkeypatch.setitem(sources.BUILTIN_MODELS, name, str(tmp_path / "absent"))
    for command in (["generate", SHAPES_PROMPT, "--model", name, "--out", tmp_path / "x.png"],
                    ["convert", name, tmp_path / "copy"], ["export", name, tmp_path / "diffusers"]):
        assert run_here([*command, "--quiet"]) in (1, 2), command
        lines = error_lines(capfd.readouterr().err)
        assert len(lines) == 1 and f"built-in model {name!r} is missing" in lines[0], (command, lines)
    assert os.listdir(tmp_path) == []
