"""`StableDiffusion`: the public API, and the compiled denoising step.

Python tokenizes prompts and handles pixels; everything between runs compiled. Each denoising step is one
XLA program: the UNet on the doubled batch (batched classifier-free guidance), the guidance, the scheduler
update and, for inpainting, the latent blending. It is traced once per (scheduler, steps, mode, shapes), so
only a call with new shapes compiles.

Example:

>>> import kerasdiffusion as kd                                                  # doctest: +SKIP
>>> sd = kd.StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
>>> images = sd.text_to_image("a photograph of an astronaut riding a horse", batch_size=2)
>>> images.shape, images.dtype
((2, 512, 512, 3), dtype('uint8'))
"""

import os
import random

import numpy as np
import tensorflow as tf

from kerasdiffusion import config as C
from kerasdiffusion import images as I
from kerasdiffusion import schedulers as S
from kerasdiffusion import sources
from kerasdiffusion.text_encoder import build_text_encoder
from kerasdiffusion.tokenizer import CLIPTokenizer
from kerasdiffusion.unet import build_unet
from kerasdiffusion.vae import build_decoder, build_image_encoder
from kerasdiffusion.weights import assign_all

from kerasdiffusion.config import PRECISIONS


def default_precision():
    """float16 on GPU, bfloat16 on TPU, float32 on CPU."""
    if tf.config.list_logical_devices("TPU"):
        return "mixed_bfloat16"
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "float32"


def _check_size(name, value):
    if not isinstance(value, (int, np.integer)) or value < 8 or value % 8:
        raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")


def _check_positive(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _vae_weights(model, weights):
    return {v.path: weights[v.path] for v in model.weights if v.path in weights}


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x in Keras: text-to-image, image-to-image and inpainting.

    Args:
        img_width, img_height: the size of generated images; any multiple of 8.
        jit_compile: compile the text encoder, the denoising step and the decoder with XLA.
        precision: `"float32"`, `"mixed_float16"` or `"mixed_bfloat16"`; `None` picks float16 on GPU,
            bfloat16 on TPU and float32 on CPU. Applies to this model's layers only.
        scheduler: a scheduler name (`"ddim"`, `"pndm"`, `"lms"`, `"euler"`, `"euler_ancestral"`,
            `"dpmpp_2m"`, `"dpmpp_2m_karras"`) or a scheduler object.
        source: where the weights come from (see `from_pretrained`); the default is SD v1.5 from the Hub,
            loaded on first use, as in KerasCV.
        prediction_type: `"epsilon"` or `"v_prediction"`, overriding what the source's scheduler config says.
        revision: for a Hub id, the branch, tag or commit to load (default: the main branch).
        cache: whether converted weights are read from and written to the conversion cache; `None`
            follows ``$KERASDIFFUSION_NO_CACHE`` (on unless it is set).
        progress: show progress bars while weights are read (and, when converted, written to the cache).

    Example:

    >>> sd = StableDiffusion(img_width=512, img_height=512)                   # doctest: +SKIP
    >>> sd.text_to_image("a watercolor fox", num_steps=25, seed=1).shape
    (1, 512, 512, 3)
    """

    def __init__(self, img_width=512, img_height=512, jit_compile=True, precision=None, scheduler="ddim",
                 source=None, prediction_type=None, *, revision=None, cache=None, progress=True):
        _check_size("img_width", img_width)
        _check_size("img_height", img_height)
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)} or None")
        self.img_width, self.img_height = int(img_width), int(img_height)
        self.jit_compile = jit_compile
        self.precision = precision or default_precision()
        self.source = os.fspath(source) if source is not None else sources.DEFAULT_MODEL
        self._prediction_type = prediction_type
        self._load_options = {"revision": revision, "use_cache": cache, "progress": progress}
        sources.check_revision(self.source, revision)  # now, not at the lazy first load
        self._scheduler_request = scheduler
        S.get_scheduler(scheduler)  # fails on an unknown name now, not at first use
        self._components = None
        self._step_functions = {}
        self._compiled = {}
        self.trace_count = 0

    @classmethod
    def from_pretrained(cls, source, img_width=512, img_height=512, jit_compile=True, precision=None,
                        scheduler="ddim", prediction_type=None, *, revision=None, cache=None, progress=True):
        """Loads weights from a Hub id, a diffusers folder, a single `.safetensors`/`.ckpt` or a converted folder.

        The family (SD 1.x, 2.x, 9-channel inpainting) and all sizes are read from the weights' shapes.
        `prediction_type` (`"epsilon"` / `"v_prediction"`) overrides what the source's scheduler config says.
        `revision` picks a Hub id's branch, tag or commit; `cache=False` neither reads nor writes the
        conversion cache (`None` follows ``$KERASDIFFUSION_NO_CACHE``); `progress=False` hides the bars.

        Example:

        >>> sd = StableDiffusion.from_pretrained("v1-5-pruned-emaonly.safetensors")   # doctest: +SKIP
        """
        model = cls(img_width, img_height, jit_compile, precision, scheduler, source, prediction_type,
                    revision=revision, cache=cache, progress=progress)
        model._load()
        return model

    # Components, built on first use.

    def _load(self):
        if self._components is not None:
            return self._components
        converted = sources.resolve(self.source, half_precision=self.precision != "float32", **self._load_options)
        weights = converted.weights
        family = C.family_from_weights(weights["text_encoder"])
        policy = self.precision
        models = {
            "text_encoder": build_text_encoder(C.text_encoder_config_from_weights(weights["text_encoder"], family),
                                               dtype=policy),
            "diffusion_model": build_unet(C.unet_config_from_weights(weights["unet"], family), dtype=policy),
        }
        vae_config = C.vae_config_from_weights(weights["vae"], family)
        models["image_encoder"] = build_image_encoder(vae_config, dtype=policy)
        models["decoder"] = build_decoder(vae_config, dtype=policy)
        vae = weights.pop("vae")
        encoder_weights = _vae_weights(models["image_encoder"], vae)
        assignments = [
            (models["text_encoder"], weights.pop("text_encoder"), "text_encoder"),
            (models["diffusion_model"], weights.pop("unet"), "unet"),
            (models["image_encoder"], encoder_weights, "vae encoder"),
            (models["decoder"], {k: v for k, v in vae.items() if k not in encoder_weights}, "vae decoder"),
        ]
        assign_all(assignments)
        if converted.tokenizer_dir:
            tokenizer = CLIPTokenizer.from_folder(converted.tokenizer_dir)
        else:
            tokenizer = CLIPTokenizer(pad_token=family.pad_token)
        scheduler_config = S.SchedulerConfig.from_dict(converted.scheduler_config or {})
        prediction_type = self._prediction_type or (
            scheduler_config.prediction_type if converted.scheduler_config or family is C.SD1 else "v_prediction"
        )
        scheduler_config = S.SchedulerConfig.from_dict({**(converted.scheduler_config or {}),
                                                        "prediction_type": prediction_type})
        self._components = dict(models, tokenizer=tokenizer, family=family, vae_config=vae_config,
                                scheduler_config=scheduler_config)
        self._scheduler = S.get_scheduler(self._scheduler_request, scheduler_config)
        return self._components

    @property
    def tokenizer(self):
        return self._load()["tokenizer"]

    @property
    def text_encoder(self):
        return self._load()["text_encoder"]

    @property
    def diffusion_model(self):
        return self._load()["diffusion_model"]

    @property
    def decoder(self):
        return self._load()["decoder"]

    @property
    def image_encoder(self):
        return self._load()["image_encoder"]

    @property
    def scheduler(self):
        self._load()
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value):
        self._scheduler_request = value
        if self._components is not None:
            self._scheduler = S.get_scheduler(value, self._components["scheduler_config"])
        else:
            S.get_scheduler(value)

    # Compiled pieces.

    def _compiled_call(self, name, model):
        if name not in self._compiled:
            # A tf.function of the model itself: one per model, so two pipelines never share a trace history.
            self._compiled[name] = tf.function(model, jit_compile=self.jit_compile)
        return self._compiled[name]

    def encode_text(self, prompt):
        """Encodes a prompt (or a list of prompts) into the context the UNet attends to.

        Returns:
            A float32 tensor `[1, 77, D]` for a string, `[len(prompt), 77, D]` for a list.

        Example:

        >>> context = sd.encode_text("a photograph of an astronaut riding a horse")   # doctest: +SKIP
        >>> context.shape
        TensorShape([1, 77, 768])
        """
        tokens = tf.constant(self.tokenizer(prompt), tf.int32)
        context = self._compiled_call("text_encoder", self.text_encoder)(tokens)
        return tf.cast(context, tf.float32)

    def _decode(self, latents):
        scale = self._load()["vae_config"].scaling_factor
        decoded = self._compiled_call("decoder", self.decoder)(tf.constant(latents / scale, tf.float32))
        return I.to_uint8(decoded)

    def _encode_images(self, images):
        """Images in [-1, 1] -> scaled latents (the posterior mean, so results do not depend on extra noise)."""
        moments = self._compiled_call("image_encoder", self.image_encoder)(tf.constant(images, tf.float32))
        mean = tf.split(tf.cast(moments, tf.float32), 2, axis=-1)[0]
        return mean.numpy() * self._load()["vae_config"].scaling_factor

    # The denoising loop.

    def _step_function(self, scheduler, plan, mode, guided):
        key = (id(scheduler), len(plan.timesteps), mode, guided)
        if key in self._step_functions:
            return self._step_functions[key]
        unet = self.diffusion_model

        def step(latents, state, i, context, guidance, seeds, extra):
            self.trace_count += 1  # Python side effect: runs only while tracing
            model_input = scheduler.scale_model_input(plan, i, latents)
            if guided:
                model_input = tf.concat([model_input, model_input], axis=0)
            if mode == "inpaint9":
                mask, masked_latents = extra
                repeat = 2 if guided else 1
                model_input = tf.concat(
                    [model_input, tf.tile(mask, [repeat, 1, 1, 1]), tf.tile(masked_latents, [repeat, 1, 1, 1])], -1
                )
            t = tf.gather(tf.constant(plan.timesteps, tf.float32), i)
            timesteps = tf.fill([tf.shape(model_input)[0]], t)
            output = tf.cast(unet([model_input, timesteps, context], training=False), tf.float32)
            if guided:
                unconditional, conditional = tf.split(output, 2, axis=0)
                output = unconditional + guidance * (conditional - unconditional)
            noise = _item_noise(seeds, i + 1, tf.shape(latents))
            latents, state = scheduler.step(plan, i, output, latents, state, noise)
            if mode == "inpaint4":
                mask, init_latents, init_noise = extra
                last = len(plan.timesteps) - 1
                noised = scheduler.add_noise(plan, init_latents, init_noise, tf.minimum(i + 1, last))
                proper = tf.where(i < last, noised, init_latents)
                latents = (1.0 - mask) * proper + mask * latents
            return latents, state

        function = tf.function(step, jit_compile=self.jit_compile)
        self._step_functions[key] = function
        return function

    def _denoise(self, latents, context, unconditional, guidance, num_steps, seeds, start=0, mode="text",
                 extra=(), verbose=True):
        scheduler = self.scheduler
        plan = scheduler.plan(num_steps)
        guided = guidance > 1.0
        if guided:
            context = tf.concat([unconditional, context], axis=0)
        step = self._step_function(scheduler, plan, mode, guided)
        latents = tf.constant(latents, tf.float32)
        state = scheduler.initial_state(latents)
        guidance = tf.constant(guidance, tf.float32)
        steps = range(start, len(plan.timesteps))
        if verbose:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="denoising", unit="step")
        for i in steps:
            latents, state = step(latents, state, tf.constant(i, tf.int32), context, guidance, seeds, extra)
        return latents.numpy()

    # Public generation API.

    def _resolve_batch(self, prompt, batch_size):
        _check_positive("batch_size", batch_size)
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("prompt list is empty")
            if batch_size not in (1, len(prompt)):
                raise ValueError(f"{len(prompt)} prompts given but batch_size={batch_size}")
            return len(prompt)
        return batch_size

    def _repeat_context(self, context, batch_size, what):
        context = tf.cast(tf.convert_to_tensor(context), tf.float32)
        if context.shape.rank != 3:
            raise ValueError(f"{what} must be [1, 77, D] or [batch_size, 77, D], got shape {context.shape}")
        if context.shape[0] == 1:
            return tf.repeat(context, batch_size, axis=0)
        if context.shape[0] != batch_size:
            raise ValueError(f"{what} has batch {context.shape[0]}, but batch_size={batch_size}")
        return context

    def _unconditional(self, negative_prompt, batch_size):
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) not in (1, batch_size):
            raise ValueError(f"{len(negative_prompt)} negative prompts given but batch_size={batch_size}")
        return self._repeat_context(self.encode_text(negative_prompt or ""), batch_size, "negative prompt")

    def _check_common(self, num_steps, unconditional_guidance_scale):
        _check_positive("num_steps", num_steps)
        if not np.isfinite(unconditional_guidance_scale):
            raise ValueError(f"unconditional_guidance_scale must be finite, got {unconditional_guidance_scale!r}")

    def generate_image(self, encoded_text, negative_prompt=None, batch_size=1, num_steps=50,
                       unconditional_guidance_scale=7.5, diffusion_noise=None, seed=None, verbose=True):
        """Generates images from encoded text (`encode_text`'s output), as in KerasCV.

        Args:
            encoded_text: `[1, 77, D]` (repeated to `batch_size`) or `[batch_size, 77, D]`.
            negative_prompt: a string or list of strings the guidance steers away from; `None` is "".
            batch_size: number of images.
            num_steps: number of scheduler steps.
            unconditional_guidance_scale: classifier-free guidance scale; <= 1 disables guidance.
            diffusion_noise: initial latents `[batch_size, H/8, W/8, 4]`, standard normal (the scheduler's
                initial sigma is applied here); `None` draws them from `seed`.
            seed: makes the result reproducible; each batch item's noise depends only on the seed and its index.

        Returns:
            uint8 numpy array `[batch_size, img_height, img_width, 3]`.

        Example:

        >>> context = sd.encode_text("a cabin in the snow")                        # doctest: +SKIP
        >>> sd.generate_image(context, batch_size=2, num_steps=20, seed=3).shape
        (2, 512, 512, 3)
        """
        _check_positive("batch_size", batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        context = self._repeat_context(encoded_text, batch_size, "encoded_text")
        unconditional = self._unconditional(negative_prompt, batch_size)
        seed = _seed(seed)
        shape = (batch_size, self.img_height // 8, self.img_width // 8, 4)
        noise = self._initial_noise(diffusion_noise, shape, seed)
        plan = self.scheduler.plan(num_steps)
        latents = noise * plan.init_noise_sigma
        latents = self._denoise(latents, context, unconditional, unconditional_guidance_scale, num_steps,
                                _seeds(seed, batch_size), verbose=verbose)
        return self._decode(latents)

    def text_to_image(self, prompt, negative_prompt=None, batch_size=1, num_steps=50,
                      unconditional_guidance_scale=7.5, seed=None, verbose=True):
        """Generates images from a prompt (a string, or a list with one prompt per image).

        Returns:
            uint8 numpy array `[batch_size, img_height, img_width, 3]`.

        Example:

        >>> sd.text_to_image("a photograph of an astronaut riding a horse", seed=0).shape   # doctest: +SKIP
        (1, 512, 512, 3)
        """
        batch_size = self._resolve_batch(prompt, batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        return self.generate_image(self.encode_text(prompt), negative_prompt, batch_size, num_steps,
                                   unconditional_guidance_scale, seed=seed, verbose=verbose)

    def image_to_image(self, prompt, image, strength=0.8, negative_prompt=None, batch_size=1, num_steps=50,
                       unconditional_guidance_scale=7.5, seed=None, verbose=True):
        """Re-draws an image after a prompt; `strength` in [0, 1] sets how much of it is noised away.

        As in diffusers, the encoded image is noised to the step `strength` selects and only the remaining
        `int(num_steps * strength)` steps run. The output has the input image's size (a multiple of 8).

        Example:

        >>> sd.image_to_image("a watercolor painting", photo, strength=0.6, seed=0).shape   # doctest: +SKIP
        (1, 512, 512, 3)
        """
        batch_size = self._resolve_batch(prompt, batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        pixels = self._image_input(image, batch_size)
        seed = _seed(seed)
        init_latents = self._encode_images(pixels)
        plan = self.scheduler.plan(num_steps)
        start = self.scheduler.start_index(plan, float(strength))
        noise = self._initial_noise(None, init_latents.shape, seed)
        if start < len(plan.timesteps):
            latents = self.scheduler.add_noise(plan, tf.constant(init_latents), tf.constant(noise), start)
        else:
            latents = init_latents
        context = self._repeat_context(self.encode_text(prompt), batch_size, "prompt")
        unconditional = self._unconditional(negative_prompt, batch_size)
        latents = self._denoise(np.asarray(latents), context, unconditional, unconditional_guidance_scale,
                                num_steps, _seeds(seed, batch_size), start=start, verbose=verbose)
        return self._decode(latents)

    def inpaint(self, prompt, image, mask, negative_prompt=None, batch_size=1, num_steps=50,
                unconditional_guidance_scale=7.5, seed=None, verbose=True):
        """Repaints the masked part of an image after a prompt.

        `mask` is `[H, W]` with 1 (or 255) where to repaint. A 9-channel inpainting UNet gets the mask and
        the masked image's latents as extra inputs, as diffusers feeds them; an ordinary UNet repaints by
        blending the re-noised original latents outside the mask after every step.

        Example:

        >>> sd.inpaint("a red door", photo, mask, seed=0).shape                     # doctest: +SKIP
        (1, 512, 512, 3)
        """
        batch_size = self._resolve_batch(prompt, batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        pixels = self._image_input(image, batch_size)
        mask = I.mask_from_input(mask, pixels.shape[1], pixels.shape[2])
        latent_mask = np.broadcast_to(mask[::8, ::8][None, :, :, None], (batch_size, *mask[::8, ::8].shape, 1))
        latent_mask = np.ascontiguousarray(latent_mask, np.float32)
        seed = _seed(seed)
        plan = self.scheduler.plan(num_steps)
        shape = (batch_size, pixels.shape[1] // 8, pixels.shape[2] // 8, 4)
        noise = self._initial_noise(None, shape, seed)
        if self.diffusion_model.inputs[0].shape[-1] == 9:
            masked = self._encode_images(pixels * (mask[None, :, :, None] < 0.5))
            mode, extra = "inpaint9", (tf.constant(latent_mask), tf.constant(masked, tf.float32))
        else:
            init_latents = self._encode_images(pixels)
            mode = "inpaint4"
            extra = (tf.constant(latent_mask), tf.constant(init_latents, tf.float32), tf.constant(noise))
        context = self._repeat_context(self.encode_text(prompt), batch_size, "prompt")
        unconditional = self._unconditional(negative_prompt, batch_size)
        latents = self._denoise(noise * plan.init_noise_sigma, context, unconditional, unconditional_guidance_scale,
                                num_steps, _seeds(seed, batch_size), mode=mode, extra=extra, verbose=verbose)
        return self._decode(latents)

    def _image_input(self, image, batch_size):
        pixels = I.from_uint8(image, batch_size)
        _check_size("image height", pixels.shape[1])
        _check_size("image width", pixels.shape[2])
        return pixels

    def _initial_noise(self, diffusion_noise, shape, seed):
        if diffusion_noise is None:
            return _item_noise(_seeds(seed, shape[0]), 0, shape).numpy()
        noise = np.asarray(diffusion_noise, np.float32)
        if noise.ndim == 4 and noise.shape[0] == 1 and shape[0] > 1:
            noise = np.repeat(noise, shape[0], axis=0)
        if noise.shape != tuple(shape):
            raise ValueError(f"diffusion_noise must have shape {tuple(shape)}, got {noise.shape}")
        return noise


def _seed(seed):
    if seed is None:
        return random.SystemRandom().randrange(2**31)
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    return int(seed) % 2**31


def _seeds(seed, batch_size):
    """One stateless-RNG key per batch item, so an item's noise does not depend on the batch size."""
    return tf.constant([[seed, index] for index in range(batch_size)], tf.int32)


def _item_noise(seeds, counter, shape):
    """Standard-normal noise ``[B, h, w, C]``: item b's comes from its key folded with ``counter``."""
    item_shape = tf.concat([[1], tf.cast(shape[1:], tf.int32)], axis=0)
    noises = []
    for b in range(seeds.shape[0]):
        key = tf.random.experimental.stateless_fold_in(seeds[b], counter)
        noises.append(tf.random.stateless_normal(item_shape, key, dtype=tf.float32))
    return tf.concat(noises, axis=0)
