"""The Stable Diffusion training objective, in `keras.ops`: noise a clean latent, predict, compare.

For latents ``x0``, a timestep ``t`` and gaussian noise ``ε`` (DDPM, Ho et al. 2020, eq. 4):

    x_t = sqrt(ᾱ_t) · x0 + sqrt(1 - ᾱ_t) · ε

and the UNet's prediction is compared, by mean squared error, with ``ε`` (epsilon models) or with the velocity
``v = sqrt(ᾱ_t) · ε - sqrt(1 - ᾱ_t) · x0`` (v-prediction models, Salimans & Ho 2022). ᾱ comes from the
checkpoint's training schedule, through `kerasdiffusion.schedulers.alphas_cumprod`, the samplers' own table.

Min-SNR-γ weighting (Hang et al. 2023) multiplies each item's error by ``min(SNR_t, γ) / SNR_t`` for epsilon
models and ``min(SNR_t, γ) / (SNR_t + 1)`` for v-prediction, with ``SNR_t = ᾱ_t / (1 - ᾱ_t)``, as diffusers'
``train_text_to_image.py`` computes it.

Example:

>>> import numpy as np
>>> from kerasdiffusion.schedulers import SchedulerConfig
>>> schedule = TrainingSchedule(SchedulerConfig())
>>> x0, noise = np.ones((1, 2, 2, 4), "float32"), np.zeros((1, 2, 2, 4), "float32")
>>> float(schedule.add_noise(x0, noise, np.array([0]))[0, 0, 0, 0]) > 0.99
True
"""

import numpy as np
from keras import ops

from kerasdiffusion.schedulers import alphas_cumprod

# What diffusers clamps the posterior's log-variance to (DiagonalGaussianDistribution).
_LOGVAR_RANGE = (-30.0, 20.0)


class TrainingSchedule:
    """The forward (noising) process of a checkpoint's training schedule, as float32 tables over timesteps.

    Args:
        config: a `SchedulerConfig` (``components.scheduler_config``).
    """

    def __init__(self, config):
        alpha_cumprod = alphas_cumprod(config)
        self.num_train_timesteps = config.num_train_timesteps
        self.prediction_type = config.prediction_type
        self.signal = np.sqrt(alpha_cumprod).astype(np.float32)  # sqrt(ᾱ_t)
        self.noise = np.sqrt(1.0 - alpha_cumprod).astype(np.float32)  # sqrt(1 - ᾱ_t)
        self.snr = (self.signal.astype(np.float64) / self.noise) ** 2  # as diffusers' compute_snr: (α / σ)²

    def _at(self, table, timesteps):
        """``table[t]`` per item, shaped to broadcast over ``[B, h, w, C]``."""
        return ops.take(ops.convert_to_tensor(table, "float32"), ops.cast(timesteps, "int32"))[:, None, None, None]

    def add_noise(self, latents, noise, timesteps):
        """``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε`` (DDPM eq. 4)."""
        return self._at(self.signal, timesteps) * latents + self._at(self.noise, timesteps) * noise

    def target(self, latents, noise, timesteps):
        """What the UNet is trained to predict: ``ε``, or ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0``."""
        if self.prediction_type == "epsilon":
            return noise
        return self._at(self.signal, timesteps) * noise - self._at(self.noise, timesteps) * latents

    def min_snr_weights(self, timesteps, gamma):
        """Per-item ``min(SNR_t, γ) / SNR_t`` (epsilon) or ``min(SNR_t, γ) / (SNR_t + 1)`` (v-prediction)."""
        snr = self.snr.astype(np.float32)
        clipped = np.minimum(snr, np.float32(gamma))
        weights = clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)
        return ops.take(ops.convert_to_tensor(weights.astype(np.float32)), ops.cast(timesteps, "int32"))


def sample_posterior(moments, noise, scaling_factor):
    """Latents drawn from the VAE posterior ``N(mean, exp(logvar))``, times the scaling factor.

    Args:
        moments: the image encoder's output ``[B, h, w, 2C]``, mean then log-variance.
        noise: standard normal ``[B, h, w, C]``.
        scaling_factor: the VAE's latent scale (``vae_config.scaling_factor``).
    """
    mean, logvar = ops.split(ops.cast(moments, "float32"), 2, axis=-1)
    std = ops.exp(0.5 * ops.clip(logvar, *_LOGVAR_RANGE))
    return (mean + std * noise) * scaling_factor


def per_item_loss(schedule, prediction, latents, noise, timesteps, snr_gamma=None):
    """Each item's mean squared error between the prediction and its target, min-SNR-γ weighted if asked.

    The mean of the result over the batch is diffusers' loss: ``F.mse_loss(pred, target)`` without
    weighting (items have equal sizes), and its min-SNR loss with ``snr_gamma``.
    """
    target = schedule.target(latents, noise, timesteps)
    error = ops.mean(ops.square(ops.cast(prediction, "float32") - target), axis=(1, 2, 3))
    if snr_gamma is None:
        return error
    return error * schedule.min_snr_weights(timesteps, snr_gamma)
