"""Parity of our three networks with the PyTorch reference on tiny configs, from diffusers state dicts."""

import numpy as np
import pytest
import torch

from kerasdiffusion import config as C
from kerasdiffusion.layers import to_be_loaded
from kerasdiffusion.text_encoder import build_text_encoder
from kerasdiffusion.unet import build_unet
from kerasdiffusion.vae import build_decoder, build_image_encoder
from kerasdiffusion.weights import assign_weights
from tests import reference as R
from weights_conversion.errors import CheckpointError
from weights_conversion.keras_names import convert_text_encoder, convert_unet, convert_vae

TOLERANCE = 1e-4


def keras_unet(torch_unet):
    weights = convert_unet(R.state_dict_numpy(torch_unet))
    with to_be_loaded():  # as loading builds them: every parity test also checks that nothing is left unset
        model = build_unet(C.unet_config_from_weights(weights))
    assign_weights(model, weights, "unet")
    return model


def run_unet(torch_unet, model, shape, seed=0, tokens=77):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shape).astype("float32")
    timesteps = np.array([981.0, 1.5, 500.0][: shape[0]], "float32")
    context = rng.standard_normal((shape[0], tokens, model.inputs[2].shape[-1])).astype("float32")
    with torch.no_grad():
        expected = torch_unet(R.nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    ours = model([latents, timesteps, context])
    return np.asarray(ours), R.nhwc(expected)


@pytest.mark.parametrize("shape", [(2, 8, 8, 4), (1, 10, 6, 4), (2, 5, 7, 4)])
def test_unet_matches_diffusers(shape):
    torch_unet = R.make_unet()
    ours, expected = run_unet(torch_unet, keras_unet(torch_unet), shape)
    assert ours.shape == expected.shape
    assert R.relative_error(ours, expected) < TOLERANCE


def test_unet_three_levels_nine_channels_odd_sizes():
    torch_unet = R.make_unet(
        in_channels=9,
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
    )
    model = keras_unet(torch_unet)
    ours, expected = run_unet(torch_unet, model, (2, 9, 13, 9))
    assert R.relative_error(ours, expected) < TOLERANCE


def test_vae_matches_diffusers():
    torch_vae = R.make_vae()
    weights = convert_vae(R.state_dict_numpy(torch_vae))
    config = C.vae_config_from_weights(weights)
    encoder, decoder = build_image_encoder(config), build_decoder(config)
    split = {m.name: {v.path: weights[v.path] for v in m.weights} for m in (encoder, decoder)}
    assert sum(len(w) for w in split.values()) == len(weights)
    assign_weights(encoder, split["image_encoder"], "vae encoder")
    assign_weights(decoder, split["decoder"], "vae decoder")
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype("float32")
    latents = rng.standard_normal((2, 3, 5, 4)).astype("float32")
    with torch.no_grad():
        moments = torch_vae.quant_conv(torch_vae.encoder(R.nchw(images)))
        decoded = torch_vae.decode(R.nchw(latents)).sample
    assert R.relative_error(encoder(images), R.nhwc(moments)) < TOLERANCE
    assert R.relative_error(decoder(latents), R.nhwc(decoded)) < TOLERANCE


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_text_encoder_matches_transformers(activation):
    torch_model = R.make_text_encoder(hidden_act=activation)
    weights = convert_text_encoder(R.state_dict_numpy(torch_model))
    family = C.SD1 if activation == "quick_gelu" else C.SD2
    model = build_text_encoder(C.text_encoder_config_from_weights(weights, family))
    assign_weights(model, weights, "text_encoder")
    tokens = np.random.default_rng(4).integers(0, 49408, (3, 77)).astype("int32")
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(tokens).long()).last_hidden_state.numpy()
    assert R.relative_error(model(tokens), expected) < TOLERANCE


def test_strict_loading_names_missing_unexpected_and_misshaped():
    torch_unet = R.make_unet()
    weights = convert_unet(R.state_dict_numpy(torch_unet))
    model = build_unet(C.unet_config_from_weights(weights))
    broken = dict(weights)
    del broken["mid_res0_conv1/kernel"]
    broken["mid_res0_extra/kernel"] = np.zeros(3)
    broken["output_conv/bias"] = np.zeros(5)
    with pytest.raises(CheckpointError) as error:
        assign_weights(model, broken, "unet")
    message = str(error.value)
    assert "missing tensors: mid_res0_conv1/kernel" in message
    assert "unexpected tensors: mid_res0_extra/kernel" in message
    assert "output_conv/bias (checkpoint (5,), model (4,))" in message


def test_unknown_source_tensor_is_named():
    state = R.state_dict_numpy(R.make_unet())
    state["down_blocks.0.mystery.weight"] = np.zeros(3)
    with pytest.raises(CheckpointError, match=r"down_blocks\.0\.mystery\.weight"):
        convert_unet(state)


def test_networks_save_to_keras_files_and_load_back(tmp_path):
    """Every custom layer is registered: each network round-trips through a `.keras` file unchanged."""
    import keras

    unet = keras_unet(R.make_unet())
    text_weights = convert_text_encoder(R.state_dict_numpy(R.make_text_encoder()))
    with to_be_loaded():
        text_encoder = build_text_encoder(C.text_encoder_config_from_weights(text_weights))
    assign_weights(text_encoder, text_weights, "text_encoder")
    vae_config = C.vae_config_from_weights(convert_vae(R.state_dict_numpy(R.make_vae())))
    rng = np.random.default_rng(9)
    cases = {
        "unet": (unet, [rng.standard_normal((2, 8, 8, 4)).astype("float32"), np.array([3.0, 700.0], "float32"),
                        rng.standard_normal((2, 77, 64)).astype("float32")]),
        "text_encoder": (text_encoder, rng.integers(0, 49408, (2, 77)).astype("int32")),
        "decoder": (build_decoder(vae_config), rng.standard_normal((1, 3, 5, 4)).astype("float32")),
        "image_encoder": (build_image_encoder(vae_config), rng.uniform(-1, 1, (1, 16, 8, 3)).astype("float32")),
    }
    for name, (model, inputs) in cases.items():
        path = tmp_path / f"{name}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_array_equal(np.asarray(loaded(inputs)), np.asarray(model(inputs)), err_msg=name)


def test_networks_built_to_be_loaded_skip_random_initialisation_only_inside_the_block():
    """Loading builds without Keras' random draws (their cost is the build's, and one compile per shape on
    JAX); a network built outside the block, as training from scratch does, still gets random weights."""
    config = C.VAEConfig(block_channels=(32, 32), layers_per_level=1)
    with to_be_loaded():
        unset = build_decoder(config)
    fresh = build_decoder(config)
    assert all(not np.any(v.numpy()) for v in unset.weights)
    kernels = [v for v in fresh.weights if v.path.endswith("/kernel")]
    assert kernels and all(np.std(v.numpy()) > 0 for v in kernels)
    assert any(np.all(v.numpy() == 1) for v in fresh.weights if v.path.endswith("/gamma"))


def test_networks_compose_inside_a_users_model():
    """The UNet is an ordinary Keras layer: a user's functional model can call it."""
    import keras

    unet = keras_unet(R.make_unet())
    latents = keras.Input((8, 8, 4))
    context = keras.Input((77, 64))
    timesteps = keras.Input((), dtype="float32")
    prediction = unet([keras.layers.Rescaling(0.5)(latents), timesteps, context])
    model = keras.Model([latents, timesteps, context], keras.layers.Activation("tanh")(prediction))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 8, 8, 4)).astype("float32")
    t = np.array([10.0], "float32")
    c = rng.standard_normal((1, 77, 64)).astype("float32")
    np.testing.assert_allclose(np.asarray(model([x, t, c])), np.tanh(np.asarray(unet([0.5 * x, t, c]))), atol=1e-6)
