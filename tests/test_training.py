"""Training (tiny model, float32): the loss and one optimizer step against diffusers' recipe, learning, data.

The reference is diffusers' ``train_text_to_image.py`` written out here on the same weights: a DDPMScheduler
built from the checkpoint's scheduler config noises the latents, the UNet predicts, ``F.mse_loss`` (min-SNR:
per item, times ``min(snr, γ) / snr`` or ``/ (snr + 1)``). The same timesteps and noise are given to both.
LoRA's step is peft's (``LoraConfig`` on the diffusers UNet, its factors set to ours).
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
from PIL import Image

from kerasdiffusion import load_components
from kerasdiffusion.schedulers import SchedulerConfig
from kerasdiffusion.training import Trainer
from kerasdiffusion.training.data import image_caption_dataset, with_prior_preservation
from tests import reference as R
from weights_conversion import keras_names

LATENT, BATCH, GAMMA = 8, 2, 5.0
CAPTIONS = ["a red cube on a table", "a watercolor fox"]
# Our LoRA targets and the diffusers UNet modules peft adapts for them (LoCon: the ResNet blocks' and the
# resamplers' convolutions).
PEFT_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "feed_forward": ["ff.net.0.proj", "ff.net.2"],
    "convolutions": ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pipeline = R.make_reference_pipeline(seed=70)
    folder = tmp_path_factory.mktemp("tiny") / "diffusers"
    pipeline.save_pretrained(folder)
    return pipeline, folder


@pytest.fixture(scope="module")
def parts(reference):
    return load_components(reference[1], precision="float32", cache=False, progress=False)


def draws(seed=0, batch=BATCH):
    rng = np.random.default_rng(seed)
    return dict(latents=rng.standard_normal((batch, LATENT, LATENT, 4)).astype("float32"),
                timesteps=np.array([17, 912, 450, 3][:batch], "int32"),
                noise=rng.standard_normal((batch, LATENT, LATENT, 4)).astype("float32"))


def diffusers_loss(unet, latents, context, timesteps, noise, prediction_type, snr_gamma=None):
    """diffusers' train_text_to_image.py loss, on NHWC numpy inputs."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler.from_config(dict(R.SD15_SCHEDULER, prediction_type=prediction_type))
    latents, noise, timesteps = R.nchw(latents), R.nchw(noise), torch.from_numpy(timesteps).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    model_pred = unet(noisy, timesteps, torch.as_tensor(context)).sample
    if snr_gamma is None:
        return torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    loss = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, GAMMA])
def test_loss_matches_diffusers_recipe(reference, parts, prediction_type, snr_gamma, record_property):
    pipeline, _ = reference
    config = dataclasses.replace(parts.scheduler_config, prediction_type=prediction_type)
    trainer = Trainer(dataclasses.replace(parts, scheduler_config=config), method="full", snr_gamma=snr_gamma)
    d = draws()
    context = np.random.default_rng(1).standard_normal((BATCH, 77, 64)).astype("float32")
    ours = float(np.mean(trainer.diffusion_loss(d["latents"], context, d["timesteps"], d["noise"])))
    with torch.no_grad():
        expected = float(diffusers_loss(pipeline.unet, d["latents"], context, d["timesteps"], d["noise"],
                                        prediction_type, snr_gamma))
    record_property("relative_error", abs(ours - expected) / expected)
    assert ours == pytest.approx(expected, rel=1e-5)


def text_context(pipeline, token_ids):
    with torch.no_grad():
        return pipeline.text_encoder(torch.from_numpy(token_ids).long())[0]


def torch_step(unet, parameters, pipeline, batch, lr):
    """One SGD step of diffusers' recipe on ``parameters``."""
    optimizer = torch.optim.SGD(parameters, lr=lr)
    optimizer.zero_grad()
    loss = diffusers_loss(unet, batch["latents"], text_context(pipeline, batch["token_ids"]), batch["timesteps"],
                          batch["noise"], "epsilon")
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def keras_step(trainer, batch, lr):
    trainer.compile(optimizer=keras.optimizers.SGD(lr), run_eagerly=True)
    return float(trainer.train_on_batch(batch, return_dict=True)["loss"])


def step_batch(parts):
    return dict(draws(seed=3), token_ids=parts.tokenizer(CAPTIONS))


def test_full_step_matches_pytorch(reference, parts, record_property):
    pipeline, _ = reference
    unet = copy.deepcopy(pipeline.unet).train()
    batch, lr = step_batch(parts), 0.5
    before = {v.path: np.array(v.numpy()) for v in parts.diffusion_model.weights}
    trainer = Trainer(parts, method="full")
    try:
        ours_loss = keras_step(trainer, batch, lr)
        after = {v.path: np.array(v.numpy()) for v in parts.diffusion_model.weights}
    finally:
        for v in parts.diffusion_model.weights:  # the module's other tests need the weights as loaded
            v.assign(before[v.path])
    expected_loss = torch_step(unet, unet.parameters(), pipeline, batch, lr)
    expected = keras_names.convert_unet(R.state_dict_numpy(unet))
    assert ours_loss == pytest.approx(expected_loss, rel=1e-5)
    errors = step_errors(before, after, expected)
    record_property("relative_errors", errors)
    assert errors["weights"] < 1e-5
    assert errors["updates"] < 1e-3  # the step itself, not only the weights it moved


def test_full_step_with_the_text_encoder_matches_pytorch(reference, parts, record_property):
    """``train_text_encoder=True``: one SGD step of the UNet and the text encoder together, as diffusers'
    recipe with both in the optimizer (transformers' CLIPTextModel, its context differentiated through)."""
    pipeline, _ = reference
    unet, text_encoder = copy.deepcopy(pipeline.unet).train(), copy.deepcopy(pipeline.text_encoder).train()
    batch, lr = step_batch(parts), 0.5
    networks = {"unet": parts.diffusion_model, "text_encoder": parts.text_encoder}
    before = {name: {v.path: np.array(v.numpy()) for v in model.weights} for name, model in networks.items()}
    trainer = Trainer(parts, method="full", train_text_encoder=True)
    try:
        ours_loss = keras_step(trainer, batch, lr)
        after = {name: {v.path: np.array(v.numpy()) for v in model.weights} for name, model in networks.items()}
    finally:
        for name, model in networks.items():  # the module's other tests need the weights as loaded
            for v in model.weights:
                v.assign(before[name][v.path])

    optimizer = torch.optim.SGD([*unet.parameters(), *text_encoder.parameters()], lr=lr)
    context = text_encoder(torch.from_numpy(batch["token_ids"]).long())[0]
    loss = diffusers_loss(unet, batch["latents"], context, batch["timesteps"], batch["noise"], "epsilon")
    loss.backward()
    optimizer.step()
    expected = {"unet": keras_names.convert_unet(R.state_dict_numpy(unet)),
                "text_encoder": keras_names.convert_text_encoder(R.state_dict_numpy(text_encoder))}
    assert ours_loss == pytest.approx(float(loss.detach()), rel=1e-5)
    errors = {name: step_errors(before[name], after[name], expected[name]) for name in networks}
    record_property("relative_errors", errors)
    for name in networks:
        assert errors[name]["weights"] < 1e-5, name
        assert errors[name]["updates"] < 1e-3, name
    moved = np.abs(after["text_encoder"]["token_embedding/embeddings"]
                   - before["text_encoder"]["token_embedding/embeddings"]).max()
    assert moved > 1e-6  # the text encoder was trained, not only the UNet


def step_errors(before, after, expected):
    """The largest relative error of a weight after the step, and the relative error of the whole update."""
    weights = max(R.relative_error(after[p], expected[p]) for p in expected)
    updates = R.relative_error(np.concatenate([(after[p] - before[p]).ravel() for p in expected]),
                               np.concatenate([(expected[p] - before[p]).ravel() for p in expected]))
    return {"weights": weights, "updates": updates}


def peft_unet(pipeline, rank, alpha, seed, target):
    from peft import LoraConfig

    unet = copy.deepcopy(pipeline.unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=PEFT_TARGETS[target]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:  # both factors non-zero, so that both get a gradient
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(p.shape[1]))
    return unet


def lora_modules(unet):
    """``{our kernel path: peft LoRA layer}``."""
    return {keras_names.rename_module(name, keras_names.UNET_RULES) + "/kernel": module
            for name, module in unet.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("target", list(PEFT_TARGETS))
def test_lora_step_matches_peft(reference, parts, target, record_property):
    pipeline, _ = reference
    rank, alpha, lr = 4, 8, 0.05
    unet = peft_unet(pipeline, rank, alpha, seed=4, target=target)
    modules = lora_modules(unet)
    trainer = Trainer(parts, method="lora", rank=rank, alpha=alpha, targets=target)
    factors = {kernel.path: update for _, kernel, update in trainer._adaptation.lora_kernels}
    assert sorted(factors) == sorted(modules)  # the same layers adapted
    for path, module in modules.items():
        factors[path].down.assign(our_layout(module.lora_A["default"].weight))
        factors[path].up.assign(our_layout(module.lora_B["default"].weight).reshape(factors[path].up.shape))
    batch = step_batch(parts)
    before = {path: (update.down.numpy(), update.up.numpy()) for path, update in factors.items()}
    ours_loss = keras_step(trainer, batch, lr)
    expected_loss = torch_step(unet, [p for n, p in unet.named_parameters() if "lora_" in n], pipeline, batch, lr)
    assert ours_loss == pytest.approx(expected_loss, rel=1e-5)
    ours, expected, start = flat_factors(factors, modules, before)
    errors = {"factors": R.relative_error(ours, expected), "updates": R.relative_error(ours - start, expected - start)}
    record_property("relative_errors", errors)
    assert errors["factors"] < 1e-5
    assert errors["updates"] < 1e-3
    assert len(trainer.trainable_variables) == 2 * len(modules)  # frozen kernels: no optimizer slots


def test_lora_step_under_mirrored_strategy_equals_one_device(reference, record_property):
    """Two logical CPU devices, one item each: the mirrored step equals the one-device step on both items
    (the per-replica loss is scaled so that the summed gradients are the global mean's)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-m", "tests.training_distribution_worker", str(reference[1])],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    record_property("mirrored_step", report)
    assert report["replicas"] == 2 and report["variable_kind"] == "MirroredVariable"
    assert report["step_size"] > 0 and report["step_relative_difference"] < 1e-4
    assert report["losses"][1] == pytest.approx(report["losses"][0], rel=1e-5)


def our_layout(weight):
    """A peft factor (linear ``[out, in]``, convolution ``[out, in, kh, kw]``) in our kernels' layout."""
    weight = weight.detach().numpy()
    return weight.T if weight.ndim == 2 else keras_names.conv_oihw_to_hwio(weight)


def flat_factors(factors, modules, before):
    """Ours after the step, peft's after the step and both before, each as one vector (our layout)."""
    ours, expected, start = [], [], []
    for path, module in modules.items():
        ours += [factors[path].down.numpy().ravel(), factors[path].up.numpy().ravel()]
        expected += [our_layout(module.lora_A["default"].weight).ravel(),
                     our_layout(module.lora_B["default"].weight).ravel()]
        start += [before[path][0].ravel(), before[path][1].ravel()]
    return np.concatenate(ours), np.concatenate(expected), np.concatenate(start)


# ----------------------------------------------------------------------------------- learning, data


def write_images(folder, count=4, size=64, captions=True):
    """Synthetic pictures: a coloured square on a plain background, each with a kohya caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    for i in range(count):
        pixels = np.full((size, size + 8 * i, 3), rng.integers(0, 256, 3), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        pixels[top : top + size // 2, left : left + size // 2] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"image{i}.png")
        if captions:
            (folder / f"image{i}.txt").write_text(f"a {['red', 'green', 'blue', 'white'][i % 4]} square")
    return folder


def evaluation_loss(trainer, images, token_ids):
    """The loss at fixed timesteps and noise, on the posterior means of the images (two timesteps each)."""
    moments = np.asarray(trainer.image_encoder(images))
    latents = np.repeat(moments[..., :4] * trainer.scaling_factor, 2, axis=0)
    context = np.repeat(np.asarray(trainer.encode_text(token_ids)), 2, axis=0)
    noise = np.random.default_rng(5).standard_normal(latents.shape).astype("float32")
    timesteps = np.linspace(50, 950, len(latents)).astype("int32")
    return float(np.mean(trainer.diffusion_loss(latents, context, timesteps, noise)))


def test_training_on_a_few_images_lowers_the_loss(parts, tmp_path):
    before_training = {v.path: np.array(v.numpy()) for v in parts.diffusion_model.weights}
    try:
        trained_and_exported(parts, tmp_path)
    finally:
        for v in parts.diffusion_model.weights:  # the module's other tests need the weights as loaded
            v.assign(before_training[v.path])


def trained_and_exported(parts, tmp_path):
    trainer = Trainer(parts, method="full", seed=0)
    data = image_caption_dataset(write_images(tmp_path / "images"), resolution=32, batch_size=2,
                                 tokenizer=trainer.tokenizer, repeat=True)
    batch = next(iter(image_caption_dataset(tmp_path / "images", resolution=32, batch_size=4, random_flip=False,
                                            tokenizer=trainer.tokenizer)))
    images, token_ids = batch["images"].numpy(), batch["token_ids"].numpy()
    before = evaluation_loss(trainer, images, token_ids)
    trainer.compile(optimizer=keras.optimizers.AdamW(3e-3), run_eagerly=True)  # a few steps: tracing would dominate
    history = trainer.fit(data, epochs=1, steps_per_epoch=5, verbose=0, shuffle=False)
    after = evaluation_loss(trainer, images, token_ids)
    assert np.isfinite(history.history["loss"]).all()
    assert after < 0.85 * before, (before, after)
    # the fine-tuned model, exported, is what diffusers loads
    from diffusers import UNet2DConditionModel

    trainer.save(tmp_path / "model", format="diffusers")
    latents, timesteps, context = unet_inputs()
    with torch.no_grad():
        unet = UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet")
        theirs = R.nhwc(unet(R.nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)
    assert R.relative_error(np.asarray(parts.diffusion_model([latents, timesteps, context])), theirs) < 1e-5


def test_textual_inversion_changes_only_the_new_rows(parts):
    trainer = Trainer(parts, method="textual_inversion", token="<tiny-cat>", initializer_token="cat", num_vectors=2)
    assert trainer.trainable_variables == [trainer.token_vectors]
    base_rows = parts.text_encoder.get_layer("token_embedding").input_dim
    cat = parts.tokenizer.encode("cat")[1]
    frozen = {v.path: np.array(v.numpy()) for v in [*trainer.text_encoder.weights, *parts.diffusion_model.weights]}
    initial = trainer.token_vectors.numpy().copy()
    np.testing.assert_array_equal(initial, frozen["token_embedding/embeddings"][[cat, cat]])
    batch = dict(draws(seed=2), token_ids=trainer.tokenizer(["a photo of <tiny-cat>", "<tiny-cat> on a sofa"]))
    trainer.compile(optimizer=keras.optimizers.SGD(10.0), run_eagerly=True)
    trainer.train_on_batch(batch)
    trainer.train_on_batch(batch)
    for v in [*trainer.text_encoder.weights, *parts.diffusion_model.weights]:
        np.testing.assert_array_equal(v.numpy(), frozen[v.path], err_msg=v.path)
    learned = trainer.token_vectors.numpy()
    assert np.abs(learned - initial).max() > 1e-4
    table = trainer.components.text_encoder.get_layer("token_embedding").embeddings.numpy()
    np.testing.assert_array_equal(table[:base_rows], frozen["token_embedding/embeddings"][:base_rows])
    np.testing.assert_array_equal(table[base_rows:], learned)


def test_dreambooth_weights_the_class_items(parts):
    trainer = Trainer(parts, method="dreambooth", prior_loss_weight=0.25)
    losses = np.array([1.0, 2.0, 4.0, 8.0], "float32")
    loss = trainer.compute_loss(x={"prior": np.array([0, 0, 1, 1], "float32")}, y_pred=losses)
    assert float(loss) == pytest.approx(1.5 + 0.25 * 6.0)  # train_dreambooth.py: instance mean + w * prior mean
    assert float(trainer.compute_loss(x={}, y_pred=losses)) == pytest.approx(3.75)


def test_dataset_layouts_and_errors(tmp_path):
    folder = write_images(tmp_path / "kohya", count=2)
    batch = next(iter(image_caption_dataset(folder, resolution=32, batch_size=2, shuffle=False, random_flip=False)))
    assert batch["images"].shape == (2, 32, 32, 3) and batch["token_ids"].shape == (2, 77)
    assert -1.0 <= float(np.min(batch["images"])) and float(np.max(batch["images"])) <= 1.0
    # image1 is 72 wide: resized to 32 high, 36 wide, then the middle 32 columns (torchvision's center crop)
    with Image.open(folder / "image1.png") as image:
        expected = np.asarray(image.convert("RGB").resize((36, 32), Image.BILINEAR), np.float32)[:, 2:34] / 127.5 - 1
    np.testing.assert_allclose(batch["images"][1], expected, atol=1e-6)
    from kerasdiffusion.tokenizer import CLIPTokenizer

    np.testing.assert_array_equal(batch["token_ids"][1], CLIPTokenizer()("a green square")[0])

    hf = write_images(tmp_path / "hf", count=2, captions=False)
    (hf / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"image{i}.png", "text": f"picture {i}"})
                                                 for i in range(2)))
    batch = next(iter(image_caption_dataset(hf, resolution=32, batch_size=2, shuffle=False)))
    np.testing.assert_array_equal(batch["token_ids"][0], CLIPTokenizer()("picture 0")[0])

    (folder / "image1.txt").unlink()
    with pytest.raises(ValueError, match="missing caption.*image1.png"):
        image_caption_dataset(folder, resolution=32)
    (folder / "image1.txt").write_text("x")
    (folder / "image0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="unreadable image .*image0.png"):
        image_caption_dataset(folder, resolution=32)
    with pytest.raises(ValueError, match="no 'text'"):
        (hf / "metadata.jsonl").write_text(json.dumps({"file_name": "image0.png"}))
        image_caption_dataset(hf, resolution=32)
    with pytest.raises(ValueError, match="multiple of 8"):
        image_caption_dataset(hf, resolution=30)


def test_cached_latents(parts, tmp_path):
    trainer = Trainer(parts, method="lora")
    images = image_caption_dataset(write_images(tmp_path / "c", count=2), resolution=32, batch_size=2, shuffle=False,
                                   random_flip=False, tokenizer=trainer.tokenizer)
    batch = next(iter(images))
    cached = next(iter(trainer.cache_latents(images, shuffle=False)))
    assert sorted(cached) == ["moments", "token_ids"]
    np.testing.assert_allclose(cached["moments"], parts.image_encoder(batch["images"]), rtol=1e-5, atol=1e-6)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)
    assert np.isfinite(trainer.train_on_batch(cached))


def test_prior_preservation_batches(tmp_path):
    instance = image_caption_dataset(write_images(tmp_path / "a", count=2), resolution=32, caption="a sks square")
    classes = image_caption_dataset(write_images(tmp_path / "b", count=3), resolution=32, caption="a square")
    batch = next(iter(with_prior_preservation(instance, classes)))
    assert batch["images"].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(batch["prior"], [0.0, 1.0])


# ------------------------------------------------------------------------------------ callbacks


def repeated(batch):
    """A one-batch epoch, the same batch every epoch (its timesteps and noise given, so the loss is exact)."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensors(batch)


def test_early_stopping_and_tensorboard_callbacks(parts, tmp_path):
    """EarlyStopping on ``loss`` stops a run whose loss does not improve; TensorBoard writes its event files."""
    trainer = Trainer(parts, method="lora", seed=1)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0), run_eagerly=True)  # no step: the same loss every epoch
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=1)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "logs"), update_freq="epoch")
    history = trainer.fit(repeated(step_batch(parts)), epochs=6, verbose=0, shuffle=False, callbacks=[stop, board])
    assert len(history.history["loss"]) == 2 and stop.stopped_epoch == 1, history.history
    assert history.history["loss"][0] == history.history["loss"][1]
    events = list((tmp_path / "logs" / "train").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(tmp_path / "logs" / "train")).Reload()
    losses = [float(keras.ops.convert_to_numpy(tensor_value(e))) for e in logged.Tensors("epoch_loss")]
    np.testing.assert_allclose(losses, history.history["loss"], rtol=1e-6)


def tensor_value(event):
    import tensorflow as tf

    return tf.make_ndarray(event.tensor_proto)


def test_model_checkpoint_weights_load_into_a_fresh_trainer(parts, tmp_path):
    """ModelCheckpoint's weights files, loaded into a new Trainer (other initial factors), give the same losses."""
    batch = step_batch(parts)
    trainer = Trainer(parts, method="lora", rank=4, seed=1)
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-2), run_eagerly=True)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.weights.h5"), save_weights_only=True)
    history = trainer.fit(repeated(batch), epochs=2, verbose=0, shuffle=False, callbacks=[checkpoint])
    trained = float(np.mean(trainer(batch)))
    assert trained != pytest.approx(history.history["loss"][0], rel=1e-4)  # the steps changed the loss

    fresh = Trainer(parts, method="lora", rank=4, seed=7)
    fresh.load_weights(tmp_path / "epoch2.weights.h5")  # before any call
    assert float(np.mean(fresh(batch))) == pytest.approx(trained, rel=1e-6)
    for ours, theirs in zip(fresh.lora_factors, trainer.lora_factors, strict=True):
        np.testing.assert_array_equal(ours.up.numpy(), theirs.up.numpy())
        np.testing.assert_array_equal(ours.down.numpy(), theirs.down.numpy())
    fresh.load_weights(tmp_path / "epoch1.weights.h5")  # after one step: the loss epoch 2 started from
    assert float(np.mean(fresh(batch))) == pytest.approx(history.history["loss"][1], rel=1e-6)
    # a whole-model checkpoint would be a LoRA file under a .keras name: refused, saying what works
    fresh.compile(optimizer=keras.optimizers.SGD(0.0), run_eagerly=True)
    with pytest.raises(ValueError, match="save_weights_only=True"):
        fresh.fit(repeated(batch), epochs=1, verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(
            str(tmp_path / "model.keras"))])
    assert not (tmp_path / "model.keras").exists()


# ------------------------------------------------------------------------------- saved and loaded


@pytest.fixture(scope="module", params=[("attention",), ("feed_forward", "convolutions")], ids="+".join)
def trained_lora(parts, tmp_path_factory, request):
    """A LoRA of both networks trained two steps, saved in both formats."""
    trainer = Trainer(parts, method="lora", rank=4, alpha=8, targets=request.param, train_text_encoder=True, seed=1)
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-2), run_eagerly=True)
    for _ in range(2):
        trainer.train_on_batch(step_batch(parts))
    folder = tmp_path_factory.mktemp("trained-lora")
    paths = {f: trainer.save(folder / f"{f}.safetensors", format=f) for f in ("diffusers", "kohya")}
    return trainer, paths


def unet_inputs():
    d = draws(seed=9)
    context = np.random.default_rng(10).standard_normal((BATCH, 77, 64)).astype("float32")
    return d["latents"], d["timesteps"].astype("float32"), context


@pytest.mark.parametrize("form", ["diffusers", "kohya"])
def test_trained_lora_loads_in_diffusers_and_here(reference, parts, trained_lora, form, record_property):
    from kerasdiffusion import StableDiffusion

    trainer, paths = trained_lora
    latents, timesteps, context = unet_inputs()
    token_ids = parts.tokenizer(CAPTIONS)
    base = {"unet": np.asarray(parts.diffusion_model([latents, timesteps, context])),
            "text_encoder": np.asarray(parts.text_encoder(token_ids))}
    with trainer._adapted("unet"):
        trained = {"unet": np.asarray(parts.diffusion_model([latents, timesteps, context]))}
    trained["text_encoder"] = np.asarray(trainer.encode_text(token_ids))

    pipeline = copy.deepcopy(reference[0])
    pipeline.load_lora_weights(str(paths[form]))
    with torch.no_grad():
        prediction = pipeline.unet(R.nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
        theirs = {"unet": R.nhwc(prediction),
                  "text_encoder": pipeline.text_encoder(torch.from_numpy(token_ids).long())[0].numpy()}
    sd = StableDiffusion.from_components(parts, img_width=64, img_height=64, jit_compile=False)
    name = sd.load_lora(paths[form])
    try:
        ours = {"unet": np.asarray(parts.diffusion_model([latents, timesteps, context])),
                "text_encoder": np.asarray(parts.text_encoder(token_ids))}
    finally:
        sd.unload_lora(name)
    errors = {f"{network}_{other}": R.relative_error(trained[network], reference_outputs[network])
              for network in trained for other, reference_outputs in (("diffusers", theirs), ("ours", ours))}
    record_property("relative_errors", errors)
    assert min(R.relative_error(trained[n], base[n]) for n in base) > 1e-4  # both LoRAs learned something
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("form", ["a1111", "diffusers"])
def test_trained_embedding_loads_in_diffusers_and_here(reference, parts, tmp_path, form, record_property):
    from kerasdiffusion import StableDiffusion

    trainer = Trainer(parts, method="textual_inversion", token="<tiny-fox>", initializer_token="fox", num_vectors=2)
    trainer.compile(optimizer=keras.optimizers.SGD(10.0), run_eagerly=True)
    trainer.train_on_batch(dict(draws(seed=4), token_ids=trainer.tokenizer(["a <tiny-fox> photo", "<tiny-fox>"])))
    path = trainer.save(tmp_path, format=form)
    prompt = "a watercolor <tiny-fox> in the snow"
    trained = np.asarray(trainer.encode_text(trainer.tokenizer([prompt])))

    pipeline = copy.deepcopy(reference[0])
    pipeline.load_textual_inversion(str(path), token="<tiny-fox>")
    with torch.no_grad():
        theirs = pipeline.encode_prompt(prompt, "cpu", 1, False)[0].numpy()
    sd = StableDiffusion.from_components(parts, img_width=64, img_height=64, jit_compile=False, prompt_syntax="plain")
    sd.load_textual_inversion(path, token="<tiny-fox>")
    ours = np.asarray(sd.encode_text(prompt))
    errors = {"diffusers": R.relative_error(trained, theirs), "ours": R.relative_error(trained, ours)}
    record_property("relative_errors", errors)
    assert max(errors.values()) < 1e-5, errors


def test_multi_vector_embedding_round_trips_through_a_diffusers_folder(parts, tmp_path, record_property):
    """A trained two-vector token, exported with the model as a diffusers folder: diffusers' pipeline (which
    expands ``<tok>`` to ``<tok> <tok>_1``) and ours, loading the folder back, give the trained contexts."""
    from diffusers import StableDiffusionPipeline

    from kerasdiffusion import export

    trainer = Trainer(parts, method="textual_inversion", token="<tiny-fox>", initializer_token="fox", num_vectors=2)
    trainer.compile(optimizer=keras.optimizers.SGD(10.0), run_eagerly=True)
    trainer.train_on_batch(dict(draws(seed=4), token_ids=trainer.tokenizer(["a <tiny-fox> photo", "<tiny-fox>"])))
    export(trainer.components, tmp_path / "model")
    prompts = ["a watercolor <tiny-fox> in the snow", "<tiny-fox>, <tiny-fox>"]
    trained = np.asarray(trainer.encode_text(trainer.tokenizer(prompts)))

    back = load_components(tmp_path / "model", precision="float32", cache=False, progress=False)
    ours = np.asarray(back.text_encoder(back.tokenizer(prompts)))
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    with torch.no_grad():
        theirs = pipeline.encode_prompt(prompts, "cpu", 1, False)[0].numpy()
    expected_ids = trainer.tokenizer(prompts)
    np.testing.assert_array_equal(back.tokenizer(prompts), expected_ids)
    np.testing.assert_array_equal(pipeline.tokenizer(pipeline.maybe_convert_prompt(prompts, pipeline.tokenizer),
                                                     padding="max_length", max_length=77).input_ids, expected_ids)
    errors = {"diffusers": R.relative_error(trained, theirs), "ours": R.relative_error(trained, ours)}
    record_property("relative_errors", errors)
    assert max(errors.values()) < 1e-5, errors


# ------------------------------------------------------------------------------------ command line


def test_cli_resume_gives_the_uninterrupted_result(reference, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from kerasdiffusion import sources
    from kerasdiffusion.cli import main

    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "kd-cache"))
    data = write_images(tmp_path / "images", count=3)
    common = ["train", "lora", "--model", str(reference[1]), "--data", str(data), "--resolution", "16",
              "--batch-size", "1", "--learning-rate", "1e-2", "--checkpoint-every", "2", "--precision", "float32",
              "--eager", "--quiet", "--seed", "3"]
    assert main([*common, "--out", str(tmp_path / "straight"), "--steps", "4"]) == 0
    assert main([*common, "--out", str(tmp_path / "resumed"), "--steps", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "resumed"), "--steps", "4", "--resume"]) == 0
    straight = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    resumed = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert sorted(straight) == sorted(resumed)
    for key in straight:
        np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-6, atol=1e-7, err_msg=key)
    after_two = load_file(tmp_path / "resumed" / "checkpoint.safetensors")  # rewritten at step 4: now equal too
    assert any(np.abs(v).max() > 0 for k, v in after_two.items() if k.startswith("trainable/"))
    # a fresh run over a checkpoint, and a resumption with other settings, are refused in one line
    assert main([*common, "--out", str(tmp_path / "straight"), "--steps", "4"]) == 1
    assert main([*common, "--out", str(tmp_path / "straight"), "--steps", "6", "--rank", "8", "--resume"]) == 1
