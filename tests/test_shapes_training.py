"""Training the built-in model: the autoencoder's objective and step against PyTorch, the latent rescaling,
and the recipe end to end (tiny), killed and resumed to the same weights.

The autoencoder's reference is diffusers' ``AutoencoderKL`` on the same weights: its posterior
(``DiagonalGaussianDistribution``: ``mean + std * noise``, ``kl()``), its decoder, the mean absolute error (or,
given pixel weights, its weighted mean) plus the weighted KL over the number of pixel values, and one SGD step
of ``torch.optim``.
"""

import copy
import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from kerasdiffusion import load_components, shapes
from kerasdiffusion.training import run as run_module
from kerasdiffusion.training import shapes_model
from kerasdiffusion.training.autoencoder import AutoencoderTrainer, kl_divergence, match_scaling_factor
from tests import reference as R
from weights_conversion import keras_names
from weights_conversion.errors import CheckpointError

KL_WEIGHT = 0.05  # large, so that the KL term weighs in the comparison


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pipeline = R.make_reference_pipeline(seed=90)
    folder = tmp_path_factory.mktemp("tiny") / "diffusers"
    pipeline.save_pretrained(folder)
    return pipeline, load_components(folder, precision="float32", cache=False, progress=False)


def batch(parts, weighted=False):
    rng = np.random.default_rng(4)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    latent = parts.image_encoder(images).shape
    data = {"images": images, "noise": rng.standard_normal((*latent[:-1], latent[-1] // 2)).astype("float32")}
    if weighted:
        data["weights"] = rng.choice([1.0, 4.0], size=(2, 32, 32)).astype("float32")
    return data


def reference_loss(vae, data):
    images, noise = R.nchw(data["images"]), R.nchw(data["noise"])
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
    error = (reconstruction - images).abs().mean(dim=1)  # [B, H, W]
    weights = torch.from_numpy(data.get("weights", np.ones(error.shape, "float32")))
    error = (weights * error).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))
    return error.mean() + KL_WEIGHT * posterior.kl().mean() / images[0].numel()


def test_kl_divergence_is_diffusers(reference):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = np.random.default_rng(0).standard_normal((3, 4, 5, 8)).astype("float32")
    expected = DiagonalGaussianDistribution(R.nchw(moments)).kl().numpy()
    np.testing.assert_allclose(np.asarray(kl_divergence(moments)), expected, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "pixel-weights"])
def test_autoencoder_step_matches_pytorch(reference, record_property, weighted):
    pipeline, parts = reference
    encoder, decoder = (keras.models.clone_model(m) for m in (parts.image_encoder, parts.decoder))
    for clone, original in ((encoder, parts.image_encoder), (decoder, parts.decoder)):
        clone.set_weights(original.get_weights())
    data, lr = batch(parts, weighted), 0.5
    before = {v.path: np.array(v.numpy()) for v in encoder.weights + decoder.weights}
    trainer = AutoencoderTrainer(encoder, decoder, kl_weight=KL_WEIGHT)
    trainer.compile(optimizer=keras.optimizers.SGD(lr), run_eagerly=True)
    ours_loss = float(trainer.train_on_batch(data, return_dict=True)["loss"])
    after = {v.path: np.array(v.numpy()) for v in encoder.weights + decoder.weights}

    vae = copy.deepcopy(pipeline.vae).train()
    optimizer = torch.optim.SGD(vae.parameters(), lr=lr)
    loss = reference_loss(vae, data)
    loss.backward()
    optimizer.step()
    expected = keras_names.convert_vae(R.state_dict_numpy(vae))

    assert ours_loss == pytest.approx(float(loss.detach()), rel=1e-5)
    assert sorted(after) == sorted(expected)
    weights = max(R.relative_error(after[p], expected[p]) for p in expected)
    updates = R.relative_error(np.concatenate([(after[p] - before[p]).ravel() for p in expected]),
                               np.concatenate([(expected[p] - before[p]).ravel() for p in expected]))
    record_property("relative_errors", {"weights": weights, "updates": updates})
    assert weights < 1e-5 and updates < 1e-3


def test_rescaled_latents_have_unit_spread_and_decode_the_same(reference):
    _, parts = reference
    encoder, decoder = (keras.models.clone_model(m) for m in (parts.image_encoder, parts.decoder))
    for clone, original in ((encoder, parts.image_encoder), (decoder, parts.decoder)):
        clone.set_weights(original.get_weights())
    images = np.random.default_rng(2).uniform(-1, 1, (8, 32, 32, 3)).astype("float32")

    def means(model):
        moments = np.asarray(model(images))
        return moments[..., : moments.shape[-1] // 2]

    decoded = np.asarray(decoder(means(encoder)))
    factor = match_scaling_factor(encoder, decoder, images, 0.18215)
    assert factor != pytest.approx(1.0)
    assert (means(encoder) * 0.18215).std() == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(np.asarray(decoder(means(encoder))), decoded, atol=2e-5)


def test_box_weights_cover_every_shape_pixel_and_nothing_far_from_it():
    scenes = shapes.sample_scenes(0, 60)
    weights = shapes_model.box_weights(scenes, 4.0)
    assert weights.shape == (60, 64, 64) and set(np.unique(weights)) == {1.0, 4.0}
    for scene, weight in zip(scenes, weights):
        covered = shapes._coverage(scene) > 0
        assert (weight[covered] == 4).all(), scene
        ys, xs = np.nonzero(weight == 4)
        side = shapes.SIZES[scene.size] + 4  # the box, 2 pixels wider each way
        assert xs.max() - xs.min() + 1 <= side and ys.max() - ys.min() + 1 <= side, scene
    assert (shapes_model.box_weights(scenes, 1.0) == 1).all()
    with pytest.raises(ValueError, match="box weight must be positive"):
        shapes_model.box_weights(scenes, 0.0)


TINY_RECIPE = shapes_model.Recipe(pictures=8, vae_steps=1, vae_batch_size=2, diffusion_steps=3, batch_size=2,
                                  warmup_steps=1)


class Killed(Exception):
    pass


@pytest.fixture
def tiny_networks(monkeypatch):
    """The recipe's networks, shallower (the same family and kinds of layers), so that each stage builds fast."""
    monkeypatch.setattr(shapes_model, "TEXT_ENCODER", dataclasses.replace(shapes_model.TEXT_ENCODER, num_layers=1,
                                                                          mlp_dim=64))
    monkeypatch.setattr(shapes_model, "UNET", dataclasses.replace(shapes_model.UNET, block_channels=(32, 32),
                                                                  attention_levels=(False, True)))
    monkeypatch.setattr(shapes_model, "VAE", dataclasses.replace(shapes_model.VAE, block_channels=(16, 16, 16, 16)))
    monkeypatch.setattr(shapes_model, "CHECKPOINT_EVERY", 1)


def test_the_recipe_trains_a_loadable_model_and_resumes_after_a_kill(tmp_path, monkeypatch, tiny_networks):
    """The whole recipe, tiny: a converted folder that loads as the shapes family at 64x64. A run killed in the
    diffusion stage and run again with the same command ends with the same weights as an uninterrupted run.
    The steps run eagerly: tracing each stage's training step took most of this test's time."""
    whole = shapes_model.train(TINY_RECIPE, tmp_path / "whole", tmp_path / "whole.work", jit_compile=False,
                               run_eagerly=True)

    steps = {"count": 0}
    progress = run_module.ProgressBar.on_train_batch_end

    def dying(self, batch, logs=None):
        progress(self, batch, logs)
        steps["count"] += 1
        if steps["count"] == TINY_RECIPE.vae_steps + 2:  # the diffusion stage's second step, checkpointed
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(run_module.ProgressBar, "on_train_batch_end", dying)
        with pytest.raises(Killed):
            shapes_model.train(TINY_RECIPE, tmp_path / "resumed", tmp_path / "resumed.work", jit_compile=False,
                               run_eagerly=True)
    assert not os.path.exists(tmp_path / "resumed")  # nothing half-written
    resumed = shapes_model.train(TINY_RECIPE, tmp_path / "resumed", tmp_path / "resumed.work", jit_compile=False,
                                 run_eagerly=True)

    for network in ("text_encoder", "unet", "vae"):
        ours, theirs = (load_file(os.path.join(folder, f"{network}.safetensors")) for folder in (resumed, whole))
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{network}: {key}")

    with pytest.raises(ValueError, match="another recipe"):
        shapes_model.train(dataclasses.replace(TINY_RECIPE, pictures=9), tmp_path / "other", tmp_path / "whole.work")

    parts = load_components(whole, progress=False)
    assert parts.image_size == 64 and parts.family.name == "shapes"
    assert decoder_groups(parts) == {shapes_model.VAE.norm_groups}  # the manifest's, not SD 1.x's 32
    with open(os.path.join(whole, "kerasdiffusion.json")) as f:  # what the weights were trained with
        manifest = json.load(f)
    assert manifest["norm_groups"] == {"unet": shapes_model.UNET.norm_groups, "vae": shapes_model.VAE.norm_groups}
    assert manifest["text_encoder_heads"] == shapes_model.TEXT_ENCODER.num_heads == text_heads(parts) == 4
    # and the manifest's counts are the ones built, whatever the family says
    with open(os.path.join(whole, "kerasdiffusion.json"), "w") as f:
        json.dump({**manifest, "norm_groups": {"unet": 4, "vae": 2}, "text_encoder_heads": 2}, f)
    parts = load_components(whole, progress=False)
    assert decoder_groups(parts) == {2} and parts.family.unet.norm_groups == 4 and text_heads(parts) == 2
    with open(os.path.join(whole, "kerasdiffusion.json"), "w") as f:
        json.dump({**manifest, "text_encoder_heads": 3}, f)
    with pytest.raises(CheckpointError, match="3 attention heads do not divide the text encoder's width 64"):
        load_components(whole, progress=False)
    with open(os.path.join(whole, "kerasdiffusion.json"), "w") as f:
        json.dump({**manifest, "family": "sd9"}, f)
    with pytest.raises(CheckpointError, match="unknown model family 'sd9'; this version knows sd1, sd2"):
        load_components(whole, progress=False)


def text_heads(parts):
    """The text encoder's attention heads (every layer's: one count)."""
    (count,) = {layer.num_heads for layer in parts.text_encoder.layers if hasattr(layer, "num_heads")}
    return count


def decoder_groups(parts):
    return {layer.groups for layer in parts.decoder.layers if isinstance(layer, keras.layers.GroupNormalization)}
