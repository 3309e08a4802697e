"""Exported models load in diffusers as the model they came from, and load back here bit for bit (tiny models).

A tiny random diffusers pipeline is loaded here, exported as a diffusers folder and as one original (LDM) file.
diffusers' ``from_pretrained`` must read the folder into exactly the tensors and configs it started from (and so
the same outputs as ours); diffusers' own single-file converters (``single_file_utils``) must turn the file into
the same tensors, so the test does not trust our key map twice; and our loader must read both exports back into
bit-identical weights.
"""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import single_file_utils as dsf

import kerasdiffusion as kd
from kerasdiffusion.cli import main as cli_main
from kerasdiffusion.exporting import network_weights
from tests import reference as R
from tests.test_conversion import assert_matches, our_outputs, reference_outputs
from tests.test_ldm import to_numpy, to_torch, without_text_model_prefix
from weights_conversion.readers import read_state_dict

NETWORKS = ("unet", "vae", "text_encoder")


def exported(tmp_path_factory, family):
    """The reference pipeline, our components loaded from it, and both exports of them."""
    folder = tmp_path_factory.mktemp(f"export-{family}")
    pipeline = R.make_reference_pipeline(seed=70, family=family)
    pipeline.save_pretrained(folder / "source")
    components = kd.load_components(folder / "source", precision="float32", cache=False, progress=False)
    kd.export(components, folder / "diffusers")
    kd.export(components, folder / "model.safetensors", format="single-file")
    return dict(pipeline=pipeline, components=components, source=folder / "source", folder=folder / "diffusers",
                file=folder / "model.safetensors")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return exported(tmp_path_factory, "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return exported(tmp_path_factory, "sd2")


def state_dicts(pipeline):
    return {network: R.state_dict_numpy(getattr(pipeline, network)) for network in NETWORKS}


def assert_same_tensors(actual, expected, what):
    assert sorted(actual) == sorted(expected), what
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=f"{what}: {key}")


def same_config_value(a, b):
    """Equal, a tuple equal to a list, or a per-level list repeating one number (diffusers reads both alike)."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a, b = (list(v) if isinstance(v, (list, tuple)) else v for v in (a, b))
        a = [a] * len(b) if not isinstance(a, list) else a
        b = [b] * len(a) if not isinstance(b, list) else b
    return a == b


def assert_same_weights(components, expected):
    ours, theirs = network_weights(components), network_weights(expected)
    for network in NETWORKS:
        assert_same_tensors(ours[network], theirs[network], network)


# ------------------------------------------------------------------------------------------------ diffusers


def assert_same_configs(original, loaded, network):
    theirs, ours = dict(original.config), dict(loaded.config)
    different = {k for k in theirs if k != "sample_size" and not k.startswith("_")
                 and not same_config_value(theirs[k], ours[k])}
    assert not different, (network, {k: (theirs[k], ours[k]) for k in different})


def test_diffusers_folder_loads_in_diffusers_as_the_source(sd1):
    """Names, layouts and configs: diffusers reads the folder into the very tensors and configs it started from,
    and computes our UNet's, VAE's and text encoder's outputs."""
    loaded = StableDiffusionPipeline.from_pretrained(sd1["folder"], local_files_only=True)
    original = sd1["pipeline"]
    for network in NETWORKS:
        assert_same_tensors(R.state_dict_numpy(getattr(loaded, network)), state_dicts(original)[network], network)
    for network in ("unet", "vae"):
        assert_same_configs(getattr(original, network), getattr(loaded, network), network)
    # the model's own size: the source's UNet sample_size, carried through Components.image_size
    assert loaded.unet.config.sample_size == original.unet.config.sample_size == sd1["components"].image_size // 8
    assert loaded.vae.config.sample_size == sd1["components"].image_size
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                "layer_norm_eps", "vocab_size", "max_position_embeddings"):
        assert getattr(original.text_encoder.config, key) == getattr(loaded.text_encoder.config, key), key
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(original.scheduler.config)
    assert loaded.tokenizer("a red fox").input_ids == original.tokenizer("a red fox").input_ids
    assert_matches(our_outputs(sd1["components"]), reference_outputs(loaded))  # and so our outputs, in diffusers


def test_sd2_diffusers_folder_matches_the_source(sd2):
    """SD 2.x: linear projections, per-level heads, upcast attention, the OpenCLIP-shaped tower, "!" padding,
    v-prediction (the weights read as files, the UNet and tokenizer by diffusers / transformers)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    original, folder = sd2["pipeline"], sd2["folder"]
    files = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
             "text_encoder": "text_encoder/model.safetensors"}
    expected = state_dicts(original)
    for network, file in files.items():  # the text encoder with transformers < 5's "text_model." (both read it)
        assert_same_tensors(without_text_model_prefix(read_state_dict(folder / file)),
                            without_text_model_prefix(expected[network]), network)
    assert_same_configs(original.unet, UNet2DConditionModel.from_pretrained(folder / "unet"), "unet")
    text = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_act) == (1024, 2, "gelu")
    assert json.loads((folder / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer.pad_token == "!" and tokenizer("a red fox").input_ids == original.tokenizer("a red fox").input_ids


def test_a_diffusers_folder_says_its_text_encoders_heads(tmp_path):
    """The weights cannot tell a text encoder's heads: a diffusers folder's config says them (here 4 of 16 at
    width 64, where CLIP's 64-wide heads would give 1). They are built, so our text encoder computes
    transformers', and written again on export."""
    from transformers import CLIPTextConfig

    pipeline = R.make_reference_pipeline(seed=71)
    pipeline.register_modules(text_encoder=R.make_text_encoder(73, num_attention_heads=4))
    pipeline.save_pretrained(tmp_path / "source")
    components = kd.load_components(tmp_path / "source", precision="float32", cache=False, progress=False)
    assert components.family.text_encoder.num_heads == 4
    assert_matches(our_outputs(components), reference_outputs(pipeline))
    kd.export(components, tmp_path / "diffusers")
    assert CLIPTextConfig.from_pretrained(tmp_path / "diffusers" / "text_encoder").num_attention_heads == 4


# ------------------------------------------------------------------------------------------------ single file


def test_single_file_converts_back_with_diffusers_own_converters(sd1):
    checkpoint = to_torch(read_state_dict(sd1["file"]))
    assert any(key.startswith("cond_stage_model.transformer.text_model.") for key in checkpoint)
    original = sd1["pipeline"]
    converted = {
        "unet": dsf.convert_ldm_unet_checkpoint(checkpoint, dict(original.unet.config)),
        "vae": dsf.convert_ldm_vae_checkpoint(checkpoint, dict(original.vae.config)),
        "text_encoder": dsf.convert_ldm_clip_checkpoint(checkpoint),
    }
    expected = state_dicts(original)
    for network in ("unet", "vae"):
        assert_same_tensors(to_numpy(converted[network]), expected[network], network)
    assert_same_tensors(without_text_model_prefix(to_numpy(converted["text_encoder"])),
                        without_text_model_prefix(expected["text_encoder"]), "text_encoder")


def test_sd2_single_file_holds_an_open_clip_tower(sd2):
    checkpoint = read_state_dict(sd2["file"])
    width = R.SD2_TEXT_ENCODER["hidden_size"]
    assert checkpoint["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert checkpoint["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear projections
    layers = R.TINY_TEXT_ENCODER["num_hidden_layers"]
    # the block SD 2.x never runs (it reads the penultimate layer) stands as zeros after ours
    assert not checkpoint[f"cond_stage_model.model.transformer.resblocks.{layers}.mlp.c_fc.weight"].any()
    assert f"cond_stage_model.model.transformer.resblocks.{layers + 1}.ln_1.weight" not in checkpoint


def test_sd2_single_file_loads_in_diffusers_as_the_source(sd2, record_property):
    """``from_single_file`` reads the SD 2.x file (OpenCLIP tower, linear projections) into the very tensors it
    started from, and so our outputs. Offline, diffusers takes the networks' sizes from a diffusers folder's
    configs (``config=``: the source pipeline's, nothing of ours) instead of the Hub's SD 2 repository; the
    weights come from the file alone, through diffusers' own converters."""
    loaded = StableDiffusionPipeline.from_single_file(str(sd2["file"]), config=str(sd2["source"]),
                                                      local_files_only=True)
    expected = state_dicts(sd2["pipeline"])
    for network in ("unet", "vae"):
        assert_same_tensors(R.state_dict_numpy(getattr(loaded, network)), expected[network], network)
    assert_same_tensors(without_text_model_prefix(R.state_dict_numpy(loaded.text_encoder)),
                        without_text_model_prefix(expected["text_encoder"]), "text_encoder")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 5, 7, 4)).astype("float32")
    timesteps = np.array([999.0, 3.0], "float32")
    context = rng.standard_normal((2, 77, R.SD2_TEXT_ENCODER["hidden_size"])).astype("float32")
    images = rng.uniform(-1, 1, (1, 40, 56, 3)).astype("float32")
    tokens = rng.integers(0, 49408, (2, 77)).astype("int32")
    ours = sd2["components"]
    with torch.no_grad():
        errors = {
            "unet": R.relative_error(np.asarray(ours.diffusion_model([latents, timesteps, context])), R.nhwc(
                loaded.unet(R.nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)),
            "decoder": R.relative_error(np.asarray(ours.decoder(latents)),
                                        R.nhwc(loaded.vae.decode(R.nchw(latents)).sample)),
            "image_encoder": R.relative_error(np.asarray(ours.image_encoder(images)),
                                              R.nhwc(loaded.vae.quant_conv(loaded.vae.encoder(R.nchw(images))))),
            "text_encoder": R.relative_error(np.asarray(ours.text_encoder(tokens)), loaded.text_encoder(
                torch.from_numpy(tokens).long()).last_hidden_state.numpy()),
        }
    record_property("relative_errors", errors)
    assert max(errors.values()) < 1e-4, errors


# ------------------------------------------------------------------------------------------------ ours


@pytest.mark.parametrize("family, form", [("sd1", "folder"), ("sd1", "file"), ("sd2", "file")])
def test_exports_load_back_bit_identical(request, family, form):
    model = request.getfixturevalue(family)
    back = kd.load_components(model[form], precision="float32", cache=False, progress=False)
    assert_same_weights(back, model["components"])
    assert back.family is model["components"].family
    if form == "folder":
        assert back.image_size == model["components"].image_size == 64
        assert back.scheduler_config == model["components"].scheduler_config
        assert back.tokenizer("a red fox").tolist() == model["components"].tokenizer("a red fox").tolist()


# ------------------------------------------------------------------------------------------------ command line


def test_cli_export_writes_atomically_and_refuses_bad_usage(sd1, tmp_path, capfd):
    source = sd1["folder"]
    assert cli_main(["export", str(source), str(tmp_path / "out.safetensors"), "--format", "single-file", "-q"]) == 0
    assert read_state_dict(tmp_path / "out.safetensors").keys() == read_state_dict(sd1["file"]).keys()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    cases = {
        "non-empty output": [str(source), str(tmp_path / "taken")],
        "existing file": [str(source), str(tmp_path / "out.safetensors"), "--format", "single-file"],
        "not safetensors": [str(source), str(tmp_path / "model.ckpt"), "--format", "single-file"],
        "missing source": [str(tmp_path / "nowhere"), str(tmp_path / "new")],
    }
    for case, args in cases.items():
        assert cli_main(["export", *args]) == 2, case
        lines = capfd.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, lines)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export", str(source), str(tmp_path / "new"), "--format", "ckpt"])
    assert exit_.value.code == 2
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors", "taken"]  # nothing half-written, no staging left
    assert json.loads((sd1["folder"] / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
