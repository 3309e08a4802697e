"""Training (tiny model, float32): the loss and one optimizer step against diffusers' recipe, learning, data.

The reference is diffusers' ``train_text_to_image.py`` written out here on the same weights: a DDPMScheduler
built from the checkpoint's scheduler config noises the latents, the UNet predicts, ``F.mse_loss`` (min-SNR:
per item, times ``min(snr, γ) / snr`` or ``/ (snr + 1)``). The same timesteps and noise are given to both.
LoRA's step is peft's (``LoraConfig`` on the diffusers UNet, its factors set to ours).
"""

import copy
import dataclasses
import json

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
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


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
    return float(loss)


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
    weights = max(R.relative_error(after[p], expected[p]) for p in expected)
    updates = R.relative_error(np.concatenate([(after[p] - before[p]).ravel() for p in expected]),
                               np.concatenate([(expected[p] - before[p]).ravel() for p in expected]))
    record_property("weights_relative_error", weights)
    record_property("updates_relative_error", updates)
    assert weights < 1e-5
    assert updates < 1e-3  # the step itself, not only the weights it moved


def peft_unet(pipeline, rank, alpha, seed):
    from peft import LoraConfig

    unet = copy.deepcopy(pipeline.unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=ATTENTION))
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


def test_lora_step_matches_peft(reference, parts, record_property):
    pipeline, _ = reference
    rank, alpha, lr = 4, 8, 0.05
    unet = peft_unet(pipeline, rank, alpha, seed=4)
    modules = lora_modules(unet)
    trainer = Trainer(parts, method="lora", rank=rank, alpha=alpha)
    factors = {kernel.path: update for _, kernel, update in trainer._adaptation.lora_kernels}
    assert sorted(factors) == sorted(modules)
    for path, module in modules.items():
        factors[path].down.assign(module.lora_A["default"].weight.detach().numpy().T)
        factors[path].up.assign(module.lora_B["default"].weight.detach().numpy().T)
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


def flat_factors(factors, modules, before):
    """Ours after the step, peft's after the step and both before, each as one vector (our layout)."""
    ours, expected, start = [], [], []
    for path, module in modules.items():
        ours += [factors[path].down.numpy().ravel(), factors[path].up.numpy().ravel()]
        expected += [module.lora_A["default"].weight.detach().numpy().T.ravel(),
                     module.lora_B["default"].weight.detach().numpy().T.ravel()]
        start += [before[path][0].ravel(), before[path][1].ravel()]
    return np.concatenate(ours), np.concatenate(expected), np.concatenate(start)
