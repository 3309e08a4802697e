"""`AutoencoderTrainer`: trains Stable Diffusion's KL autoencoder (image encoder and decoder) with `fit`.

The objective is the latent diffusion paper's first stage without its perceptual and adversarial terms
(Rombach et al. 2022, sec. 3 and appendix G), for pictures simple enough not to need them:

1. the encoder's moments give the posterior ``N(mean, exp(logvar))`` per latent value;
2. a latent drawn from it (the reparameterisation trick) is decoded back to pixels;
3. the loss is the mean absolute pixel error plus ``kl_weight`` times the posterior's KL divergence from
   ``N(0, 1)``, summed over the latent and divided by the number of pixel values, as the paper's
   ``LPIPSWithDiscriminator`` weighs it (their ``kl_weight`` of 1e-6 is on the same scale). Given per-pixel
   ``weights``, the pixel error is their weighted mean instead, so that a region that matters more than
   its area (a small object on a plain background) can count more; the KL term's scale is unchanged.

The trained latents have whatever spread the data gives them; `match_scaling_factor` then rescales the
encoder's output and the decoder's input so that latents times the pipeline's ``scaling_factor`` have unit
standard deviation, the property Stable Diffusion's 0.18215 was chosen for. The rescaling is exact: the
decoder sees the same values as before.

Example:

>>> import numpy as np, keras
>>> from kerasdiffusion.config import VAEConfig
>>> from kerasdiffusion.vae import build_decoder, build_image_encoder
>>> config = VAEConfig(block_channels=(32, 32), layers_per_level=1)
>>> trainer = AutoencoderTrainer(build_image_encoder(config), build_decoder(config), seed=0)
>>> trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
>>> images = np.zeros((2, 16, 16, 3), "float32")
>>> float(trainer.evaluate(images, verbose=0)) > 0
True
"""

import keras
import numpy as np
from keras import ops

from kerasdiffusion.training.objective import sample_posterior


def kl_divergence(moments):
    """Each item's ``KL(N(mean, exp(logvar)) || N(0, 1))``, summed over its latent values (float32 ``[B]``)."""
    mean, logvar = ops.split(ops.cast(moments, "float32"), 2, axis=-1)
    logvar = ops.clip(logvar, -30.0, 20.0)
    return 0.5 * ops.sum(ops.square(mean) + ops.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


class AutoencoderTrainer(keras.Model):
    """A `keras.Model` whose step trains an image encoder and decoder as a KL autoencoder.

    Args:
        image_encoder: images ``[B, H, W, 3]`` in [-1, 1] -> moments ``[B, H/8, W/8, 2C]`` (`build_image_encoder`).
        decoder: latents ``[B, h, w, C]`` -> images (`build_decoder`).
        kl_weight: the weight of the KL term (see the module docstring for its scale).
        seed: the seed of the posterior samples.

    Batches are images in [-1, 1] (a tensor, or a dict with ``"images"`` and optionally ``"weights"``, each
    pixel's non-negative weight in the reconstruction error, ``[B, H, W]``, and, to reproduce a given recipe
    exactly, the posterior's standard normal ``"noise"`` instead of drawing it); ``fit`` minimises the mean
    of each item's loss.
    """

    def __init__(self, image_encoder, decoder, kl_weight=1e-6, seed=None, name="autoencoder_trainer", **kwargs):
        super().__init__(name=name, **kwargs)
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be non-negative, got {kl_weight!r}")
        self.image_encoder = image_encoder
        self.decoder = decoder
        self.kl_weight = float(kl_weight)
        self.seed_generator = keras.random.SeedGenerator(seed, name="posterior_seed")

    def call(self, images, training=False):
        """Each item's loss (float32 ``[B]``): the (weighted) mean absolute reconstruction error plus the
        weighted KL."""
        batch = images if isinstance(images, dict) else {"images": images}
        images = ops.cast(batch["images"], "float32")
        moments = self.image_encoder(images, training=training)
        if "noise" in batch:
            noise = ops.cast(batch["noise"], "float32")
        else:
            shape = ops.shape(moments)
            noise = keras.random.normal((*shape[:-1], shape[-1] // 2), seed=self.seed_generator)
        reconstruction = ops.cast(self.decoder(sample_posterior(moments, noise, 1.0), training=training), "float32")
        pixel_values = ops.cast(ops.size(images), "float32") / ops.cast(ops.shape(images)[0], "float32")
        difference = ops.abs(reconstruction - images)
        if "weights" in batch:
            weights = ops.cast(batch["weights"], "float32")
            error = ops.sum(weights * ops.mean(difference, axis=-1), axis=(1, 2)) / ops.sum(weights, axis=(1, 2))
        else:
            error = ops.mean(difference, axis=(1, 2, 3))
        return error + self.kl_weight * kl_divergence(moments) / pixel_values

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return ops.mean(y_pred)


def latent_std(image_encoder, images, batch_size=64):
    """The standard deviation of the posterior means over ``images`` (``[N, H, W, 3]`` in [-1, 1])."""
    means = []
    for start in range(0, len(images), batch_size):
        moments = ops.convert_to_numpy(image_encoder(images[start:start + batch_size], training=False))
        means.append(np.asarray(moments, np.float64)[..., : moments.shape[-1] // 2])
    return float(np.concatenate(means).std())


def match_scaling_factor(image_encoder, decoder, images, scaling_factor):
    """Rescales the latent space so that ``latents * scaling_factor`` has unit standard deviation over ``images``.

    With ``c = 1 / (scaling_factor * std)``: the encoder's ``quant_conv`` gives ``c`` times the mean and a
    log-variance larger by ``2 log c``; the decoder's ``post_quant_conv`` divides its input by ``c`` first. The
    decoded pictures are unchanged.

    Returns:
        ``c``, the factor the latents were multiplied by.
    """
    c = 1.0 / (scaling_factor * latent_std(image_encoder, images))
    quant = image_encoder.get_layer("quant_conv")
    kernel, bias = (np.asarray(ops.convert_to_numpy(w), np.float64) for w in (quant.kernel, quant.bias))
    half = kernel.shape[-1] // 2
    kernel[..., :half] *= c
    bias[:half] *= c
    bias[half:] += 2.0 * np.log(c)
    quant.kernel.assign(kernel.astype(np.float32))
    quant.bias.assign(bias.astype(np.float32))
    post_quant = decoder.get_layer("post_quant_conv")
    post_quant.kernel.assign((np.asarray(ops.convert_to_numpy(post_quant.kernel), np.float64) / c).astype(np.float32))
    return c
