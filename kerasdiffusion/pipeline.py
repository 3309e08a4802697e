"""`StableDiffusion`: the public API over `Components` and the denoising core.

Python tokenizes prompts, draws the seeds' noise and handles pixels; everything between runs compiled
(`kerasdiffusion.denoise`), on Keras' TensorFlow or JAX backend. Only a call with new shapes, a new
sampler or a new number of steps compiles; going back to one used before reuses its program.

Example:

>>> import kerasdiffusion as kd                                                  # doctest: +SKIP
>>> sd = kd.StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
>>> images = sd.text_to_image("a photograph of an astronaut riding a horse", batch_size=2)
>>> images.shape, images.dtype
((2, 512, 512, 3), dtype('uint8'))
"""

import os

import numpy as np
from keras import ops

from kerasdiffusion import backend
from kerasdiffusion import images as I
from kerasdiffusion import schedulers as S
from kerasdiffusion import seeds, sources
from kerasdiffusion.components import Components, check_precision, load_components
from kerasdiffusion.denoise import LOOPS, Conditioning, Denoiser, Keep


def _check_size(name, value):
    if not isinstance(value, (int, np.integer)) or value < 8 or value % 8:
        raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")


def _check_positive(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def default_loop():
    """The loop mode for the current device: one program for the whole loop on TPU (where each program
    launch costs a host round trip), one per step elsewhere (a live progress bar; same speed on CPU)."""
    return "compiled" if backend.device_type() == "tpu" else "steps"


def _check_loop(loop):
    if loop is not None and loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)} or None, got {loop!r}")


def _check_distribution(distribution):
    if distribution is not None:
        raise NotImplementedError("distribution= is not supported yet: pass None (one device)")


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x in Keras: text-to-image, image-to-image and inpainting.

    Args:
        img_width, img_height: the size of generated images; any multiple of 8.
        jit_compile: compile the text encoder, the denoising loop and the decoder with XLA.
        precision: `"float32"`, `"mixed_float16"` or `"mixed_bfloat16"`; `None` picks float16 on GPU,
            bfloat16 on TPU and float32 on CPU. Applies to this model's layers only.
        scheduler: a scheduler name (`"ddim"`, `"pndm"`, `"lms"`, `"euler"`, `"euler_ancestral"`,
            `"dpmpp_2m"`, `"dpmpp_2m_karras"`) or a scheduler object; one made without a config takes the
            checkpoint's training schedule and prediction type.
        source: where the weights come from (see `from_pretrained`); the default is SD v1.5 from the Hub,
            loaded on first use, as in KerasCV.
        prediction_type: `"epsilon"` or `"v_prediction"`, overriding what the source's scheduler config says.
        loop: `"steps"` (one compiled program per denoising step, with a live progress bar) or
            `"compiled"` (the whole loop in one program); `None` picks per device type. Same images.
        distribution: reserved for multi-device generation; only `None` (one device) for now.
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
                 source=None, prediction_type=None, *, loop=None, distribution=None, revision=None, cache=None,
                 progress=True):
        _check_size("img_width", img_width)
        _check_size("img_height", img_height)
        check_precision(precision)
        _check_loop(loop)
        _check_distribution(distribution)
        backend.name()
        self.img_width, self.img_height = int(img_width), int(img_height)
        self.jit_compile = jit_compile
        self.loop = loop
        self.source = os.fspath(source) if source is not None else sources.DEFAULT_MODEL
        sources.check_revision(self.source, revision)  # now, not at the lazy first load
        self._load_options = dict(precision=precision, prediction_type=prediction_type, revision=revision,
                                  cache=cache, progress=progress)
        self._scheduler = S.get_scheduler(scheduler)  # fails on an unknown name now, not at first use
        self._components = None

    @classmethod
    def from_pretrained(cls, source, img_width=512, img_height=512, jit_compile=True, precision=None,
                        scheduler="ddim", prediction_type=None, *, loop=None, distribution=None, revision=None,
                        cache=None, progress=True):
        """Loads weights from a Hub id, a diffusers folder, a single `.safetensors`/`.ckpt` or a converted folder.

        `load_components` and `from_components` together. The family (SD 1.x, 2.x, 9-channel inpainting)
        and all sizes are read from the weights' shapes. `prediction_type` (`"epsilon"` /
        `"v_prediction"`) overrides what the source's scheduler config says. `revision` picks a Hub id's
        branch, tag or commit; `cache=False` neither reads nor writes the conversion cache (`None` follows
        ``$KERASDIFFUSION_NO_CACHE``); `progress=False` hides the bars.

        Example:

        >>> sd = StableDiffusion.from_pretrained("v1-5-pruned-emaonly.safetensors")   # doctest: +SKIP
        """
        model = cls(img_width, img_height, jit_compile, precision, scheduler, source, prediction_type, loop=loop,
                    distribution=distribution, revision=revision, cache=cache, progress=progress)
        model.components  # load now
        return model

    @classmethod
    def from_components(cls, components, img_width=512, img_height=512, jit_compile=True, scheduler="ddim", *,
                        loop=None, distribution=None):
        """A pipeline over ready `Components` (from `load_components`, or networks of your own).

        Example:

        >>> parts = kd.load_components("stable-diffusion-v1-5/stable-diffusion-v1-5")   # doctest: +SKIP
        >>> sd = StableDiffusion.from_components(parts, scheduler="euler", loop="compiled")
        """
        if not isinstance(components, Components):
            raise TypeError(f"from_components takes a Components, got {type(components).__name__}")
        model = cls(img_width, img_height, jit_compile, components.precision, scheduler, components.source or None,
                    loop=loop, distribution=distribution)
        model._set_components(components)
        return model

    # Components, loaded on first use.

    def _set_components(self, components):
        self._components = components
        self._denoiser = Denoiser(components.diffusion_model, self.jit_compile)
        self._programs = {}
        self._scheduler = self._scheduler.for_checkpoint(components.scheduler_config)

    @property
    def components(self):
        """The `Components` this pipeline runs (loaded from the source on first use)."""
        if self._components is None:
            self._set_components(load_components(self.source, **self._load_options))
        return self._components

    @property
    def tokenizer(self):
        return self.components.tokenizer

    @property
    def text_encoder(self):
        return self.components.text_encoder

    @property
    def diffusion_model(self):
        return self.components.diffusion_model

    @property
    def decoder(self):
        return self.components.decoder

    @property
    def image_encoder(self):
        return self.components.image_encoder

    @property
    def precision(self):
        return self.components.precision

    @property
    def scheduler(self):
        """The sampler, bound to the checkpoint's training schedule; assign a name or a scheduler object."""
        self.components
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value):
        scheduler = S.get_scheduler(value)
        if self._components is not None:
            scheduler = scheduler.for_checkpoint(self._components.scheduler_config)
        self._scheduler = scheduler

    @property
    def trace_count(self):
        """How many times a denoising program was traced (compiled): only new shapes, samplers or step
        counts add to it."""
        return self._denoiser.trace_count if self._components is not None else 0

    # Compiled networks.

    def _network_call(self, name):
        if name not in self._programs:
            model = self.components.networks[name]
            self._programs[name] = backend.compile_function(lambda x: model(x, training=False), model.weights,
                                                            self.jit_compile)
        return self._programs[name]

    def encode_text(self, prompt):
        """Encodes a prompt (or a list of prompts) into the context the UNet attends to.

        Returns:
            A float32 tensor `[1, 77, D]` for a string, `[len(prompt), 77, D]` for a list.

        Example:

        >>> context = sd.encode_text("a photograph of an astronaut riding a horse")   # doctest: +SKIP
        >>> context.shape
        TensorShape([1, 77, 768])
        """
        tokens = ops.convert_to_tensor(self.tokenizer(prompt), "int32")
        return ops.cast(self._network_call("text_encoder")(tokens), "float32")

    def _decode(self, latents):
        scale = self.components.vae_config.scaling_factor
        decoded = self._network_call("decoder")(ops.convert_to_tensor(np.asarray(latents, np.float32) / scale))
        return I.to_uint8(ops.convert_to_numpy(ops.cast(decoded, "float32")))

    def _encode_images(self, images):
        """Images in [-1, 1] -> scaled latents (the posterior mean, so results do not depend on extra noise)."""
        moments = self._network_call("image_encoder")(ops.convert_to_tensor(np.asarray(images, np.float32)))
        mean = ops.convert_to_numpy(ops.cast(moments, "float32"))[..., : self.components.latent_channels]
        return mean * self.components.vae_config.scaling_factor

    # The denoising loop.

    def _denoise(self, latents, context, unconditional, guidance, plan, seed, start=0, extra_channels=None,
                 keep=None, verbose=True):
        scheduler = self.scheduler
        noises = None
        if scheduler.stochastic:
            noises = seeds.step_normals(seed, range(latents.shape[0]), len(plan.timesteps), latents.shape[1:])
        conditioning = Conditioning(context, unconditional, guidance, extra_channels, keep)
        loop = self.loop or default_loop()
        return self._denoiser(scheduler, plan, latents, conditioning, start=start, noises=noises, loop=loop,
                              progress=verbose and loop == "steps")

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
        context = ops.cast(ops.convert_to_tensor(context), "float32")
        if len(context.shape) != 3:
            raise ValueError(f"{what} must be [1, 77, D] or [batch_size, 77, D], got shape {tuple(context.shape)}")
        if context.shape[0] == 1:
            return ops.repeat(context, batch_size, axis=0)
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

    def _noise(self, diffusion_noise, shape, seed):
        """The given noise (``[1, ...]`` repeated to the batch), or item b's standard normal from the seed."""
        if diffusion_noise is None:
            return seeds.batch_normal(seed, range(shape[0]), 0, shape[1:])
        noise = np.asarray(ops.convert_to_numpy(diffusion_noise), np.float32)
        if noise.ndim == 4 and noise.shape[0] == 1 and shape[0] > 1:
            noise = np.repeat(noise, shape[0], axis=0)
        if noise.shape != tuple(shape):
            raise ValueError(f"diffusion_noise must have shape {tuple(shape)}, got {noise.shape}")
        return noise

    def _latent_shape(self, batch_size, height, width):
        return (batch_size, height // 8, width // 8, self.components.latent_channels)

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
            seed: makes the result reproducible; each batch item's noise depends only on the seed and its
                index, the same on every backend and device.

        Returns:
            uint8 numpy array `[batch_size, img_height, img_width, 3]`.

        Example:

        >>> context = sd.encode_text("a cabin in the snow")                        # doctest: +SKIP
        >>> sd.generate_image(context, batch_size=2, num_steps=20, seed=3).shape
        (2, 512, 512, 3)
        """
        _check_positive("batch_size", batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        seed = seeds.check_seed(seed)
        context = self._repeat_context(encoded_text, batch_size, "encoded_text")
        unconditional = self._unconditional(negative_prompt, batch_size)
        noise = self._noise(diffusion_noise, self._latent_shape(batch_size, self.img_height, self.img_width), seed)
        plan = self.scheduler.plan(num_steps)
        latents = self._denoise(noise * plan.init_noise_sigma, context, unconditional, unconditional_guidance_scale,
                                plan, seed, verbose=verbose)
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
        seeds.check_seed(seed)
        return self.generate_image(self.encode_text(prompt), negative_prompt, batch_size, num_steps,
                                   unconditional_guidance_scale, seed=seed, verbose=verbose)

    def image_to_image(self, prompt, image, strength=0.8, negative_prompt=None, batch_size=1, num_steps=50,
                       unconditional_guidance_scale=7.5, diffusion_noise=None, seed=None, verbose=True):
        """Re-draws an image after a prompt; `strength` in [0, 1] sets how much of it is noised away.

        As in diffusers, the encoded image (the VAE posterior's mean) is noised to the step `strength`
        selects and only the remaining `int(num_steps * strength)` steps run. The output has the input
        image's size (a multiple of 8). `diffusion_noise` (`[batch_size, H/8, W/8, 4]`, standard normal) is
        the noise added to the encoded image; `None` draws it from `seed`.

        Example:

        >>> sd.image_to_image("a watercolor painting", photo, strength=0.6, seed=0).shape   # doctest: +SKIP
        (1, 512, 512, 3)
        """
        batch_size = self._resolve_batch(prompt, batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        seed = seeds.check_seed(seed)
        pixels = self._image_input(image, batch_size)
        init_latents = self._encode_images(pixels)
        noise = self._noise(diffusion_noise, init_latents.shape, seed)
        plan = self.scheduler.plan(num_steps)
        start = self.scheduler.start_index(plan, float(strength))
        if start == len(plan.timesteps):
            return self._decode(init_latents)
        latents = ops.convert_to_numpy(self.scheduler.add_noise(plan, init_latents, noise, start))
        context = self._repeat_context(self.encode_text(prompt), batch_size, "prompt")
        unconditional = self._unconditional(negative_prompt, batch_size)
        latents = self._denoise(latents, context, unconditional, unconditional_guidance_scale, plan, seed, start=start,
                                verbose=verbose)
        return self._decode(latents)

    def inpaint(self, prompt, image, mask, negative_prompt=None, batch_size=1, num_steps=50,
                unconditional_guidance_scale=7.5, diffusion_noise=None, seed=None, verbose=True):
        """Repaints the masked part of an image after a prompt.

        `mask` is `[H, W]` with 1 (or 255) where to repaint. A 9-channel inpainting UNet gets the mask and
        the masked image's latents as extra input channels, as diffusers feeds them; an ordinary UNet
        repaints by blending the re-noised original latents outside the mask after every step.
        `diffusion_noise` (`[batch_size, H/8, W/8, 4]`, standard normal) is the starting noise, and for an
        ordinary UNet also the noise that re-noises the kept region; `None` draws it from `seed`.

        Example:

        >>> sd.inpaint("a red door", photo, mask, seed=0).shape                     # doctest: +SKIP
        (1, 512, 512, 3)
        """
        batch_size = self._resolve_batch(prompt, batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        seed = seeds.check_seed(seed)
        pixels = self._image_input(image, batch_size)
        mask = I.mask_from_input(mask, pixels.shape[1], pixels.shape[2])
        latent_mask = np.ascontiguousarray(
            np.broadcast_to(mask[::8, ::8][None, :, :, None], (batch_size, *mask[::8, ::8].shape, 1)), np.float32
        )
        noise = self._noise(diffusion_noise, self._latent_shape(batch_size, pixels.shape[1], pixels.shape[2]), seed)
        plan = self.scheduler.plan(num_steps)
        extra_channels = keep = None
        if self.components.unet_channels > self.components.latent_channels:
            masked = self._encode_images(pixels * (mask[None, :, :, None] < 0.5))
            extra_channels = np.concatenate([latent_mask, masked], axis=-1)
        else:
            keep = Keep(latent_mask, self._encode_images(pixels), noise)
        context = self._repeat_context(self.encode_text(prompt), batch_size, "prompt")
        unconditional = self._unconditional(negative_prompt, batch_size)
        latents = self._denoise(noise * plan.init_noise_sigma, context, unconditional, unconditional_guidance_scale,
                                plan, seed, extra_channels=extra_channels, keep=keep, verbose=verbose)
        return self._decode(latents)

    def _image_input(self, image, batch_size):
        pixels = I.from_uint8(image, batch_size)
        _check_size("image height", pixels.shape[1])
        _check_size("image width", pixels.shape[2])
        return pixels
