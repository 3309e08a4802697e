"""The denoising core: one step, and the whole loop, in `keras.ops` only, on any Keras backend.

A step is Algorithm 2 of Ho et al. 2020 with a sampler's update in place of its last line, plus
classifier-free guidance (Ho & Salimans 2022): the UNet runs once on the doubled batch
``[unconditional; conditional]`` and the two predictions are mixed. What steers a generation travels as
one `Conditioning`, so that a new kind of input is a new field, not a new mode string.

`Denoiser` turns these functions into compiled programs with `kerasdiffusion.distribute.compile_function`
(one per denoising step, ``loop="steps"``, or one for the whole loop, ``loop="compiled"``; on one device,
or over the replicas of a distribution) and keeps
them by what determines them: the sampler's key, the number of steps, whether guidance is on and which
conditioning fields are present. The shapes are the backend's business: each compiled function traces
once per shape.
"""

import collections
from typing import NamedTuple

import numpy as np
from keras import ops

from kerasdiffusion import distribute

LOOPS = ("steps", "compiled")
# Compiled programs kept per pipeline: enough for every sampler at a few step counts, bounded all the same.
MAX_PROGRAMS = 32


class Keep(NamedTuple):
    """Inpainting with an ordinary UNet: outside ``mask`` the sample is replaced, after every step, by
    the original ``latents`` noised with ``noise`` to the next noise level (diffusers' legacy inpainting)."""

    mask: object  # [B, h, w, 1], 1 where to repaint
    latents: object  # [B, h, w, C]
    noise: object  # [B, h, w, C]


class Conditioning(NamedTuple):
    """Everything that steers the denoising, passed whole to the compiled program.

    ``context`` and ``unconditional`` are the prompt's and the negative prompt's encodings ``[B, N, D]``;
    ``guidance`` is the classifier-free guidance scale (a float32 scalar). ``extra_channels`` ``[B, h, w, k]``
    are concatenated to the UNet's input (a 9-channel inpainting UNet's mask and masked-image latents);
    ``keep`` makes an ordinary UNet inpaint.
    """

    context: object
    unconditional: object
    guidance: object
    extra_channels: object = None
    keep: object = None

    @property
    def kind(self):
        """Which optional fields are present: part of what determines the compiled program."""
        return tuple(name for name in ("extra_channels", "keep") if getattr(self, name) is not None)


def guided_prediction(unet, model_input, t, conditioning, guided):
    """The UNet's float32 prediction at timestep ``t``; with guidance, one call on the doubled batch."""
    if conditioning.extra_channels is not None:
        model_input = ops.concatenate([model_input, ops.cast(conditioning.extra_channels, "float32")], axis=-1)
    context = conditioning.context
    if guided:
        model_input = ops.concatenate([model_input, model_input], axis=0)
        context = ops.concatenate([conditioning.unconditional, context], axis=0)
    timesteps = ops.full((ops.shape(model_input)[0],), t, dtype="float32")
    output = ops.cast(unet([model_input, timesteps, context], training=False), "float32")
    if not guided:
        return output
    unconditional, conditional = ops.split(output, 2, axis=0)
    # ε̃ = ε(∅) + w (ε(c) - ε(∅)), eq. (6) of Ho & Salimans 2022.
    return unconditional + conditioning.guidance * (conditional - unconditional)


def denoise_step(unet, scheduler, plan, latents, state, i, conditioning, noise, guided):
    """Evaluation ``i`` of a run: returns the next ``(latents, scheduler state)``."""
    # 1. The sample as the UNet expects it at this noise level.
    model_input = scheduler.scale_model_input(plan, i, latents)
    # 2. The (guided) prediction of the noise, or of v.
    t = ops.take(ops.convert_to_tensor(plan.timesteps, "float32"), i, axis=0)
    output = guided_prediction(unet, model_input, t, conditioning, guided)
    # 3. The sampler's update to the next noise level.
    latents, state = scheduler.step(plan, i, output, latents, state, noise)
    # 4. Inpainting with an ordinary UNet: outside the mask, the original at the next noise level
    #    (after the last step, the original itself).
    if conditioning.keep is not None:
        keep = conditioning.keep
        last = len(plan.timesteps) - 1
        noised = scheduler.add_noise(plan, keep.latents, keep.noise, ops.minimum(i + 1, last))
        original = ops.where(ops.less(i, last), noised, ops.cast(keep.latents, "float32"))
        mask = ops.cast(keep.mask, "float32")
        latents = (1.0 - mask) * original + mask * latents
    return latents, state


def denoise_loop(unet, scheduler, plan, latents, start, conditioning, noises, guided):
    """Evaluations ``start`` to the end of a run in one `fori_loop`; ``noises[:, i]`` feeds evaluation ``i``
    (batch first, like every batched argument, so that a distribution can split it)."""

    def body(i, carry):
        sample, state = carry
        noise = None if noises is None else ops.take(noises, i, axis=1)
        return denoise_step(unet, scheduler, plan, sample, state, i, conditioning, noise, guided)

    latents = ops.cast(latents, "float32")
    latents, _ = ops.fori_loop(start, len(plan.timesteps), body, (latents, scheduler.initial_state(latents)))
    return latents


class Denoiser:
    """Runs the denoising loop of one UNet, compiling each program once and keeping it by value.

    Args:
        unet: the diffusion model, ``[latents, timesteps, context] -> prediction``.
        jit_compile: compile with XLA.
        distribution: run over the replicas of a distribution (see `kerasdiffusion.distribute`), or `None`.
    """

    def __init__(self, unet, jit_compile=True, distribution=None):
        self.unet = unet
        self.jit_compile = jit_compile
        self.distribution = distribution
        self.programs = collections.OrderedDict()
        self.trace_count = 0

    def program(self, loop, scheduler, plan, conditioning):
        """The compiled program of ``loop`` for this run (made on first use, then kept by value).

        ``"steps"``: ``(latents, state, i, conditioning, noise) -> (latents, state)``, one evaluation;
        ``"compiled"``: ``(latents, start, conditioning, noises) -> latents``, the whole loop, with ``noises``
        ``[B, evaluations, h, w, C]``. Arguments are
        tensors (see `__call__`, which drives either).
        """
        return self._program(loop, scheduler, plan, conditioning, float(conditioning.guidance) > 1.0)

    def _program(self, loop, scheduler, plan, conditioning, guided):
        key = (loop, scheduler.key, plan.num_steps, guided, conditioning.kind)
        if key in self.programs:
            self.programs.move_to_end(key)
            return self.programs[key]
        unet = self.unet

        def traced(*args):
            self.trace_count += 1  # a Python side effect: runs only while tracing
            if loop == "steps":
                return denoise_step(unet, scheduler, plan, *args, guided=guided)
            return denoise_loop(unet, scheduler, plan, *args, guided=guided)

        program = distribute.compile_function(traced, unet.weights, self.jit_compile, self.distribution)
        self.programs[key] = program
        while len(self.programs) > MAX_PROGRAMS:
            self.programs.popitem(last=False)
        return program

    def __call__(self, scheduler, plan, latents, conditioning, start=0, noises=None, loop="steps",
                 progress=False):
        """Denoises ``latents`` from evaluation ``start`` to the end of ``plan``; returns numpy latents.

        Args:
            scheduler, plan: the sampler and its plan for this run.
            latents: numpy ``[B, h, w, C]``, already scaled for the first evaluation.
            conditioning: a `Conditioning`.
            noises: for a stochastic sampler, numpy ``[evaluations, B, h, w, C]``; else None.
            loop: ``"steps"`` (one program per evaluation) or ``"compiled"`` (one for the loop).
            progress: show a progress bar (steps loop only).
        """
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
        guided = float(conditioning.guidance) > 1.0
        conditioning = as_tensors(conditioning)
        program = self._program(loop, scheduler, plan, conditioning, guided)
        latents = _tensor(latents, "float32")
        if loop == "compiled":
            noises = None if noises is None else _tensor(np.swapaxes(noises, 0, 1), "float32")
            return ops.convert_to_numpy(program(latents, _tensor(start, "int32"), conditioning, noises))
        state = scheduler.initial_state(latents)
        evaluations = range(start, len(plan.timesteps))
        if progress:
            from tqdm.auto import tqdm

            evaluations = tqdm(evaluations, desc="denoising", unit="step")
        for i in evaluations:
            noise = None if noises is None else _tensor(noises[i], "float32")
            latents, state = program(latents, state, _tensor(i, "int32"), conditioning, noise)
        return ops.convert_to_numpy(latents)


def _tensor(value, dtype):
    return ops.convert_to_tensor(np.asarray(value, dtype))


def as_tensors(conditioning):
    """Every field as a float32 tensor, so that each backend traces one program per shape."""
    keep = conditioning.keep
    return Conditioning(
        context=ops.cast(conditioning.context, "float32"),
        unconditional=ops.cast(conditioning.unconditional, "float32"),
        guidance=_tensor(conditioning.guidance, "float32"),
        extra_channels=None if conditioning.extra_channels is None else _tensor(conditioning.extra_channels, "float32"),
        keep=None if keep is None else Keep(*(_tensor(part, "float32") for part in keep)),
    )
