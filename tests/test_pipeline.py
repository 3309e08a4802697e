"""End-to-end parity of the pipeline with diffusers on a tiny random model, plus the API's promises."""

import numpy as np
import pytest
import torch

import kerasdiffusion as kd
from kerasdiffusion import StableDiffusion, seeds
from kerasdiffusion.config import SCHEDULER_NAMES
from tests import reference as R

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SIZE = 64


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pipeline = R.make_reference_pipeline()
    folder = tmp_path_factory.mktemp("tiny") / "diffusers"
    pipeline.save_pretrained(folder)
    return pipeline, str(folder)


@pytest.fixture(scope="module")
def sd(reference):
    return StableDiffusion.from_pretrained(reference[1], img_width=SIZE, img_height=SIZE, jit_compile=R.JIT,
                                           precision="float32")


def diffusers_scheduler(name, config=R.SD15_SCHEDULER):
    """The diffusers scheduler `name` stands for, from the SD 1.5 config (never from a previous test's)."""
    return R.diffusers_scheduler(name, config)


@pytest.fixture
def same_step_noise(monkeypatch):
    """Feeds diffusers' Euler ancestral sampler the per-step noise our seeds give (item b, evaluation i:
    `seeds.item_normal(seed, b, i + 1, ...)`), so that the stochastic sampler can be compared too."""
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as module

    def feed(seed, batch_size, num_evaluations):
        noises = seeds.step_normals(seed, range(batch_size), num_evaluations, (SIZE // 8, SIZE // 8, 4))
        draws = iter(R.nchw(noise) for noise in noises)
        monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: next(draws))

    return feed


def reference_images(pipeline, **kwargs):
    images = pipeline(output_type="np", **kwargs).images
    return np.round(images * 255).astype(np.uint8)


def pixel_differences(ours, expected):
    difference = np.abs(ours.astype(np.int32) - expected.astype(np.int32))
    return float(difference.mean()), float(np.percentile(difference, 99.9))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_generate_image_matches_diffusers(reference, sd, name, record_property, same_step_noise):
    pipeline, _ = reference
    pipeline.scheduler = diffusers_scheduler(name)
    noise = np.random.default_rng(7).standard_normal((2, SIZE // 8, SIZE // 8, 4)).astype("float32")
    same_step_noise(seed=21, batch_size=2, num_evaluations=10)
    expected = reference_images(pipeline, prompt=[PROMPT] * 2, negative_prompt=[NEGATIVE] * 2,
                                latents=R.nchw(noise), num_inference_steps=10, guidance_scale=7.5,
                                height=SIZE, width=SIZE)
    sd.scheduler = name
    ours = sd.generate_image(sd.encode_text(PROMPT), negative_prompt=NEGATIVE, batch_size=2, num_steps=10,
                             diffusion_noise=noise, seed=21, verbose=False)
    assert ours.shape == (2, SIZE, SIZE, 3) and ours.dtype == np.uint8
    assert expected.std() > 20, "the reference image is too flat for the comparison to mean anything"
    mean, p999 = pixel_differences(ours, expected)
    record_property(f"{name}_mean_abs", mean)
    record_property(f"{name}_p99.9", p999)
    print(f"{name}: mean abs {mean:.5f}, 99.9th percentile {p999:.1f}, max {np.abs(ours.astype(int) - expected.astype(int)).max()}")
    assert mean <= 1.0 and p999 <= 8


@pytest.fixture(scope="module")
def sd2_reference(tmp_path_factory):
    pipeline = R.make_reference_pipeline(seed=11, family="sd2")
    folder = tmp_path_factory.mktemp("tiny-sd2") / "diffusers"
    pipeline.save_pretrained(folder)
    return pipeline, str(folder)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_sd2_v_prediction_pipeline_matches_diffusers(sd2_reference, name):
    """An SD 2.x-shaped model (OpenCLIP text tower, 64-wide heads, linear projections, upcast attention, "!"
    padding, v-prediction) is recognised from its files and generates diffusers' images."""
    from kerasdiffusion import config as C

    pipeline, folder = sd2_reference
    sd = StableDiffusion.from_pretrained(folder, img_width=SIZE, img_height=SIZE, jit_compile=R.JIT,
                                         precision="float32", scheduler=name)
    components = sd.components
    assert components.family is C.SD2 and components.scheduler_config.prediction_type == "v_prediction"
    assert sd.tokenizer(["a cat"])[0, -1] == pipeline.tokenizer.pad_token_id == 0  # "!"
    pipeline.scheduler = diffusers_scheduler(name, R.SD2_SCHEDULER)
    noise = np.random.default_rng(12).standard_normal((2, SIZE // 8, SIZE // 8, 4)).astype("float32")
    expected = reference_images(pipeline, prompt=[PROMPT] * 2, negative_prompt=[NEGATIVE] * 2,
                                latents=R.nchw(noise), num_inference_steps=10, guidance_scale=7.5,
                                height=SIZE, width=SIZE)
    ours = sd.generate_image(sd.encode_text(PROMPT), negative_prompt=NEGATIVE, batch_size=2, num_steps=10,
                             diffusion_noise=noise, verbose=False)
    assert expected.std() > 20, "the reference image is too flat for the comparison to mean anything"
    mean, p999 = pixel_differences(ours, expected)
    print(f"SD 2.x {name}: mean abs {mean:.5f}, 99.9th percentile {p999:.1f}, "
          f"max {np.abs(ours.astype(int) - expected.astype(int)).max()}")
    assert mean <= 1.0 and p999 <= 8


@pytest.mark.parametrize("loop", ["steps", "compiled"])
def test_inpainting_checkpoint_matches_diffusers(tmp_path, monkeypatch, loop):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    # diffusers samples the masked image's latents; we use the posterior mean. Make diffusers do the same.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipeline = R.make_reference_pipeline(unet_in_channels=9, seed=3)
    pipeline.save_pretrained(tmp_path / "inpaint")
    sd = StableDiffusion.from_pretrained(tmp_path / "inpaint", img_width=SIZE, img_height=SIZE, jit_compile=R.JIT,
                                         precision="float32", scheduler="ddim", loop=loop)
    assert sd.diffusion_model.inputs[0].shape[-1] == 9
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    noise = rng.standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype("float32")
    pipeline.scheduler = diffusers_scheduler("ddim")
    expected = reference_images(pipeline, prompt=PROMPT, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
                                latents=R.nchw(noise), num_inference_steps=10, height=SIZE, width=SIZE)
    ours = sd.inpaint(PROMPT, image, mask, num_steps=10, diffusion_noise=noise, verbose=False)
    mean, p999 = pixel_differences(ours, expected)
    print(f"inpaint 9-channel: mean abs {mean:.3f}, 99.9th percentile {p999:.1f}")
    assert mean <= 1.0 and p999 <= 8


@pytest.fixture
def fixed_noise(monkeypatch):
    """The same initial noise for diffusers (ours gets it as `diffusion_noise`), and the VAE posterior's mean
    on both sides."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module

    noise = np.random.default_rng(4).standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype("float32")
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **kwargs: R.nchw(noise))
    return noise


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_image_to_image_matches_diffusers(reference, sd, fixed_noise, name):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipeline = StableDiffusionImg2ImgPipeline(**reference[0].components)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = diffusers_scheduler(name)
    image = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    expected = reference_images(pipeline, prompt=PROMPT, image=Image.fromarray(image), strength=0.6,
                                num_inference_steps=10)
    sd.scheduler = name
    ours = sd.image_to_image(PROMPT, image, strength=0.6, num_steps=10, diffusion_noise=fixed_noise, verbose=False)
    mean, p999 = pixel_differences(ours, expected)
    print(f"image_to_image {name}: mean abs {mean:.3f}, 99.9th percentile {p999:.1f}")
    assert mean <= 1.0 and p999 <= 8


def test_legacy_inpaint_matches_diffusers(reference, sd, fixed_noise):
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    pipeline = StableDiffusionInpaintPipeline(**reference[0].components)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = diffusers_scheduler("ddim")
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 24:56] = 255
    expected = reference_images(pipeline, prompt=PROMPT, image=Image.fromarray(image),
                                mask_image=Image.fromarray(mask), latents=R.nchw(fixed_noise),
                                num_inference_steps=10, height=SIZE, width=SIZE)
    sd.scheduler = "ddim"
    ours = sd.inpaint(PROMPT, image, mask, num_steps=10, diffusion_noise=fixed_noise, verbose=False)
    mean, p999 = pixel_differences(ours, expected)
    print(f"inpaint 4-channel: mean abs {mean:.3f}, 99.9th percentile {p999:.1f}")
    assert mean <= 1.0 and p999 <= 8


def test_same_seed_same_images_and_batch_independent(sd):
    sd.scheduler = "euler_ancestral"
    a = sd.text_to_image(PROMPT, num_steps=3, seed=11, verbose=False)
    b = sd.text_to_image(PROMPT, num_steps=3, seed=11, verbose=False)
    c = sd.text_to_image(PROMPT, num_steps=3, seed=12, verbose=False)
    batch = sd.text_to_image(PROMPT, batch_size=2, num_steps=3, seed=11, verbose=False)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1
    assert np.abs(batch[0].astype(int) - a[0].astype(int)).max() <= 1
    assert np.abs(batch[1].astype(int) - a[0].astype(int)).mean() > 1


@pytest.mark.parametrize("loop", ["steps", "compiled"])
def test_per_image_seeds_mix_in_one_batch(sd, loop):
    """Images of different seeds and prompts in one batch equal each made alone, ancestral noise included."""
    sd.scheduler, sd.loop = "euler_ancestral", loop
    prompts = [PROMPT, "a cat", PROMPT]
    keys = [(12, 0), (11, 1), (11, 0)]
    try:
        mixed = sd.text_to_image(prompts, num_steps=3, seed=keys, verbose=False)
        pair = sd.text_to_image(PROMPT, batch_size=2, num_steps=3, seed=11, verbose=False)
        alone = [sd.text_to_image(text, num_steps=3, seed=[key], verbose=False)[0] for text, key in zip(prompts, keys)]
    finally:
        sd.loop = None
    assert np.abs(alone[0].astype(int) - alone[2].astype(int)).mean() > 1, "different seeds, same image"
    for ours, expected in zip(mixed, alone):
        assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(mixed[2].astype(int) - pair[0].astype(int)).max() <= 1
    assert np.abs(alone[2].astype(int) - sd.text_to_image(PROMPT, num_steps=3, seed=11, verbose=False)[0]).max() <= 1


def test_xla_matches_plain_and_compiles_once(reference, sd):
    xla = StableDiffusion.from_pretrained(reference[1], img_width=SIZE, img_height=SIZE, jit_compile=True,
                                          precision="float32", scheduler="dpmpp_2m")
    sd.scheduler = "dpmpp_2m"
    kwargs = dict(num_steps=4, seed=5, verbose=False)
    compiled = xla.text_to_image(PROMPT, **kwargs)
    traces = xla.trace_count
    again = xla.text_to_image(PROMPT, **kwargs)
    assert xla.trace_count == traces == 1
    np.testing.assert_array_equal(compiled, again)
    mean, _ = pixel_differences(compiled, sd.text_to_image(PROMPT, **kwargs))
    assert mean <= 0.5


def test_programs_are_kept_by_value(reference, sd):
    """Going back to a sampler used before (by name or by an equal object) reuses its program."""
    xla = StableDiffusion.from_components(sd.components, img_width=SIZE, img_height=SIZE, jit_compile=True,
                                          scheduler="dpmpp_2m")
    kwargs = dict(num_steps=3, seed=2, verbose=False)
    first = xla.text_to_image(PROMPT, **kwargs)
    xla.scheduler = "euler"
    xla.text_to_image(PROMPT, **kwargs)
    assert xla.trace_count == 2
    xla.scheduler = "dpmpp_2m"
    np.testing.assert_array_equal(xla.text_to_image(PROMPT, **kwargs), first)
    xla.scheduler = kd.get_scheduler("dpmpp_2m")
    xla.text_to_image(PROMPT, **kwargs)
    assert xla.trace_count == 2


# On TensorFlow, XLA compiles one scheduler's whole loop, and the rest runs as TensorFlow graphs (XLA compiling
# six programs per scheduler took a minute each; `test_xla_matches_plain_and_compiles_once` compares XLA's
# steps with plain graphs). On JAX, everything is compiled with XLA. One scheduler of each kind of state carried
# between steps: none but fresh noise (euler_ancestral; DDIM carries nothing either), a history of model
# outputs (pndm's outgrows DPM++ 2M's), and DPM++ 2M's under XLA.
@pytest.mark.parametrize("name, jit_compile", [("pndm", R.JIT), ("euler_ancestral", R.JIT), ("dpmpp_2m", True)])
def test_compiled_loop_gives_the_images_of_the_steps_loop(sd, name, jit_compile):
    """The whole loop in one program: text to image, image to image (a run that starts mid-way) and
    inpainting with an ordinary UNet, against one program per step."""
    loops = {loop: StableDiffusion.from_components(sd.components, img_width=SIZE, img_height=SIZE,
                                                   jit_compile=jit_compile if loop == "compiled" else R.JIT,
                                                   scheduler=name, loop=loop)
             for loop in ("steps", "compiled")}
    image = np.random.default_rng(8).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, 24:] = 1
    calls = {
        "text_to_image": lambda p: p.text_to_image(PROMPT, batch_size=2, num_steps=4, seed=3, verbose=False),
        "image_to_image": lambda p: p.image_to_image(PROMPT, image, strength=0.5, num_steps=6, seed=4, verbose=False),
        "inpaint": lambda p: p.inpaint(PROMPT, image, mask, num_steps=4, seed=5, verbose=False),
    }
    for what, call in calls.items():
        steps, compiled = call(loops["steps"]), call(loops["compiled"])
        worst = np.abs(steps.astype(int) - compiled.astype(int)).max()
        print(f"{name} {what}: steps against compiled loop, max difference {worst} of 255")
        assert worst <= 1, what


def test_from_components_and_components_that_disagree(sd):
    import dataclasses

    from kerasdiffusion.config import TextEncoderConfig
    from kerasdiffusion.text_encoder import build_text_encoder

    parts = sd.components
    assert isinstance(parts, kd.Components)
    other = StableDiffusion.from_components(parts, img_width=SIZE, img_height=SIZE, jit_compile=R.JIT)
    assert other.diffusion_model is sd.diffusion_model and other.scheduler.config == parts.scheduler_config
    narrow = build_text_encoder(TextEncoderConfig(width=32, num_layers=1, num_heads=1, mlp_dim=64))
    with pytest.raises(ValueError, match="attends to a 64-wide context but the text encoder gives 32"):
        dataclasses.replace(parts, text_encoder=narrow)
    with pytest.raises(ValueError, match="decoder"):
        dataclasses.replace(parts, decoder=parts.image_encoder)
    with pytest.raises(TypeError, match="Components"):
        StableDiffusion.from_components({"diffusion_model": parts.diffusion_model})


def test_the_default_size_is_the_models_own_as_in_diffusers(reference, sd):
    """The tiny UNet's sample_size is 8 latents: a 64x64 model, here and in diffusers; a size given still wins."""
    pipeline, folder = reference
    own = StableDiffusion.from_pretrained(folder, jit_compile=R.JIT, precision="float32")
    assert own.components.image_size == 8 * pipeline.unet.config.sample_size == 64
    expected = reference_images(pipeline, prompt=PROMPT, num_inference_steps=1, guidance_scale=1.0)
    assert own.text_to_image(PROMPT, num_steps=1, seed=0, verbose=False).shape == (1, *expected.shape[1:])
    assert (own.img_width, own.img_height) == (64, 64)
    wide = StableDiffusion.from_components(sd.components, img_width=SIZE + 16, jit_compile=R.JIT)
    assert (wide.img_width, wide.img_height) == (SIZE + 16, 64)
    assert wide.text_to_image(PROMPT, num_steps=1, seed=0, verbose=False).shape == (1, 64, SIZE + 16, 3)
    lazy = StableDiffusion(source=folder, img_height=32, jit_compile=R.JIT, precision="float32")
    assert lazy._components is None and (lazy.img_width, lazy.img_height) == (64, 32)  # the size loads the model


def test_components_image_size_defaults_to_the_family_rule(sd):
    import dataclasses

    from kerasdiffusion import config as C

    parts = sd.components
    assert dataclasses.replace(parts, image_size=None).image_size == 512
    v_prediction = dataclasses.replace(parts.scheduler_config, prediction_type="v_prediction")
    assert dataclasses.replace(parts, family=C.SD2, scheduler_config=v_prediction, image_size=None).image_size == 768
    assert dataclasses.replace(parts, family=C.SD2, image_size=None).image_size == 512  # SD 2.x base: epsilon
    with pytest.raises(ValueError, match="image size 60 is not a positive multiple of 8"):
        dataclasses.replace(parts, image_size=60)


def test_image_to_image_and_legacy_inpaint_run(sd):
    sd.scheduler = "ddim"
    image = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE + 16, 3), dtype=np.uint8)
    out = sd.image_to_image(PROMPT, image, strength=0.5, num_steps=4, seed=1, verbose=False)
    assert out.shape == (1, SIZE, SIZE + 16, 3)
    untouched = sd.image_to_image(PROMPT, image, strength=0.0, num_steps=4, seed=1, verbose=False)
    assert untouched.shape == out.shape
    mask = np.zeros((SIZE, SIZE + 16), np.uint8)
    mask[:, :40] = 1
    painted = sd.inpaint([PROMPT, "a cat"], image, mask, num_steps=3, seed=1, verbose=False)
    assert painted.shape == (2, SIZE, SIZE + 16, 3)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda sd: sd.text_to_image(PROMPT, batch_size=0), "batch_size"),
        (lambda sd: sd.text_to_image(PROMPT, num_steps=0), "num_steps"),
        (lambda sd: sd.image_to_image(PROMPT, np.zeros((64, 64, 3), np.uint8), strength=1.5), "strength"),
        (lambda sd: sd.inpaint(PROMPT, np.zeros((64, 64, 3), np.uint8), np.zeros((32, 64))), "mask size"),
        (lambda sd: sd.image_to_image(PROMPT, np.zeros((60, 64, 3), np.uint8)), "multiple of 8"),
        (lambda sd: sd.text_to_image(PROMPT, batch_size=2, seed=[(1, 0)]),
         "1 \\(seed, index\\) pairs but the batch has 2"),
        (lambda sd: sd.text_to_image(PROMPT, seed=[(1, 0, 2)]), "pair \\(seed, index\\)"),
        (lambda sd: sd.text_to_image(PROMPT, seed=[(1, -1)]), "index must be an integer"),
        (lambda sd: sd.text_to_image(PROMPT, seed=[(-1, 0)]), "seed must be an integer"),
    ],
)
def test_bad_input_is_named(sd, call, message):
    with pytest.raises(ValueError, match=message):
        call(sd)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="loop must be one of steps, compiled or None, got 'fast'"):
        StableDiffusion(loop="fast")
    with pytest.raises(TypeError, match="distribution= on Keras' .* backend takes"):
        StableDiffusion(distribution=object())
    with pytest.raises(ValueError, match="multiple of 8"):
        StableDiffusion(img_width=500)
    with pytest.raises(ValueError, match="nonsense"):
        StableDiffusion(scheduler="nonsense")
    with pytest.raises(ValueError, match="precision"):
        StableDiffusion(precision="float64")
