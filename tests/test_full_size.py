"""Parity at the full Stable Diffusion 1.5 sizes (random weights, small latents). Heavy: marked ``full_size``."""

import gc

import keras
import numpy as np
import pytest
import torch

from kerasdiffusion import config as C
from kerasdiffusion.text_encoder import build_text_encoder
from kerasdiffusion.unet import build_unet
from kerasdiffusion.vae import build_decoder, build_image_encoder
from kerasdiffusion.weights import assign_weights
from tests import reference as R
from weights_conversion.keras_names import convert_text_encoder, convert_unet, convert_vae

pytestmark = pytest.mark.full_size
TOLERANCE = 1e-4

SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=32,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"
)


def parameters(module):
    return sum(p.numel() for p in module.parameters())


def test_full_unet(record_property):
    torch_unet = R.make_unet(seed=10, **SD15_UNET)
    weights = convert_unet(R.state_dict_numpy(torch_unet))
    config = C.unet_config_from_weights(weights)
    assert config == C.SD1_UNET
    model = build_unet(config)
    assign_weights(model, weights, "unet")
    del weights
    gc.collect()
    assert model.count_params() == parameters(torch_unet) == 859_520_964
    rng = np.random.default_rng(0)
    # Two latent shapes on TensorFlow; the non-square one alone on JAX, where each shape is a minute of XLA.
    shapes = [(1, 16, 24, 4)] if keras.backend.backend() == "jax" else [(1, 16, 16, 4), (1, 16, 24, 4)]
    for shape in shapes:
        latents = rng.standard_normal(shape).astype("float32")
        t = np.array([801.0], "float32")
        context = rng.standard_normal((1, 77, 768)).astype("float32")
        with torch.no_grad():
            expected = R.nhwc(torch_unet(R.nchw(latents), torch.from_numpy(t), torch.from_numpy(context)).sample)
        error = R.relative_error(model([latents, t, context]), expected)
        record_property(f"unet_{shape[1]}x{shape[2]}_relative_error", error)
        print(f"full UNet {shape}: relative max error {error:.2e}")
        assert error < TOLERANCE


def test_full_vae(record_property):
    torch_vae = R.make_vae(seed=11, **SD15_VAE)
    weights = convert_vae(R.state_dict_numpy(torch_vae))
    config = C.vae_config_from_weights(weights)
    assert config == C.SD_VAE
    encoder, decoder = build_image_encoder(config), build_decoder(config)
    for model in (encoder, decoder):
        assign_weights(model, {v.path: weights[v.path] for v in model.weights}, model.name)
    assert encoder.count_params() + decoder.count_params() == parameters(torch_vae) == 83_653_863
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (1, 128, 96, 3)).astype("float32")
    latents = rng.standard_normal((1, 16, 12, 4)).astype("float32")
    with torch.no_grad():
        moments = R.nhwc(torch_vae.quant_conv(torch_vae.encoder(R.nchw(images))))
        decoded = R.nhwc(torch_vae.decode(R.nchw(latents)).sample)
    for name, ours, expected in [("encoder", encoder(images), moments), ("decoder", decoder(latents), decoded)]:
        error = R.relative_error(ours, expected)
        record_property(f"vae_{name}_relative_error", error)
        print(f"full VAE {name}: relative max error {error:.2e}")
        assert error < TOLERANCE


def test_full_text_encoder(record_property):
    torch_model = R.make_text_encoder(seed=12, **SD15_TEXT)
    weights = convert_text_encoder(R.state_dict_numpy(torch_model))
    config = C.text_encoder_config_from_weights(weights)
    assert config == C.SD1_TEXT_ENCODER
    model = build_text_encoder(config)
    assign_weights(model, weights, "text_encoder")
    assert model.count_params() == parameters(torch_model) == 123_060_480
    tokens = np.random.default_rng(2).integers(0, 49408, (2, 77)).astype("int32")
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(tokens).long()).last_hidden_state.numpy()
    error = R.relative_error(model(tokens), expected)
    record_property("text_encoder_relative_error", error)
    print(f"full text encoder: relative max error {error:.2e}")
    assert error < TOLERANCE
