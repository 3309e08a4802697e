"""The built-in ``kerasdiffusion/shapes`` model: prompts steer its pictures, measured from the pixels, and
diffusers draws the same pictures from its export, which loads back here as the same model.

The adherence figures (`shapes_model.adherence`) are printed with ``pytest -s``; they are the README's table,
which ``python benchmarks/shapes_adherence.py`` prints.
"""

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import kerasdiffusion as kd
from kerasdiffusion import shapes
from kerasdiffusion.training import shapes_model
from tests import reference as R

# The targets for text to image: the share of pictures that show what the prompt asks. The test asks
# the README table's 200 prompts (a third held-out combinations), where the shipped model gives background and
# colour 200/200, shape 166/200 and position 140/140, and holds text to image to the targets themselves. The
# edits have no targets of their own: each is held to what the shipped model was measured to do on the same
# 200 tasks (background and colour 200/200; shape 146/200 inpainting and 161/200 recolouring; position
# 200/200 and 152/152), with a margin for other CPUs' rounding, so that a change that loses it fails here.
TARGETS = {"background": 0.95, "colour": 0.90, "shape": 0.80, "position": 0.80}
FLOORS = {"text_to_image": TARGETS,
          "inpaint (left half)": {"background": 0.95, "colour": 0.95, "shape": 0.65, "position": 0.95},
          "image_to_image (recolour, strength 0.75)": {"background": 0.95, "colour": 0.95, "shape": 0.72,
                                                       "position": 0.95}}


@pytest.fixture(scope="module")
def sd():
    return kd.StableDiffusion.from_pretrained("kerasdiffusion/shapes", scheduler="dpmpp_2m", jit_compile=R.JIT,
                                              progress=False)


def rates(tally):
    return {attribute: hits / asked for attribute, (hits, asked) in tally.items() if asked}


def test_the_model_is_small_and_draws_at_its_own_size(sd):
    folder = os.path.join(os.path.dirname(kd.__file__), "models", "shapes")
    size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
    assert size <= 20 * 2**20
    assert (sd.img_width, sd.img_height) == (64, 64)
    image = sd.text_to_image("a red circle on a blue background", num_steps=2, seed=0, verbose=False)
    assert image.shape == (1, 64, 64, 3)


def test_prompts_steer_the_pictures(sd):
    """200 generations per task (text to image, inpainting, image to image), a third of them combinations held
    out of training, read back from the pixels: text to image meets the issue's targets, and each edit at least
    what the shipped model was measured to do."""
    results = shapes_model.adherence(sd, count=200)
    for task, tally in results.items():
        print(task, {attribute: f"{hits}/{asked}" for attribute, (hits, asked) in tally.items()})
    assert results["text_to_image"]["background"][1] >= 200
    for task, floors in FLOORS.items():
        measured = rates(results[task])
        for attribute, floor in floors.items():
            assert measured[attribute] >= floor, (task, attribute, measured[attribute])


def test_diffusers_draws_the_same_pictures_from_the_export(sd, tmp_path):
    kd.export(sd.components, tmp_path / "shapes")
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "shapes", local_files_only=True,
                                                       safety_checker=None)
    # The model's training schedule is SD 1.5's; its DPM++ 2M is the one the pipeline tests hold ours equal to.
    assert {k: pipeline.scheduler.config[k] for k in R.SD15_SCHEDULER if k != "skip_prk_steps"} == {
        k: v for k, v in R.SD15_SCHEDULER.items() if k != "skip_prk_steps"}
    pipeline.scheduler = R.diffusers_scheduler("dpmpp_2m", R.SD15_SCHEDULER)
    prompts = [scene.caption() for scene in shapes.evaluation_scenes(3, 4)]
    noise = np.random.default_rng(5).standard_normal((4, 8, 8, 4)).astype("float32")
    with torch.no_grad():
        expected = pipeline(prompt=prompts, latents=R.nchw(noise), num_inference_steps=20, guidance_scale=5.0,
                            height=64, width=64, output_type="np").images
    expected = np.round(expected * 255).astype(np.uint8)
    ours = sd.generate_image(sd.encode_text(prompts), batch_size=4, num_steps=20, unconditional_guidance_scale=5.0,
                             diffusion_noise=noise, verbose=False)
    difference = np.abs(ours.astype(np.int32) - expected.astype(np.int32))
    print(f"mean abs {difference.mean():.4f}, 99.9th percentile {np.percentile(difference, 99.9):.1f}, "
          f"max {difference.max()}")
    assert expected.std() > 20
    assert difference.mean() <= 1.0 and np.percentile(difference, 99.9) <= 8
    # And the export loads back here as the same model: its configs' group counts (the recipe's, not Stable
    # Diffusion's 32, which the weights cannot tell) are read, so the pictures are ours exactly.
    back = kd.StableDiffusion.from_pretrained(tmp_path / "shapes", scheduler="dpmpp_2m", jit_compile=R.JIT,
                                              cache=False, progress=False)
    assert (back.components.family.unet.norm_groups, back.components.family.vae.norm_groups) == (
        shapes_model.UNET.norm_groups, shapes_model.VAE.norm_groups)
    again = back.generate_image(back.encode_text(prompts), batch_size=4, num_steps=20,
                                unconditional_guidance_scale=5.0, diffusion_noise=noise, verbose=False)
    np.testing.assert_array_equal(again, ours)


def test_the_readme_first_command_draws_its_prompt(tmp_path, monkeypatch):
    from PIL import Image

    from kerasdiffusion.cli import main

    monkeypatch.chdir(tmp_path)
    # The README's: kerasdiffusion generate "a red circle on a blue background" --model kerasdiffusion/shapes
    # --out shapes.png; with a seed, so that the test is the same every run.
    argv = ["generate", "a red circle on a blue background", "--model", "kerasdiffusion/shapes", "--out", "shapes.png"]
    assert main([*argv, "--seed", "0"]) == 0
    found = shapes.describe(np.asarray(Image.open(tmp_path / "shapes.png").convert("RGB")))
    assert (found["background"], found["colour"], found["shape"]) == ("blue", "red", "circle")
