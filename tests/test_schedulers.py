"""Golden-loop parity of kerasdiffusion.schedulers against diffusers' schedulers (the PyTorch reference).

Both sides run the same denoising loop from the same latents with a stand-in "UNet" that is a fixed
function of the scaled sample and the timestep, and every intermediate latent is compared.
"""

import math
import types

import numpy as np
import pytest
from keras import ops

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_euler_ancestral_discrete  # noqa: E402

from kerasdiffusion import backend  # noqa: E402
from kerasdiffusion.schedulers import SCHEDULER_NAMES, Scheduler, SchedulerConfig, get_scheduler  # noqa: E402
from tests import reference as R  # noqa: E402

SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

PREDICTION_TYPES = ("epsilon", "v_prediction")
SHAPE_NCHW = (2, 4, 8, 8)


def reference_scheduler(name, prediction_type, num_steps):
    scheduler = R.diffusers_scheduler(name, SD15_SCHEDULER_CONFIG, prediction_type=prediction_type)
    scheduler.set_timesteps(num_steps)
    return scheduler


def our_scheduler(name, prediction_type):
    return get_scheduler(name, SchedulerConfig.from_dict({**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type}))


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def fake_unet_torch(x, t):
    return 0.3 * torch.tanh(x) + 0.1 * math.sin(float(t) / 100.0)


def fake_unet_ours(x, t):
    return 0.3 * ops.tanh(x) + 0.1 * ops.sin(ops.cast(t, "float32") / 100.0)


def draw(seed, count):
    """`count` standard-normal channels-last tensors."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count,) + nchw_to_nhwc(np.zeros(SHAPE_NCHW)).shape).astype(np.float32)


def run_reference(scheduler, latents, timesteps, noises, monkeypatch):
    """diffusers' denoising loop; `noises[k]` is what the k-th step draws (ancestral sampling)."""
    draws = iter(torch.from_numpy(nhwc_to_nchw(n).copy()) for n in noises)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: next(draws))
    latents = torch.from_numpy(nhwc_to_nchw(latents).copy())
    history = []
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(fake_unet_torch(model_input, t), t, latents).prev_sample
        history.append(nchw_to_nhwc(latents.numpy()))
    return history


def run_ours(scheduler, plan, latents, noises, start=0):
    state = scheduler.initial_state(latents)
    history = []
    for i in range(start, len(plan.timesteps)):
        model_input = scheduler.scale_model_input(plan, i, latents)
        model_output = fake_unet_ours(model_input, plan.timesteps[i])
        latents, state = scheduler.step(plan, i, model_output, latents, state, noises[i])
        history.append(ops.convert_to_numpy(latents))
    return history


def assert_close(ours, reference, what):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, what
    scale = max(1.0, float(np.abs(reference).max()))
    worst = float(np.abs(ours - reference).max())
    assert worst <= 1e-5 * scale, f"{what}: max abs diff {worst:.3g} (magnitude {scale:.3g})"


@pytest.mark.parametrize("num_steps", [1, 2, 4, 10, 25])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_denoising_loop_matches_diffusers(name, prediction_type, num_steps, monkeypatch):
    reference = reference_scheduler(name, prediction_type, num_steps)
    scheduler = our_scheduler(name, prediction_type)
    plan = scheduler.plan(num_steps)

    np.testing.assert_array_equal(plan.timesteps, reference.timesteps.numpy().astype(np.float32))
    assert plan.timesteps.dtype == np.float32
    assert isinstance(plan.init_noise_sigma, float)
    # diffusers forms 1 - ᾱ in float32: σ at t = 0 (one-step linspace runs start there) is off by ~1e-5.
    np.testing.assert_allclose(plan.init_noise_sigma, float(reference.init_noise_sigma), rtol=5e-5)

    noise = draw(seed=num_steps, count=len(plan.timesteps) + 1)
    latents, noises = noise[0], noise[1:]
    expected = run_reference(reference, latents * float(reference.init_noise_sigma), reference.timesteps, noises,
                             monkeypatch)
    actual = run_ours(scheduler, plan, ops.convert_to_tensor(latents) * plan.init_noise_sigma, noises)
    assert len(actual) == len(expected)
    for k, (ours, theirs) in enumerate(zip(actual, expected)):
        assert_close(ours, theirs, f"{name}/{prediction_type}/{num_steps} steps, evaluation {k}")


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_image_to_image_matches_diffusers(name, strength, monkeypatch):
    """Start index, initial noising and the (re-)warm-up of multistep samplers mid-schedule."""
    from diffusers import StableDiffusionImg2ImgPipeline

    num_steps, prediction_type = 10, ("v_prediction" if name in ("pndm", "lms") else "epsilon")
    reference = reference_scheduler(name, prediction_type, num_steps)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=reference), num_steps, strength, "cpu"
    )
    scheduler = our_scheduler(name, prediction_type)
    plan = scheduler.plan(num_steps)
    start = scheduler.start_index(plan, strength)
    np.testing.assert_array_equal(plan.timesteps[start:], timesteps.numpy().astype(np.float32))

    noise = draw(seed=7, count=len(plan.timesteps) + 2)
    image_latents, first_noise, noises = noise[0], noise[1], noise[2:]
    noisy = reference.add_noise(
        torch.from_numpy(nhwc_to_nchw(image_latents).copy()),
        torch.from_numpy(nhwc_to_nchw(first_noise).copy()),
        timesteps[:1],
    )
    ours = scheduler.add_noise(plan, image_latents, first_noise, start)
    assert_close(ours, nchw_to_nhwc(noisy.numpy()), f"{name} add_noise at start {start}")

    expected = run_reference(reference, nchw_to_nhwc(noisy.numpy()), timesteps, noises[start:], monkeypatch)
    actual = run_ours(scheduler, plan, ours, noises, start=start)
    assert len(actual) == len(expected)
    for k, (a, b) in enumerate(zip(actual, expected)):
        assert_close(a, b, f"{name} img2img strength {strength}, evaluation {start + k}")


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_add_noise_matches_diffusers(name):
    num_steps = 25
    reference = reference_scheduler(name, "epsilon", num_steps)
    scheduler = our_scheduler(name, "epsilon")
    plan = scheduler.plan(num_steps)
    original, noise = draw(seed=3, count=2)
    for i in (0, 1, 2, 7, len(plan.timesteps) - 1):
        expected = reference.add_noise(
            torch.from_numpy(nhwc_to_nchw(original).copy()),
            torch.from_numpy(nhwc_to_nchw(noise).copy()),
            reference.timesteps[i : i + 1],
        )
        actual = scheduler.add_noise(plan, ops.convert_to_tensor(original), ops.convert_to_tensor(noise),
                                     ops.convert_to_tensor(i, "int32"))
        assert ops.dtype(actual) == "float32"
        assert_close(actual, nchw_to_nhwc(expected.numpy()), f"{name} add_noise at {i}")


@pytest.mark.parametrize("num_steps", [1, 7, 10, 50])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_start_index_matches_img2img_get_timesteps(name, num_steps):
    scheduler = get_scheduler(name)
    plan = scheduler.plan(num_steps)
    for strength in (0.0, 0.05, 0.3, 0.5, 0.8, 0.99, 1.0):
        init_timestep = min(int(num_steps * strength), num_steps)
        assert scheduler.start_index(plan, strength) == max(num_steps - init_timestep, 0)
    assert scheduler.start_index(plan, 1.0) == 0


def compiled_loop(scheduler, plan):
    """The whole loop as one XLA program, `i` a traced `fori_loop` counter."""

    def loop(latents, noises, start):
        timesteps = ops.convert_to_tensor(plan.timesteps)

        def body(i, carry):
            x, state = carry
            t = ops.take(timesteps, i, axis=0)
            model_output = fake_unet_ours(scheduler.scale_model_input(plan, i, x), t)
            return scheduler.step(plan, i, model_output, x, state, ops.take(noises, i, axis=0))

        state = scheduler.initial_state(latents)
        latents, _ = ops.fori_loop(start, len(plan.timesteps), body, (latents, state))
        return latents

    return backend.compile_function(loop, [], jit_compile=True)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_xla_while_loop_matches_eager(name):
    scheduler = our_scheduler(name, "v_prediction" if name in ("pndm", "dpmpp_2m") else "epsilon")
    plan = scheduler.plan(6)
    noise = draw(seed=11, count=len(plan.timesteps) + 1)
    latents, noises = ops.convert_to_tensor(noise[0]) * plan.init_noise_sigma, ops.convert_to_tensor(noise[1:])
    loop = compiled_loop(scheduler, plan)
    for start in (0, 2):
        expected = run_ours(scheduler, plan, latents, noise[1:], start=start)[-1]
        actual = loop(latents, noises, ops.convert_to_tensor(start, "int32"))
        np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5,
                                   atol=1e-5 * plan.init_noise_sigma)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_half_precision_inputs_give_float32(name):
    scheduler = get_scheduler(name)
    plan = scheduler.plan(4)
    sample, model_output, noise = draw(seed=5, count=3)
    expected, _ = scheduler.step(plan, 1, model_output, sample, scheduler.initial_state(sample), noise)
    for dtype in ("float16", "bfloat16"):
        low = [ops.cast(ops.cast(x, dtype), "float32") for x in (sample, model_output, noise)]
        reference, _ = scheduler.step(plan, 1, low[1], low[0], scheduler.initial_state(low[0]), low[2])
        cast = [ops.cast(x, dtype) for x in (sample, model_output, noise)]
        actual, state = scheduler.step(plan, 1, cast[1], cast[0], scheduler.initial_state(cast[0]), cast[2])
        assert ops.dtype(actual) == "float32"
        assert ops.dtype(scheduler.scale_model_input(plan, 1, cast[0])) == "float32"
        assert all(ops.dtype(s) in ("float32", "int32") for s in state)
        np.testing.assert_allclose(ops.convert_to_numpy(actual), ops.convert_to_numpy(reference), rtol=1e-6, atol=1e-6)
    assert ops.dtype(expected) == "float32"


def test_scheduler_names():
    for name in SCHEDULER_NAMES:
        assert R.diffusers_scheduler_class(name)
        scheduler = get_scheduler(name)
        assert isinstance(scheduler, Scheduler)
        assert scheduler.name == name
        assert get_scheduler(scheduler) is scheduler


def test_unknown_scheduler_name_is_a_value_error():
    with pytest.raises(ValueError, match="nope") as error:
        get_scheduler("nope")
    for name in SCHEDULER_NAMES:
        assert name in str(error.value)
    with pytest.raises(ValueError):
        get_scheduler(None)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_bad_plan_arguments_are_value_errors(name):
    scheduler = get_scheduler(name)
    for num_steps in (0, -3, 1001):
        with pytest.raises(ValueError):
            scheduler.plan(num_steps)
    if name in ("ddim", "pndm"):  # "leading" spacing with steps_offset 1 would reach timestep 1000
        with pytest.raises(ValueError):
            scheduler.plan(1000)
    else:
        assert len(scheduler.plan(1000).timesteps) == 1000
    plan = scheduler.plan(3)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError):
            scheduler.start_index(plan, strength)


def test_config_from_diffusers_dict():
    config = SchedulerConfig.from_dict({**SD15_SCHEDULER_CONFIG, "timestep_spacing": "leading", "foo": 1})
    assert config == SchedulerConfig()
    v = SchedulerConfig.from_dict({"prediction_type": "v_prediction", "beta_schedule": "linear"})
    assert (v.prediction_type, v.beta_schedule) == ("v_prediction", "linear")
    with pytest.raises(ValueError):
        SchedulerConfig(prediction_type="sample")
    with pytest.raises(ValueError):
        SchedulerConfig(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError):
        SchedulerConfig.from_dict({"trained_betas": [0.1, 0.2]})


@pytest.mark.parametrize("field, value", [("num_train_timesteps", "x"), ("num_train_timesteps", 0),
                                          ("beta_start", None), ("beta_end", float("nan")), ("steps_offset", 1.5),
                                          ("clip_sample", "no"), ("prediction_type", 3), ("beta_start", 0.5)])
def test_a_config_from_a_file_is_checked_field_by_field(field, value):
    """A scheduler_config.json is a stranger's file: a wrong field is a ValueError naming it, never a TypeError
    deep in the table math."""
    with pytest.raises(ValueError, match=field):
        get_scheduler("ddim", SchedulerConfig.from_dict({**SD15_SCHEDULER_CONFIG, field: value}))


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_linear_betas_match_diffusers(name, monkeypatch):
    config = {**SD15_SCHEDULER_CONFIG, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
    reference = R.diffusers_scheduler(name, config)
    reference.set_timesteps(8)
    scheduler = get_scheduler(name, SchedulerConfig.from_dict(config))
    plan = scheduler.plan(8)
    noise = draw(seed=2, count=len(plan.timesteps) + 1)
    expected = run_reference(reference, noise[0] * float(reference.init_noise_sigma), reference.timesteps,
                             noise[1:], monkeypatch)
    actual = run_ours(scheduler, plan, ops.convert_to_tensor(noise[0]) * plan.init_noise_sigma, noise[1:])
    for k, (a, b) in enumerate(zip(actual, expected)):
        assert_close(a, b, f"{name} linear betas, evaluation {k}")


def test_a_scheduler_made_without_a_config_takes_the_checkpoints():
    """An SD 2.x v-prediction checkpoint given `DDIM()` runs as v-prediction, unless the object says otherwise."""
    from kerasdiffusion.schedulers import DDIM, DPMSolverPP2M

    checkpoint = SchedulerConfig(prediction_type="v_prediction", beta_schedule="linear")
    assert DDIM().for_checkpoint(checkpoint).config == checkpoint
    karras = DPMSolverPP2M(karras=True).for_checkpoint(checkpoint)
    assert karras.config == checkpoint and karras.name == "dpmpp_2m_karras"
    own = DDIM(prediction_type="epsilon").for_checkpoint(checkpoint)
    assert own.config.prediction_type == "epsilon" and own.config.beta_schedule == "linear"
    fixed = DDIM(SchedulerConfig()).for_checkpoint(checkpoint)
    assert fixed.config == SchedulerConfig()
    assert get_scheduler("euler").for_checkpoint(checkpoint).key == get_scheduler("euler", checkpoint).key
    assert get_scheduler("euler").key != get_scheduler("euler", checkpoint).key
