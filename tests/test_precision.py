"""Mixed precision per model: bfloat16 / float16 layers against float32, on the CPU, tiny model."""

import keras
import numpy as np
import pytest

from kerasdiffusion import StableDiffusion
from tests import reference as R


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "diffusers"
    R.make_reference_pipeline(seed=5).save_pretrained(path)
    return path


def generate(folder, precision):
    sd = StableDiffusion.from_pretrained(folder, img_width=64, img_height=64, jit_compile=R.JIT, precision=precision,
                                         scheduler="dpmpp_2m")
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype("float32")
    images = sd.generate_image(sd.encode_text("a cat"), batch_size=2, num_steps=10, diffusion_noise=noise,
                               verbose=False)
    return sd, images


# Stated tolerances on the 0..255 scale after 10 steps: bfloat16 keeps 8 mantissa bits, float16 keeps 11.
TOLERANCES = {"mixed_bfloat16": (4.0, 40), "mixed_float16": (1.0, 8)}


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_close_to_float32(folder, precision):
    _, reference = generate(folder, "float32")
    sd, images = generate(folder, precision)
    compute = "bfloat16" if precision == "mixed_bfloat16" else "float16"
    unet = sd.diffusion_model
    assert unet.get_layer("input_conv").dtype_policy.name == precision
    assert unet.get_layer("input_conv").kernel.dtype == "float32"  # variables stay float32
    assert keras.config.dtype_policy().name == "float32"  # the global policy is untouched
    assert unet.get_layer("mid_attn0_block0_self_q").compute_dtype == compute
    difference = np.abs(images.astype(int) - reference.astype(int))
    mean_limit, max_limit = TOLERANCES[precision]
    print(f"{precision}: mean abs {difference.mean():.2f}, max {difference.max()}")
    assert difference.mean() <= mean_limit and difference.max() <= max_limit
    assert images.std() > 20  # neither black nor flat
